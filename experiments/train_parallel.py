"""Data-parallel training of the main job (digits MLP) on N devices, with jaxprop gradients.

    python experiments/train_parallel.py --devices 8          # 8 simulated CPU devices
    python experiments/train_parallel.py --devices 8 --quick  # a few steps (tests)

On a machine with N GPUs the same command uses the first N GPUs (the XLA flag below only
multiplies the *CPU* device). Four runs take the same SGD steps on the same batches:

- ``single``: one device, ``jax.jit`` of ``jaxprop.value_and_grad`` (the reference curve);
- ``jit``: a mesh of N devices (Explicit axes, JAX's default), parameters replicated
  (``P()``), each batch split over the ``'data'`` axis (``P('data')``); the same step
  function — the sharding is in the arrays' types, XLA inserts the gradient all-reduce;
- ``fsdp``: every parameter whose first axis divides by N is split over ``'data'``
  (``P('data')``) and gathered inside the loss (``jax.sharding.reshard(w, P())``); the
  gradients and the optimizer state come back split like the parameters;
- ``shard_map``: the loss is ``jax.shard_map`` of the per-device loss, ``lax.pmean``-ed over
  ``'data'`` (the JAX 0.10 idiom for the mean gradient; see the README's "Many devices").

All four curves must be the single-device curve (to float rounding): printed as the largest
difference, drawn together in ``--out`` (parallel_curves.png, parallel.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# -- flags (before JAX starts: the device count is fixed when it does) ----------------------
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--devices", type=int, default=8,
                    help="devices of the mesh; on CPU this many are simulated (default 8)")
parser.add_argument("--steps", type=int, default=300, help="SGD steps (default 300)")
parser.add_argument("--batch-size", type=int, default=64,
                    help="global examples per step, a multiple of --devices (default 64)")
parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
parser.add_argument("--arch", default="128", help="hidden layer sizes, e.g. '128' or '64,64'")
parser.add_argument("--variants", default="jit,fsdp,shard_map",
                    help="parallel runs to compare with the single-device one (comma list)")
parser.add_argument("--quick", action="store_true", help="30 steps (tests and smoke checks)")
parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                    help="folder for parallel_curves.png and parallel.json")
parser.add_argument("--no-plot", action="store_true", help="skip the figure")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={args.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import train  # noqa: E402  (the main job's data, model and loss)

import jaxprop  # noqa: E402

steps = 30 if args.quick else args.steps
if args.batch_size % args.devices:
    parser.error(f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}")
if len(jax.devices()) < args.devices:
    parser.error(f"--devices {args.devices}: only {len(jax.devices())} {jax.default_backend()} "
                 "device(s) here")

# -- the main job: digits, MLP, softmax cross-entropy ----------------------------------------
data = train.load_task("digits")
sizes = [data["x_train"].shape[1], *map(int, filter(None, args.arch.split(","))), data["n_out"]]
loss = train.make_loss("multiclass", train.mlp, "relu")
params0 = train.init_mlp(jax.random.key(args.seed), sizes, "relu")
rng = np.random.default_rng(args.seed)
n = data["x_train"].shape[0]
batches = [rng.choice(n, args.batch_size, replace=False) for _ in range(steps)]
optimizer = optax.sgd(args.lr, momentum=args.momentum)


def make_step(loss_fn):
    """One jitted SGD step on jaxprop's gradient of ``loss_fn``."""
    @jax.jit
    def step(params, opt_state, x, y):
        value, grads = jaxprop.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value
    return step


def run(loss_fn, place_params, place_batch):
    """Train from params0; return (losses per step, seconds per step after the first)."""
    step = make_step(loss_fn)
    params = place_params(params0)
    opt_state = optimizer.init(params)
    losses, start = [], None
    for i, idx in enumerate(batches):
        x, y = place_batch(data["x_train"][idx]), place_batch(data["y_train"][idx])
        params, opt_state, value = step(params, opt_state, x, y)
        losses.append(float(value))
        if i == 0:
            start = time.perf_counter()
    return losses, (time.perf_counter() - start) / max(steps - 1, 1), params


# -- the runs ----------------------------------------------------------------------------------
mesh = jax.make_mesh((args.devices,), ("data",), devices=jax.devices()[:args.devices])
split_rows = lambda a: jax.device_put(a, P("data"))
replicate = lambda tree: jax.device_put(tree, P())


def fsdp_params(tree):
    """Split each parameter whose first axis divides by the device count."""
    return jax.tree.map(lambda w: jax.device_put(
        w, P("data") if w.shape[0] % args.devices == 0 else P()), tree)


def fsdp_loss(params, x, y):
    return loss(jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params), x, y)


def shard_map_loss(params, x, y):
    per_device = lambda p, x, y: lax.pmean(loss(p, x, y), "data")
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                         out_specs=P())(params, x, y)


results = {}
curves = {"single": run(loss, lambda t: t, jnp.asarray)}
runs = {"jit": (loss, replicate), "fsdp": (fsdp_loss, fsdp_params),
        "shard_map": (shard_map_loss, replicate)}
with jax.set_mesh(mesh):
    for name in filter(None, args.variants.split(",")):
        fn, place = runs[name]
        curves[name] = run(fn, place, split_rows)
        if name == "fsdp":  # the gradients' (and so the parameters') sharding is kept
            specs = {str(jax.typeof(w).sharding.spec) for w in jax.tree.leaves(curves[name][2])}
            results["fsdp_param_specs"] = sorted(specs)

reference = np.array(curves["single"][0])
for name, (losses, seconds, _) in curves.items():
    diff = float(np.max(np.abs(np.array(losses) - reference)))
    results[name] = dict(losses=losses, ms_per_step=1e3 * seconds, max_abs_diff_vs_single=diff)
    print(f"{name:10s} loss {losses[0]:.4f} -> {losses[-1]:.4f}   "
          f"max |Δ| vs single {diff:.2e}   {1e3 * seconds:.2f} ms/step")
results["config"] = dict(devices=args.devices, backend=jax.default_backend(), steps=steps,
                         batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                         sizes=sizes)

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "parallel.json").write_text(json.dumps(results, indent=1))
if not args.no_plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"single": dict(lw=3, alpha=0.4, color="k")}
    for name, (losses, _, _) in curves.items():
        ax.plot(losses, label=name, **styles.get(name, dict(lw=1, ls="--")))
        if name != "single":
            ax_diff.semilogy(np.abs(np.array(losses) - reference) + 1e-12, label=name, lw=1)
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"digits MLP: 1 device vs {args.devices} {jax.default_backend()} devices")
    ax_diff.set(xlabel="step", ylabel="|loss − single-device loss| (+1e-12)",
                title="difference from the single-device curve")
    ax.legend(), ax_diff.legend()
    fig.tight_layout()
    fig.savefig(out / "parallel_curves.png", dpi=110)
    print("wrote", out / "parallel_curves.png")
