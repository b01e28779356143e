"""experiments/train.py in short mode: loss falls, metrics pass floors, jaxprop matches jax.grad,
--resume repeats an uninterrupted run exactly, bad checkpoints give clear errors; ode_fit.py's
gradient through an adaptive ODE solver's while loop passes its checks and the fit learns."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import train  # noqa: E402

# test-set floor after the --quick run (a few epochs); full runs reach the README's numbers
QUICK_FLOORS = {"digits": 0.93, "iris": 0.9, "wine": 0.9, "breast_cancer": 0.93,
                "multilabel": 0.75, "diabetes": 0.25, "digits_cnn": 0.85, "seq_transformer": 0.6}
SLOW = {"digits_cnn", "seq_transformer"}


def run(tmp_path, *flags, name="run"):
    """train.main in-process, quiet, writing into tmp_path/name; returns (summary, history)."""
    out = tmp_path / name
    summary = train.main([*flags, "--out", str(out), "--no-progress"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, history


def step_losses(history, key="step_losses"):
    return [v for record in history for v in record[key]]


@pytest.mark.parametrize("task", [
    pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in train.TASKS])
def test_quick_run_learns(tmp_path, task):
    summary, history = run(tmp_path, "--task", task, "--quick", "--no-plot", "--check-every", "1")
    losses = step_losses(history)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, f"{task}: loss did not fall ({first:.4f} -> {last:.4f})"
    assert summary["test_metric"] >= QUICK_FLOORS[task], summary
    assert np.isfinite(summary["test_loss"])
    # the periodic check compared jaxprop.grad with jax.grad on the current batch
    assert len([h for h in history if "grad_check_max_abs_diff" in h]) == len(history)
    assert summary["max_grad_diff"] <= 1e-5


def test_jaxprop_and_jax_grad_trajectories_agree(tmp_path):
    """The overlay run (jax.grad) and the jaxprop run take the same steps, to float tolerance."""
    summary, history = run(tmp_path, "--task", "digits", "--epochs", "3", "--check-every", "0")
    ours, theirs = step_losses(history), step_losses(history, "ref_step_losses")
    assert len(ours) == 3 * (1437 // 32) == len(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert abs(summary["test_metric"] - summary["ref_test_metric"]) <= 1 / 360 + 1e-9
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_losses_and_selu(tmp_path):
    for loss in ("mae", "huber"):
        summary, history = run(tmp_path, "--task", "diabetes", "--loss", loss, "--activation", "selu",
                               "--epochs", "8", "--no-plot", "--check-every", "4", name=loss)
        losses = step_losses(history)
        assert np.mean(losses[-5:]) < np.mean(losses[:5])
        assert summary["test_metric"] > 0.1 and summary["max_grad_diff"] <= 1e-5


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    flags = ["--task", "iris", "--no-plot", "--check-every", "0"]
    full, full_history = run(tmp_path, *flags, "--epochs", "4", name="full")
    run(tmp_path, *flags, "--epochs", "2", name="split")
    resumed, history = run(tmp_path, *flags, "--epochs", "4", "--resume", name="split")
    assert resumed["resumed_from_epoch"] == 2
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert step_losses(history) == step_losses(full_history)           # bit for bit
    assert [h["test_loss"] for h in history] == [h["test_loss"] for h in full_history]
    assert not list((tmp_path / "split").glob("*.tmp"))                # atomic writes leave no temp


def test_resume_with_overlay_and_steps_flag(tmp_path):
    flags = ["--task", "wine", "--check-every", "0", "--batch-size", "32"]   # 4 steps per epoch
    full, full_history = run(tmp_path, *flags, "--steps", "12", name="full")
    assert full["steps"] == 12 and full["epochs"] == 3
    run(tmp_path, *flags, "--steps", "5", name="split")                      # rounds up: 2 epochs
    _, history = run(tmp_path, *flags, "--steps", "12", "--resume", name="split")
    for key in ("step_losses", "ref_step_losses"):
        assert step_losses(history, key) == step_losses(full_history, key)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*Run once without --resume"):
        train.main(["--task", "iris", "--resume", "--out", str(tmp_path / "none"), "--no-progress"])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_meta", "wrong_shapes"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    flags = ["--task", "iris", "--epochs", "1", "--no-plot", "--check-every", "0"]
    run(tmp_path, *flags)
    ckpt = tmp_path / "run" / "checkpoint.npz"
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "no_meta":
        with np.load(ckpt) as data:
            arrays = {k: data[k] for k in data.files if k != "meta"}
        np.savez(ckpt, **arrays)
    else:
        with np.load(ckpt) as data:
            arrays = {k: data[k] for k in data.files}
        arrays["leaf_0000"] = np.zeros((1, 2, 3), np.float32)
        np.savez(ckpt, **arrays)
    message = "does not match this model" if damage == "wrong_shapes" else "corrupt or unreadable"
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, *flags, "--epochs", "2", "--resume")


def test_checkpoint_is_loaded_without_pickle(tmp_path):
    run(tmp_path, "--task", "iris", "--epochs", "1", "--no-plot", "--check-every", "0")
    ckpt = tmp_path / "run" / "checkpoint.npz"
    with zipfile.ZipFile(ckpt) as z:
        assert all(name.endswith(".npy") for name in z.namelist())
    with np.load(ckpt, allow_pickle=False) as data:                   # no object arrays inside
        meta = json.loads(bytes(data["meta"]).decode())
        assert all(data[k].dtype != object for k in data.files)
    assert meta["format"] == train.CHECKPOINT_FORMAT and meta["epoch"] == 1


def test_resume_with_other_settings_is_refused(tmp_path):
    run(tmp_path, "--task", "iris", "--epochs", "1", "--no-plot", "--check-every", "0")
    with pytest.raises(SystemExit, match="other settings.*lr"):
        run(tmp_path, "--task", "iris", "--epochs", "2", "--no-plot", "--lr", "0.5", "--resume")


def test_flags_are_validated_and_explained():
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "iris", "--arch", "cnn"])
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "digits", "--loss", "huber"])
    args = train.parse_args([])
    assert (args.task, args.kind, str(args.out)) == ("digits", "multiclass", "runs/digits")
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "train.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--task", "--arch", "--steps", "--epochs", "--batch-size", "--lr", "--momentum",
                 "--seed", "--out", "--resume", "--quick", "--no-plot", "--check-every", "--loss"):
        assert flag in out.stdout


def test_data_order_depends_only_on_seed_and_epoch():
    a = np.asarray(train.batch_indices(train.epoch_key(0, 3), 100, 10))
    b = np.asarray(train.batch_indices(train.epoch_key(0, 3), 100, 10))
    c = np.asarray(train.batch_indices(train.epoch_key(0, 4), 100, 10))
    assert (a == b).all() and not (a == c).all()
    assert sorted(a.ravel()) == list(range(100))


@pytest.mark.slow
def test_main_job_reaches_97_percent(tmp_path):
    """The README's main job, as a newcomer runs it (defaults), in a subprocess."""
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "train.py"), "--out", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_metric"] >= 0.97
    assert "test accuracy" in out.stdout and "wall time" in out.stdout


README = EXPERIMENTS.parent / "README.md"


def test_readme_quickstart_is_two_commands_and_ci_runs_the_same_tests():
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    block = section[section.index("```bash\n") + 8:]
    commands = block[:block.index("```")].strip().splitlines()
    assert len(commands) == 2
    assert commands[0].endswith(".venv/bin/python experiments/train.py")
    test_command = commands[1].split("&& ")[-1]
    assert test_command == '.venv/bin/python -m pytest -q -n 2 -m "not slow"'
    ci = (EXPERIMENTS.parent / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{test_command}'" in ci
    assert 'python" -m pytest -q -n 2 -m "not slow" ||' in ci and "HYPOTHESIS_PROFILE=ci" in ci


# -- experiments/ode_fit.py: a fit through an adaptive Dormand–Prince lax.while_loop ------------
ODE_QUICK = ["--steps", "3", "--t-end", "1.5", "--n-obs", "3", "--rtol", "1e-3", "--atol", "1e-6",
             "--no-plot", "--quiet"]


@pytest.mark.parametrize("mode", [pytest.param("--eager", marks=pytest.mark.slow), "--jit"])
def test_ode_fit_quick(tmp_path, mode):
    """A few Adam steps on a short window: jaxprop's while-loop gradient equals jax.grad of the
    scan rewrite to rounding and central differences to 1e-6, the frozen-step replay reproduces
    the solve, and the loss falls."""
    import ode_fit
    flags = [*ODE_QUICK, "--out", str(tmp_path)] + (["--eager"] if mode == "--eager" else [])
    m = ode_fit.main(flags)
    checks = m["checks"]
    assert checks["scan_rel_err"] < 1e-10 and checks["fd_rel_err"] < 1e-6, checks
    assert checks["replay_loss_rel_err"] < 1e-12 and checks["replay_grad_rel_diff"] < 0.1, checks
    assert m["checks_pass"] and m["accepted_steps"] > 3
    assert m["final_loss"] < 0.5 * m["initial_loss"], m["losses"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mode"] == mode.lstrip("-") and saved["final_loss"] == m["final_loss"]


def test_ode_fit_help_lists_every_flag(capsys):
    import ode_fit
    with pytest.raises(SystemExit):
        ode_fit.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--eager", "--steps", "--lr", "--t-end", "--n-obs", "--noise", "--rtol",
                 "--atol", "--h0", "--max-steps", "--fd-eps", "--seed", "--out", "--plot",
                 "--no-plot", "--quiet"):
        assert flag in text
    assert ode_fit.parse_args([]).eager is False          # the default is jax.jit
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    real_epoch_key = train.epoch_key

    def interrupted(seed, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch_key(seed, epoch)

    monkeypatch.setattr(train, "epoch_key", interrupted)
    flags = ["--task", "iris", "--epochs", "4", "--no-plot", "--check-every", "0"]
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, *flags)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "checkpoint of epoch 2/4 saved" in err
    assert "resume with: python" in err and "--task iris" in err and err.rstrip().endswith(
        "--resume")
    monkeypatch.setattr(train, "epoch_key", real_epoch_key)
    summary, history = run(tmp_path, *flags, "--resume")
    assert summary["resumed_from_epoch"] == 2 and [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_a_one_epoch_run_still_plots_something(tmp_path):
    summary, history = run(tmp_path, "--task", "iris", "--epochs", "1", "--check-every", "0")
    assert (tmp_path / "run" / "curves.png").exists()
    fig = train.draw_curves(history, "accuracy", "iris")
    for ax in fig.axes:
        lines = ax.get_lines()
        assert lines and all(len(line.get_xdata()) >= 2 or line.get_marker() not in ("None", "")
                             for line in lines)
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == len(history[0]["step_losses"]) > 1


def test_feedback_alignment_help_describes_every_flag():
    script = EXPERIMENTS / "feedback_alignment.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    flags = ["--epochs", "--hidden", "--batch", "--lr", "--seed", "--out", "--quick"]
    assert all(flag in text for flag in flags)
    # argparse prints "(default: …)" only after a flag's help text: one per flag
    assert text.count("(default:") == len(flags), proc.stdout
    assert "feedback matrices B" in text and "3 epochs" in text
@pytest.mark.slow  # ~15 s; tests/test_mesh.py checks the same patterns in the default run
def test_train_parallel_quick_equals_single_device(tmp_path):
    """experiments/train_parallel.py --quick on 8 simulated devices: the jit + NamedSharding,
    FSDP and shard_map (pmean'd loss) curves are the single-device curve."""
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "train_parallel.py"), "--devices", "8", "--quick",
         "--no-plot", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(EXPERIMENTS.parent)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "parallel.json").read_text())
    assert results["config"]["devices"] == 8
    for name in ("jit", "fsdp", "shard_map"):
        assert results[name]["max_abs_diff_vs_single"] < 1e-5, (name, results[name])
    losses = results["single"]["losses"]
    assert losses[-1] < 0.5 * losses[0]
    assert "P('data',)" in results["fsdp_param_specs"], results["fsdp_param_specs"]
