"""experiments/benchmark.py runs and writes its table, JSON and chart (timings are not checked)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"
METRICS = ("step", "compile", "eager", "memory")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_outputs(out: Path, workloads: list[str]) -> dict:
    report = json.loads((out / "benchmark.json").read_text())
    table = (out / "benchmark.md").read_text()
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| workload | jit SGD step | trace + compile | eager gradient | peak memory |" in table
    assert list(report["workloads"]) == workloads
    for name in workloads:
        res = report["workloads"][name]
        assert res["title"] in table
        for metric in METRICS:
            r = res[metric]
            if r.get("error", "").startswith("missing rule:"):  # reported, not crashed
                continue
            assert "error" not in r, (name, metric, r)
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, (name, metric, r)
        assert res["grad_rel_err"] < 1e-4, (name, res["grad_rel_err"])  # same gradient as JAX
    return report


def test_quick_small_mlp(tmp_path, capsys):
    bench = load_benchmark()
    bench.main(["--quick", "--only", "mlp_small", "--no-extras", "--out", str(tmp_path)])
    check_outputs(tmp_path, ["mlp_small"])
    said = "eager figures include warm-up"
    assert said in capsys.readouterr().out and said in (tmp_path / "benchmark.md").read_text()
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    assert "include warm-up" in " ".join(capsys.readouterr().out.split())


def test_missing_rule_is_reported_not_raised():
    bench = load_benchmark()
    from jaxprop import _jax

    no_rule = _jax.identity_primitive("benchmark_no_rule", lambda ct: ct)  # jaxprop has no rule
    w = bench.make_mlp_small(True, bench.jax.random.PRNGKey(0))
    loss = w.loss
    w = bench.Workload("mlp_small", w.title, w.params, w.batch,
                       lambda p, b: no_rule.bind(loss(p, b)))
    res = bench.bench_workload(w, bench.parse_args(["--quick"]))
    assert all(res[m] == {"error": "missing rule: benchmark_no_rule"} for m in METRICS), res
    table = bench.markdown(dict(machine="m", date="d", workloads={"mlp_small": res}, extras={}))
    assert "missing rule: benchmark_no_rule" in table


@pytest.mark.slow
def test_quick_all_workloads(tmp_path):
    bench = load_benchmark()
    bench.main(["--quick", "--out", str(tmp_path)])
    report = check_outputs(tmp_path, bench.WORKLOADS)
    assert set(report["extras"]["scan_memory"]) == {"jax", "jaxprop"}
    assert report["extras"]["roofline"]["gflops"] > 0
    for name, r in report["extras"]["frameworks"].items():  # optional: skipped when absent
        assert r.get("error") == "not installed" or r["ratio"] > 0, (name, r)


def _instructions(compiled) -> list[str]:
    """The optimized HLO's instructions, names and metadata stripped, in sorted order."""
    import re
    lines = [re.sub(r"%[\w.\-]+", "%", re.sub(r", metadata=\{[^}]*\}", "", line))
             for line in compiled.as_text().splitlines() if re.search(r" = \S+ \w+\(", line)]
    return sorted(lines)


@pytest.mark.parametrize("name", ["mlp_small", "deep_mlp"])
def test_mlp_step_is_jax_grads_program(name):
    """The jit-compiled SGD step of an MLP is instruction for instruction jax.grad's: same
    step time by construction (the benchmark's ratios around 1.00 there are noise)."""
    import jax
    import optax

    import jaxprop
    bench = load_benchmark()
    w = bench.MAKERS[name](True, jax.random.PRNGKey(0))
    opt = optax.sgd(0.1)
    state = opt.init(w.params)
    programs = [_instructions(jax.jit(bench.make_step(w, grad, opt))
                              .lower(w.params, state, w.batch).compile())
                for grad in (jax.grad, jaxprop.grad)]
    assert programs[0] == programs[1]


@pytest.mark.slow
def test_quick_while_section(tmp_path):
    """The while-loop section: every engine's gradient equals the scan's, jaxprop's memory does
    not grow with the trip count, and its files are written."""
    bench = load_benchmark()
    res = bench.main(["--quick", "--while-only", "--out", str(tmp_path)])["extras"]["while_loops"]
    assert all(r["grad_rel_err"] < 1e-4 for r in res["times"].values()), res["times"]
    memory = res["memory"]["jaxprop while"]
    assert memory[-1] == memory[0]
    from jaxprop.checkpointing import recomputed_steps
    assert res["recomputed"] == {t: recomputed_steps(t, res["checkpoints"])
                                 for t in res["memory"]["trip_counts"]}
    assert (tmp_path / "while_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| engine | gradient time [quartiles] |" in (tmp_path / "while_loops.md").read_text()
