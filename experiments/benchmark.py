"""jaxprop against jax.grad, side by side in one process: step time, compile time, eager, memory.

    python experiments/benchmark.py                      # full run (a few minutes on 2 cores)
    python experiments/benchmark.py --quick              # smoke run: tiny sizes, 2 rounds
    python experiments/benchmark.py --only transformer --rounds 30
    python experiments/benchmark.py --while-only --checkpoints 8   # just the while loops

For every workload it measures four ratios, jaxprop / jax.grad (below 1 = jaxprop is better):

1. **jit step**: one ``jax.jit``-compiled optax SGD step (gradient + update), chained so that
   steps run one after another;
2. **trace + compile**: ``jax.jit(step).lower(...)`` then ``.compile()``, with a fresh step
   function every round so no cache hides the work (the trace-only ratio is in the JSON);
3. **eager gradient**: the gradient without ``jax.jit``, op by op;
4. **peak memory**: ``compiled.memory_analysis()`` of the step, temp + argument + output bytes.

Timings alternate the two engines A B B A A B … and report the median of the per-round ratios
(with the quartiles, so a reader sees whether ±5 % is resolved). The same run measures the
machine's matmul roofline (a large jit-compiled f32 matmul) and reports the wide MLP step as a
fraction of it (forward + backward FLOPs ≈ 3 × the forward matmul FLOPs); where PyTorch and
HIPS autograd are installed, it also times their eager gradient of the small MLP.

A workload that needs a VJP rule jaxprop does not have yet is reported as
``missing rule: <primitive>`` instead of stopping the run.

A last section differentiates a ``lax.while_loop`` with a traced trip count (jax.grad refuses
it): jaxprop against Equinox's checkpointed while loop (if Equinox is installed) and jax.grad
of scan rewrites, at C carries each, and their compiled memory against the trip count.

Outputs (in --out, default experiments/results): benchmark.md (the table for the README),
benchmark.json (every number), benchmark.png (bar chart of the ratios), while_loops.{md,json}
and while_memory.png (memory against the trip count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

# -- flags ---------------------------------------------------------------------------------
WORKLOADS = ["mlp_small", "mlp_wide", "cnn", "transformer", "lstm", "deep_mlp", "per_example",
             "data_parallel"]
DP_DEVICES = 8  # the data_parallel workload's mesh (simulated CPU devices where there are fewer)
METRICS = ["step", "compile", "eager", "memory"]
QUICK_NOTE = ("--quick: a smoke run. Its eager figures include warm-up — jaxprop compiles a "
              "tape's sweep on its third call, and JAX fills its op caches — and tiny sizes "
              "with 1-2 rounds, so they are not steady-state timings: run without --quick "
              "for those.")
BUDGET_S = 10.0  # a timed comparison stops adding rounds after this long (3-4 rounds at least)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark jaxprop against jax.grad (ratios jaxprop/jax; < 1 is better).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes, 2 rounds (the tests run this); its eager figures "
                        "include warm-up (compilation), so they are not steady-state timings")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of the jit-step comparison (eager uses half, compile a quarter, "
                        "at least 2); default 30, or 2 with --quick")
    p.add_argument("--only", action="append", choices=WORKLOADS, default=None,
                   help="run only this workload (repeatable)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="each timed sample repeats the call until it lasts about this long "
                        "(default 40 ms, 2 ms with --quick)")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the roofline, PyTorch and autograd comparisons")
    p.add_argument("--no-while", action="store_true",
                   help="skip the while-loop section (jaxprop vs Equinox's checkpointed "
                        "while loop vs the scan rewrite, and memory vs trip count)")
    p.add_argument("--while-only", action="store_true",
                   help="run only the while-loop section; writes while_loops.{md,json} and "
                        "while_memory.png")
    p.add_argument("--checkpoints", type=int, default=None,
                   help="carries the while-loop section keeps (default 16, 4 with --quick)")
    p.add_argument("--out", default="experiments/results", help="output folder")
    p.add_argument("--devices", type=int, default=1,
                   help="simulate this many CPU devices (set before JAX starts). The "
                        f"data_parallel workload needs {DP_DEVICES}: with fewer it runs itself "
                        f"in a subprocess with --devices {DP_DEVICES}")
    args = p.parse_args(argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    args.rounds = args.rounds or (2 if args.quick else 30)
    args.target_ms = args.target_ms or (2.0 if args.quick else 40.0)
    args.only = args.only or WORKLOADS
    args.checkpoints = args.checkpoints or (4 if args.quick else 16)
    args.out = Path(args.out)
    return args


import jax  # noqa: E402  (flags first, so --help is instant)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import jaxprop  # noqa: E402
from jaxprop.registry import MissingRuleError  # noqa: E402

ENGINES = {"jax": jax.grad, "jaxprop": jaxprop.grad}


# -- workloads: params, batch, loss(params, batch) -----------------------------------------
class Workload:
    """A model to differentiate: ``loss(params, batch)``; ``grad_fn(grad)`` builds the
    gradient function from an engine's ``grad`` (per-example workloads vmap it)."""

    def __init__(self, name, title, params, batch, loss, flops=None, grad_fn=None):
        self.name, self.title = name, title
        self.params, self.batch, self.loss = params, batch, loss
        self.flops = flops  # forward + backward FLOPs of one gradient, where known
        self.grad_fn = grad_fn or (lambda grad: grad(loss))


def dense_init(key, sizes, scale=None):
    keys = jax.random.split(key, len(sizes) - 1)
    return [dict(w=jax.random.normal(k, (m, n)) * (scale or math.sqrt(2.0 / m)),
                 b=jnp.zeros(n)) for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))


def classification_batch(key, n, d, classes):
    kx, ky = jax.random.split(key)
    return dict(x=jax.random.normal(kx, (n, d)), y=jax.random.randint(ky, (n,), 0, classes))


def mlp_workload(name, title, sizes, batch_size, key):
    params = dense_init(key, sizes)
    batch = classification_batch(jax.random.fold_in(key, 1), batch_size, sizes[0], sizes[-1])
    loss = lambda p, b: cross_entropy(mlp_apply(p, b["x"]), b["y"])  # noqa: E731
    flops = 3 * 2 * batch_size * sum(m * n for m, n in zip(sizes[:-1], sizes[1:]))
    return Workload(name, title, params, batch, loss, flops)


def make_mlp_small(quick, key):
    sizes, batch = ([8, 16, 16, 4], 8) if quick else ([64, 256, 256, 10], 128)
    return mlp_workload("mlp_small", f"MLP {'-'.join(map(str, sizes))}, batch {batch}",
                        sizes, batch, key)


def make_mlp_wide(quick, key):
    sizes, batch = ([32, 64, 64, 10], 16) if quick else ([1024, 2048, 2048, 10], 512)
    return mlp_workload("mlp_wide", f"MLP {'-'.join(map(str, sizes))}, batch {batch}",
                        sizes, batch, key)


def make_deep_mlp(quick, key):
    depth, width, batch = (5, 8, 4) if quick else (50, 64, 32)
    w = mlp_workload("deep_mlp", f"{depth}-layer MLP, width {width}, batch {batch}",
                     [width] * depth + [10], batch, key)
    return w


def make_per_example(quick, key):
    sizes, batch = ([8, 16, 4], 4) if quick else ([64, 256, 256, 10], 64)
    params = dense_init(key, sizes)
    data = classification_batch(jax.random.fold_in(key, 1), batch, sizes[0], sizes[-1])

    def loss1(p, ex):  # one example
        return cross_entropy(mlp_apply(p, ex["x"][None]), ex["y"][None])

    def grad_fn(grad):
        def per_example_mean(p, b):  # per-example gradients, then (as DP-SGD would) reduce
            g = jax.vmap(grad(loss1), in_axes=(None, 0))(p, b)
            return jax.tree_util.tree_map(lambda t: jnp.mean(t, 0), g)
        return per_example_mean

    return Workload("per_example", f"per-example grads (vmap), MLP {'-'.join(map(str, sizes))},"
                    f" batch {batch}", params, data, loss1, grad_fn=grad_fn)


def conv(x, w, b):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def make_cnn(quick, key):
    from sklearn.datasets import load_digits

    c1, c2, batch = (2, 4, 8) if quick else (16, 32, 128)
    digits = load_digits()
    x = (digits.images[:batch] / 16.0).astype(np.float32)[..., None]  # N, 8, 8, 1
    batch_data = dict(x=jnp.asarray(x), y=jnp.asarray(digits.target[:batch].astype(np.int32)))
    k1, k2, k3 = jax.random.split(key, 3)
    params = dict(c1=jax.random.normal(k1, (3, 3, 1, c1)) * math.sqrt(2 / 9), b1=jnp.zeros(c1),
                  c2=jax.random.normal(k2, (3, 3, c1, c2)) * math.sqrt(2 / (9 * c1)),
                  b2=jnp.zeros(c2),
                  w=jax.random.normal(k3, (4 * c2, 10)) * math.sqrt(1 / (4 * c2)),
                  b=jnp.zeros(10))

    def loss(p, b):
        h = jax.nn.relu(conv(b["x"], p["c1"], p["b1"]))
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # 4×4
        h = jax.nn.relu(conv(h, p["c2"], p["b2"]))
        h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4  # 2×2
        return cross_entropy(h.reshape(h.shape[0], -1) @ p["w"] + p["b"], b["y"])

    return Workload("cnn", f"CNN on 8×8 digits (conv {c1}, max-pool, conv {c2}, avg-pool), "
                    f"batch {batch}", params, batch_data, loss)


def layer_norm(x, g, b, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * g + b


def make_transformer(quick, key):
    vocab, blocks, batch, length, width, heads = ((32, 1, 2, 8, 16, 2) if quick else
                                                  (256, 4, 8, 64, 128, 4))
    keys = iter(jax.random.split(key, 4 + 6 * blocks))
    normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / math.sqrt(fan_in)  # noqa: E731
    params = dict(embed=normal((vocab, width), 1.0) * 0.02,
                  pos=normal((length, width), 1.0) * 0.02,
                  ln_g=jnp.ones(width), ln_b=jnp.zeros(width),
                  blocks=[dict(ln1_g=jnp.ones(width), ln1_b=jnp.zeros(width),
                               qkv=normal((width, 3 * width), width),
                               proj=normal((width, width), width),
                               ln2_g=jnp.ones(width), ln2_b=jnp.zeros(width),
                               fc1=normal((width, 4 * width), width), fc1_b=jnp.zeros(4 * width),
                               fc2=normal((4 * width, width), 4 * width), fc2_b=jnp.zeros(width))
                          for _ in range(blocks)])
    tokens = jax.random.randint(next(keys), (batch, length + 1), 0, vocab)
    data = dict(x=tokens[:, :-1], y=tokens[:, 1:])
    mask = jnp.tril(jnp.ones((length, length), bool))

    def attention(blk, h):
        q, k, v = jnp.split(h @ blk["qkv"], 3, axis=-1)
        split = lambda t: t.reshape(batch, length, heads, width // heads)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
        s = jnp.where(mask, s, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
        return o.reshape(batch, length, width) @ blk["proj"]

    def loss(p, b):
        h = p["embed"][b["x"]] + p["pos"]
        for blk in p["blocks"]:
            h = h + attention(blk, layer_norm(h, blk["ln1_g"], blk["ln1_b"]))
            m = jax.nn.gelu(layer_norm(h, blk["ln2_g"], blk["ln2_b"]) @ blk["fc1"] + blk["fc1_b"])
            h = h + m @ blk["fc2"] + blk["fc2_b"]
        logits = layer_norm(h, p["ln_g"], p["ln_b"]) @ p["embed"].T
        return cross_entropy(logits, b["y"])

    return Workload("transformer", f"transformer LM, {blocks} blocks, batch {batch}, "
                    f"length {length}, width {width}", params, data, loss)


def make_lstm(quick, key, steps=None):
    t_len, batch, d_in, hidden = (5, 4, 4, 8) if quick else (50, 32, 32, 128)
    t_len = steps or t_len
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = dict(wx=jax.random.normal(k1, (d_in, 4 * hidden)) / math.sqrt(d_in),
                  wh=jax.random.normal(k2, (hidden, 4 * hidden)) / math.sqrt(hidden),
                  b=jnp.zeros(4 * hidden),
                  out=jax.random.normal(k3, (hidden, d_in)) / math.sqrt(hidden))
    xs = jax.random.normal(k4, (t_len + 1, batch, d_in))
    data = dict(x=xs[:-1], y=xs[1:])  # predict the next input

    def loss(p, b):
        def cell(carry, x):
            h, c = carry
            i, f, g, o = jnp.split(x @ p["wx"] + h @ p["wh"] + p["b"], 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h @ p["out"]

        zeros = jnp.zeros((batch, hidden))
        _, ys = lax.scan(cell, (zeros, zeros), b["x"])
        return jnp.mean(jnp.square(ys - b["y"]))

    return Workload("lstm", f"LSTM via lax.scan, {t_len} steps, batch {batch}, hidden {hidden}",
                    params, data, loss)


def make_data_parallel(quick, key):
    """The small MLP's batch split over a mesh of DP_DEVICES devices (``P('data')``), the
    parameters replicated (``P()``): the same step function, XLA adds the all-reduce."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    sizes, batch = ([8, 16, 16, 4], 16) if quick else ([64, 256, 256, 10], 128)
    w = mlp_workload("data_parallel", f"data parallel, MLP {'-'.join(map(str, sizes))}, batch "
                     f"{batch} over {DP_DEVICES} {jax.default_backend()} devices", sizes, batch,
                     key)
    mesh = jax.make_mesh((DP_DEVICES,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:DP_DEVICES])
    w.params = jax.device_put(w.params, NamedSharding(mesh, P()))
    w.batch = jax.device_put(w.batch, NamedSharding(mesh, P("data")))
    return w


MAKERS = dict(mlp_small=make_mlp_small, mlp_wide=make_mlp_wide, cnn=make_cnn,
              transformer=make_transformer, lstm=make_lstm, deep_mlp=make_deep_mlp,
              per_example=make_per_example, data_parallel=make_data_parallel)


def data_parallel_in_subprocess(args) -> dict:
    """The data_parallel row measured by this script in a fresh process with DP_DEVICES
    simulated CPU devices (the device count is fixed when JAX starts)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--only", "data_parallel", "--no-extras",
               "--devices", str(DP_DEVICES), "--out", tmp, "--rounds", str(args.rounds),
               "--target-ms", str(args.target_ms)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            err = dict(error="error: " + "".join(proc.stderr.strip().splitlines()[-1:])[:120])
            return dict(title=f"data parallel over {DP_DEVICES} devices", **{m: err for m in METRICS})
        return json.loads((Path(tmp) / "benchmark.json").read_text())["workloads"][
            "data_parallel"]


# -- the step both engines run -------------------------------------------------------------
def make_step(w: Workload, grad, opt):
    """A *fresh* SGD step function (a new closure each call: jit's caches cannot hit)."""
    grad_fn = w.grad_fn(grad)

    def step(params, opt_state, batch):
        g = grad_fn(params, batch)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


# -- timing --------------------------------------------------------------------------------
def abba(run_a, run_b, rounds, budget_s=float("inf"), min_rounds=4):
    """Alternate A B B A A B …; ``run_x()`` returns seconds. Ratio per round is b / a.

    Stops early (after at least ``min_rounds``) once ``budget_s`` seconds have passed."""
    ta, tb = [], []
    start = time.perf_counter()
    for r in range(rounds):
        if r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        if r % 2 == 0:
            ta.append(run_a())
            tb.append(run_b())
        else:
            tb.append(run_b())
            ta.append(run_a())
    return summarize(ta, tb)


def summarize(ta, tb):
    ratios = sorted(b / a for a, b in zip(ta, tb))
    q = (lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))])  # noqa: E731
    return dict(ratio=statistics.median(ratios), q25=q(0.25), q75=q(0.75),
                jax_s=statistics.median(ta), jaxprop_s=statistics.median(tb), rounds=len(ratios))


def repeats_for(seconds_per_call: float, target_ms: float) -> int:
    return max(1, int(round(target_ms / 1e3 / max(seconds_per_call, 1e-7))))


def timed(fn, reps):
    """Seconds per call of ``fn`` (its result blocked on), over ``reps`` calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / reps


def rule_error(exc: Exception) -> str:
    if isinstance(exc, MissingRuleError):
        m = re.search(r"primitive '([^']+)'", str(exc))
        return f"missing rule: {m.group(1) if m else '?'}"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def guarded(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (one failing metric must not stop the run)
        return dict(error=rule_error(exc))


# -- the four measurements ------------------------------------------------------------------
def bench_step(w, opt, args, compiled):
    states = {}
    for name in ENGINES:
        states[name] = [w.params, opt.init(w.params)]

    def runner(name, reps):
        fn = compiled[name]
        state = states[name]

        def run():
            t0 = time.perf_counter()
            p, s = state
            for _ in range(reps):
                p, s = fn(p, s, w.batch)
            jax.block_until_ready(p)
            state[:] = [p, s]
            return (time.perf_counter() - t0) / reps
        return run

    once = min(runner(n, 1)() for n in ENGINES for _ in range(2))  # warm up
    reps = repeats_for(once, args.target_ms)
    res = abba(runner("jax", reps), runner("jaxprop", reps), args.rounds, BUDGET_S)
    return dict(res, reps=reps)


def bench_compile(w, opt, args, compiled):
    """Trace + compile a fresh step per round; leaves the last executables in ``compiled``."""
    opt_state = opt.init(w.params)
    split = {"jax": ([], []), "jaxprop": ([], [])}

    def runner(name):
        def run():
            step = make_step(w, ENGINES[name], opt)  # fresh function: no cache hit
            t0 = time.perf_counter()
            lowered = jax.jit(step).lower(w.params, opt_state, w.batch)
            t1 = time.perf_counter()
            compiled[name] = lowered.compile()
            t2 = time.perf_counter()
            split[name][0].append(t1 - t0)
            split[name][1].append(t2 - t1)
            return t2 - t0
        return run

    if not args.quick:  # warm up the tracing caches of the library code both engines call
        for name, grad in ENGINES.items():
            jax.jit(make_step(w, grad, opt)).lower(w.params, opt_state, w.batch)
    rounds = 1 if args.quick else max(3, args.rounds // 4)
    res = abba(runner("jax"), runner("jaxprop"), rounds, BUDGET_S, min_rounds=3)
    trace = summarize(split["jax"][0], split["jaxprop"][0])
    res["trace_ratio"], res["trace_jax_s"], res["trace_jaxprop_s"] = (
        trace["ratio"], trace["jax_s"], trace["jaxprop_s"])
    return res


def bench_eager(w, args, out):
    """Eager gradient time; also records jaxprop's largest relative error against jax.grad."""
    fns = {name: (lambda g=w.grad_fn(grad): g(w.params, w.batch)) for name, grad in ENGINES.items()}
    grads = {name: jax.block_until_ready(f()) for name, f in fns.items()}  # warms op caches
    out["grad_rel_err"] = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(jax.tree_util.tree_leaves(grads["jaxprop"]),
                        jax.tree_util.tree_leaves(grads["jax"])))
    once = min(timed(fns[n], 1) for n in ENGINES)
    reps = repeats_for(once, args.target_ms)
    res = abba(lambda: timed(fns["jax"], reps), lambda: timed(fns["jaxprop"], reps),
               1 if args.quick else max(3, args.rounds // 2), BUDGET_S, min_rounds=3)
    return dict(res, reps=reps)


def memory_of(compiled_step):
    m = compiled_step.memory_analysis()
    return dict(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes,
                output=m.output_size_in_bytes,
                peak=m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def bench_memory(compiled):
    mem = {name: memory_of(c) for name, c in compiled.items()}
    return dict(ratio=mem["jaxprop"]["peak"] / mem["jax"]["peak"],
                temp_ratio=mem["jaxprop"]["temp"] / max(mem["jax"]["temp"], 1),
                jax_bytes=mem["jax"], jaxprop_bytes=mem["jaxprop"])


BENCH_OPT = optax.sgd(1e-3)
WIDE: dict = {}  # the wide MLP's workload and compiled steps, for the roofline comparison


def bench_workload(w, args):
    opt = BENCH_OPT
    out = dict(title=w.title)
    if w.flops:
        out["flops"] = w.flops
    compiled = {}
    out["compile"] = guarded(lambda: bench_compile(w, opt, args, compiled))
    if len(compiled) == len(ENGINES):
        if w.name == "mlp_wide":
            WIDE.update(workload=w, compiled=dict(compiled))
        out["step"] = guarded(lambda: bench_step(w, opt, args, compiled))
        out["memory"] = guarded(lambda: bench_memory(compiled))
    else:  # jaxprop could not trace the step: say why in every cell
        out["step"] = out["memory"] = out["compile"]
    out["eager"] = guarded(lambda: bench_eager(w, args, out))
    return out


# -- extras: roofline, scan memory scaling, PyTorch, HIPS autograd -------------------------
def matmul_roofline(args, wide=None):
    """Best GFLOP/s of a large jit-compiled f32 matmul. With ``wide`` (the wide MLP's workload,
    compiled steps and FLOPs), the matmul and both steps are timed in turn, round by round, and
    each step's best time is compared with the matmul's best (the least disturbed runs on a
    shared machine)."""
    n = 256 if args.quick else 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    jax.block_until_ready(f(a, a))
    reps = repeats_for(timed(lambda: f(a, a), 1), args.target_ms)
    matmul = lambda: timed(lambda: f(a, a), reps)  # noqa: E731
    out = dict(n=n)
    if wide is None:
        t = min(matmul() for _ in range(3 if args.quick else 7))  # best = peak
        return dict(out, seconds=t, gflops=2 * n ** 3 / t / 1e9)
    w, compiled, flops = wide
    state = {name: [w.params, BENCH_OPT.init(w.params)] for name in ENGINES}

    def step(name):
        t0 = time.perf_counter()
        p, s = compiled[name](state[name][0], state[name][1], w.batch)
        jax.block_until_ready(p)
        state[name] = [p, s]
        return time.perf_counter() - t0

    rounds = 2 if args.quick else 9
    t_mm, t_step = [], {name: [] for name in ENGINES}
    for r in range(rounds):
        t_mm.append(matmul())
        for name in (ENGINES if r % 2 == 0 else list(ENGINES)[::-1]):
            t_step[name].append(step(name))
    t = min(t_mm)  # best against best: the least disturbed run of each
    return dict(out, seconds=t, gflops=2 * n ** 3 / t / 1e9,
                wide_fraction={name: flops / min(v) / (2 * n ** 3 / t) for name, v in t_step.items()},
                wide_step_best_s={name: min(v) for name, v in t_step.items()})


def scan_memory_scaling(args, lstm_memory):
    """Temp bytes of the compiled LSTM step at T and 2T steps: growth per step, both engines."""
    t1 = 5 if args.quick else 50
    opt = optax.sgd(1e-3)
    temps = {name: [lstm_memory[f"{name}_bytes"]["temp"]] for name in ENGINES}
    w = make_lstm(args.quick, jax.random.PRNGKey(5), steps=2 * t1)
    st = opt.init(w.params)
    for name, grad in ENGINES.items():
        c = jax.jit(make_step(w, grad, opt)).lower(w.params, st, w.batch).compile()
        temps[name].append(memory_of(c)["temp"])
    return {name: dict(steps=[t1, 2 * t1], temp_bytes=v, bytes_per_step=(v[1] - v[0]) / t1)
            for name, v in temps.items()}


def torch_mlp(w):
    import torch

    # One intra-op thread: on a busy 2-core machine PyTorch's OpenMP pool stalls (14-40 ms for
    # this MLP instead of ~2 ms); small ops gain nothing from more threads anyway.
    torch.set_num_threads(1)

    ps = [(torch.tensor(np.asarray(layer["w"]), requires_grad=True),
           torch.tensor(np.asarray(layer["b"]), requires_grad=True)) for layer in w.params]
    x, y = torch.tensor(np.asarray(w.batch["x"])), torch.tensor(np.asarray(w.batch["y"]), dtype=torch.long)

    def grads():
        h = x
        for i, (wt, b) in enumerate(ps):
            h = h @ wt + b
            if i < len(ps) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, y)
        return torch.autograd.grad(loss, [t for pair in ps for t in pair])

    return grads


def autograd_mlp(w):
    import autograd
    import autograd.numpy as anp

    ps = [(np.asarray(layer["w"]), np.asarray(layer["b"])) for layer in w.params]
    x, y = np.asarray(w.batch["x"]), np.asarray(w.batch["y"])

    def loss(ps):
        h = x
        for i, (wt, b) in enumerate(ps):
            h = anp.dot(h, wt) + b
            if i < len(ps) - 1:
                h = anp.maximum(h, 0.0)
        logp = h - anp.max(h, 1, keepdims=True)
        logp = logp - anp.log(anp.sum(anp.exp(logp), 1, keepdims=True))
        return -anp.mean(logp[np.arange(len(y)), y])

    g = autograd.grad(loss)
    try:  # one BLAS thread, like PyTorch above (a busy machine stalls the thread pool)
        from threadpoolctl import threadpool_limits
    except ImportError:
        return lambda: g(ps)

    def one_thread():
        with threadpool_limits(1):
            return g(ps)
    return one_thread


def bench_other_frameworks(args):
    """Eager gradient of the small MLP: jaxprop against PyTorch and HIPS autograd."""
    w = make_mlp_small(args.quick, jax.random.PRNGKey(1))
    ours = lambda g=w.grad_fn(jaxprop.grad): g(w.params, w.batch)  # noqa: E731
    results = {}
    for name, make in (("torch", torch_mlp), ("autograd", autograd_mlp)):
        try:
            theirs = make(w)
        except ImportError:
            results[name] = dict(error="not installed")
            continue
        once = min(min(timed(ours, 1), timed(theirs, 1)) for _ in range(3))
        reps = repeats_for(once, args.target_ms)
        res = abba(lambda: timed(theirs, reps), lambda: timed(ours, reps),
                   max(2, args.rounds // 2))
        results[name] = dict(ratio=res["ratio"], q25=res["q25"], q75=res["q75"],
                             other_s=res["jax_s"], jaxprop_s=res["jaxprop_s"],
                             rounds=res["rounds"], reps=reps)
    return results


# -- while loops: reverse mode with a traced trip count, in C carries -------------------------
def while_problem(quick):
    """A recurrent map h ← tanh(h W + b) run n times, n traced: (params, h0, loss(p, n) as a
    lax.while_loop, step(p, h) for the rewrites)."""
    batch, hidden = (4, 8) if quick else (16, 64)
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    params = dict(w=jax.random.normal(k1, (hidden, hidden)) / math.sqrt(hidden),
                  b=jnp.zeros(hidden))
    h0 = jax.random.normal(k2, (batch, hidden))
    step = lambda p, h: jnp.tanh(h @ p["w"] + p["b"])  # noqa: E731

    def loss(p, n):
        carry = lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, step(p, c[1])), (0, h0))
        return (carry[1] ** 2).sum()
    return params, h0, step, loss


def while_engines(quick, trip_count, n_carries):
    """Gradient functions of the same loop, each taking (params, n): jaxprop on the plain
    while loop, Equinox's checkpointed while loop, and jax.grad of two scan rewrites that
    need the trip count when tracing (all steps' residuals; √-style blocks under
    jax.checkpoint with n_carries carries)."""
    params, h0, step, loss = while_problem(quick)
    engines = {}
    with jaxprop.checkpoints(n_carries):
        engines["jaxprop while"] = jax.jit(jaxprop.grad(loss)).lower(params, trip_count).compile()
    try:
        import equinox.internal as eqxi

        def eqx_loss(p, n):
            carry = eqxi.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, step(p, c[1])),
                                    (0, h0), kind="checkpointed", checkpoints=n_carries)
            return (carry[1] ** 2).sum()
        engines["equinox checkpointed"] = jax.jit(jax.grad(eqx_loss)).lower(
            params, trip_count).compile()
    except ImportError:
        pass
    block = -(-trip_count // n_carries)

    def blocked_loss(p, n):  # the trip count must be static: n is ignored
        inner = jax.checkpoint(lambda h, _: (lax.fori_loop(
            0, block, lambda i, h: step(p, h), h), None))
        h = lax.scan(inner, h0, None, length=trip_count // block)[0]
        h = lax.fori_loop(0, trip_count % block, lambda i, h: step(p, h), h)
        return (h ** 2).sum()

    def scan_loss(p, n):
        return (lax.fori_loop(0, trip_count, lambda i, h: step(p, h), h0) ** 2).sum()
    engines["jax.grad scan, blocks"] = jax.jit(jax.grad(blocked_loss)).lower(
        params, trip_count).compile()
    engines["jax.grad scan"] = jax.jit(jax.grad(scan_loss)).lower(params, trip_count).compile()
    return params, engines


def bench_while_loops(args):
    """Gradient time at one trip count (same C carries for the three checkpointed forms), and
    compiled temp memory against the trip count."""
    quick, n_carries = args.quick, args.checkpoints
    trip_count = 60 if quick else 2000
    params, engines = while_engines(quick, trip_count, n_carries)
    grads = {name: fn(params, trip_count) for name, fn in engines.items()}
    ref = grads["jax.grad scan"]
    calls = {name: (lambda fn=fn: fn(params, trip_count)) for name, fn in engines.items()}
    reps = {name: repeats_for(timed(call, 1), args.target_ms) for name, call in calls.items()}
    samples = {name: [] for name in engines}
    for _ in range(3 if quick else 15):  # engines in turn, so load on the machine hits all
        for name, call in calls.items():
            samples[name].append(timed(call, reps[name]))
    times = {}
    for name in engines:
        err = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30)) for a, b in
                  zip(jax.tree_util.tree_leaves(grads[name]), jax.tree_util.tree_leaves(ref)))
        ordered = sorted(samples[name])
        times[name] = dict(seconds=statistics.median(ordered), q25=ordered[len(ordered) // 4],
                           q75=ordered[(3 * len(ordered)) // 4], grad_rel_err=err,
                           temp_bytes=engines[name].memory_analysis().temp_size_in_bytes)
    memory = {}
    for t in ([10, 1000] if quick else [10, 100, 1000, 10_000, 100_000]):
        _, compiled = while_engines(quick, t, n_carries)
        for name, c in compiled.items():
            memory.setdefault(name, []).append(c.memory_analysis().temp_size_in_bytes)
        memory.setdefault("trip_counts", []).append(t)
    recomputed = {t: jaxprop.checkpointing.recomputed_steps(t, n_carries)
                  for t in memory["trip_counts"]}
    return dict(trip_count=trip_count, checkpoints=n_carries, times=times, memory=memory,
                recomputed=recomputed)


def while_markdown(res):
    if "error" in res:
        return ["", f"While loops: {res['error']}"]
    base = res["times"]["jaxprop while"]["seconds"]
    lines = ["", f"Gradient through a while loop of {res['trip_count']} steps with a traced trip "
             f"count, C = {res['checkpoints']} carries (jax.grad itself raises on the while "
             "loop; the scans need the trip count when tracing):", "",
             "| engine | gradient time [quartiles] | vs jaxprop | temp memory | grad rel. err |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in res["times"].items():
        lines.append(f"| {name} | {fmt_time(r['seconds'])} [{fmt_time(r['q25'])}–"
                     f"{fmt_time(r['q75'])}] | {r['seconds'] / base:.2f}× | "
                     f"{fmt_bytes(r['temp_bytes'])} | {r['grad_rel_err']:.1e} |")
    mem, ts = res["memory"], res["memory"]["trip_counts"]
    lines += ["", "Compiled temp memory against the trip count T (jaxprop re-evaluates R steps "
              "in its backward pass):", "",
              "| T | " + " | ".join(n for n in mem if n != "trip_counts") + " | R (jaxprop) |",
              "| --- " * (len(mem) + 1) + "|"]
    for i, t in enumerate(ts):
        lines.append(f"| {t} | " + " | ".join(fmt_bytes(v[i]) for n, v in mem.items()
                                              if n != "trip_counts")
                     + f" | {res['recomputed'][t]} |")
    return lines


def plot_while_memory(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ts = res["memory"]["trip_counts"]
    for name, v in res["memory"].items():
        if name != "trip_counts":
            ax.loglog(ts, v, "o-", label=name)
    ax.set_xlabel("trip count T")
    ax.set_ylabel("compiled temp memory (bytes)")
    ax.set_title(f"gradient through a while loop, C = {res['checkpoints']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- report --------------------------------------------------------------------------------
def fmt_time(s):
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_bytes(b):
    return f"{b / 2 ** 20:.3g} MiB" if b >= 2 ** 20 else f"{b / 2 ** 10:.3g} KiB"


def cell(res, metric):
    if not isinstance(res, dict) or not res:
        return "—"
    if "error" in res:
        return res["error"]
    if metric == "memory":
        return f"{res['ratio']:.2f}× ({fmt_bytes(res['jax_bytes']['peak'])})"
    spread = f" [{res['q25']:.2f}–{res['q75']:.2f}]" if metric != "compile" else ""
    extra = f", trace {res['trace_ratio']:.2f}×" if metric == "compile" else ""
    return f"{res['ratio']:.2f}×{spread} ({fmt_time(res['jax_s'])}{extra})"


def markdown(report):
    lines = [
        f"Ratios jaxprop / jax.grad (median of per-round ratios, A B B A order; < 1 means "
        f"jaxprop is faster or smaller). In brackets: quartiles of the ratios; in parentheses: "
        f"jax.grad's own figure. Machine: {report['machine']}; {report['date']}.",
        "",
        "| workload | jit SGD step | trace + compile | eager gradient | peak memory | grad rel. err |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if report.get("settings", {}).get("quick"):
        lines[1:1] = ["", QUICK_NOTE]
    for name, res in report["workloads"].items():
        err = res.get("grad_rel_err")
        cells = [res["title"]] + [cell(res.get(m), m) for m in METRICS]
        cells.append("—" if err is None else f"{err:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    ex = report.get("extras", {})
    roof = ex.get("roofline")
    wide = report["workloads"].get("mlp_wide", {})
    if roof and "gflops" in roof and "wide_fraction" in ex:
        lines += ["", f"Matmul roofline: {roof['gflops']:.1f} GFLOP/s (f32 {roof['n']}² matmul, "
                  f"jit). Wide MLP SGD step ({wide['flops'] / 1e9:.3g} GFLOP forward+backward): "
                  f"jaxprop {ex['wide_fraction']['jaxprop']:.0%}, jax.grad "
                  f"{ex['wide_fraction']['jax']:.0%} of the roofline (best times of the matmul and "
                  f"the steps, timed in turn)."]
    elif roof and "gflops" in roof:
        lines += ["", f"Matmul roofline: {roof['gflops']:.1f} GFLOP/s (f32 {roof['n']}² matmul, jit)."]
    scan = ex.get("scan_memory")
    if scan and "error" not in scan:
        lines += ["", "LSTM step temp memory growth per scan step (T → 2T): " + ", ".join(
            f"{n} {fmt_bytes(v['bytes_per_step'])}/step ({fmt_bytes(v['temp_bytes'][0])} at "
            f"T={v['steps'][0]}, {fmt_bytes(v['temp_bytes'][1])} at T={v['steps'][1]})"
            for n, v in scan.items()) + "."]
    others = ex.get("frameworks", {})
    if others:
        parts = []
        for name, r in others.items():
            label = {"torch": "PyTorch", "autograd": "HIPS autograd"}[name]
            if "error" in r:
                parts.append(f"{label}: {r['error']}")
            else:
                parts.append(f"jaxprop / {label} = {r['ratio']:.2f}× [{r['q25']:.2f}–"
                             f"{r['q75']:.2f}] ({label} {fmt_time(r['other_s'])}, jaxprop "
                             f"{fmt_time(r['jaxprop_s'])})")
        lines += ["", "Eager gradient of the small MLP against other frameworks (PyTorch and "
                  "NumPy with one thread): "
                  + "; ".join(parts) + "."]
    if "while_loops" in ex:
        lines += while_markdown(ex["while_loops"])
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4))
    width = 0.8 / len(METRICS)
    labels = dict(step="jit step", compile="trace+compile", eager="eager grad", memory="peak memory")
    for i, m in enumerate(METRICS):
        vals = []
        for n in names:
            r = report["workloads"][n].get(m, {})
            vals.append(r["ratio"] if isinstance(r, dict) and "ratio" in r else np.nan)
        ax.bar(np.arange(len(names)) + (i - (len(METRICS) - 1) / 2) * width, vals, width,
               label=labels[m])
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylabel("jaxprop / jax.grad (log; < 1 is better)")
    ax.set_title("jaxprop vs jax.grad")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_while_section(args):
    """The while-loop section, also written on its own: while_loops.{md,json}, while_memory.png."""
    t0 = time.perf_counter()
    res = guarded(lambda: bench_while_loops(args))
    print(f"[{time.perf_counter() - t0:6.1f}s] while loops", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "while_loops.json").write_text(json.dumps(res, indent=1))
    (args.out / "while_loops.md").write_text("\n".join(while_markdown(res)[1:]) + "\n")
    if "times" in res:
        plot_while_memory(res, args.out / "while_memory.png")
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.while_only:
        res = run_while_section(args)
        print("\n".join(while_markdown(res)))
        return dict(extras=dict(while_loops=res))
    t_start = time.perf_counter()
    report = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        versions=dict(jax=jax.__version__, python=platform.python_version()),
        settings=dict(quick=args.quick, rounds=args.rounds, target_ms=args.target_ms),
        workloads={}, extras={})
    if args.quick:
        print(QUICK_NOTE, flush=True)
    key = jax.random.PRNGKey(0)
    for i, name in enumerate(args.only):
        t0 = time.perf_counter()
        if name == "data_parallel" and len(jax.devices()) < DP_DEVICES:
            report["workloads"][name] = data_parallel_in_subprocess(args)
        else:
            w = MAKERS[name](args.quick, jax.random.fold_in(key, i))
            report["workloads"][name] = bench_workload(w, args)
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: " + ", ".join(
            f"{m} {cell(report['workloads'][name].get(m), m)}" for m in METRICS), flush=True)
    if not args.no_extras:
        ex = report["extras"]
        wide = report["workloads"].get("mlp_wide", {})
        wide_args = ((WIDE["workload"], WIDE["compiled"], wide["flops"])
                     if "compiled" in WIDE and "ratio" in wide.get("step", {}) else None)
        ex["roofline"] = guarded(lambda: matmul_roofline(args, wide_args))
        if "wide_fraction" in ex["roofline"]:
            ex["wide_fraction"] = ex["roofline"].pop("wide_fraction")
            ex["wide_step_best_s"] = ex["roofline"].pop("wide_step_best_s")
        lstm_memory = report["workloads"].get("lstm", {}).get("memory", {})
        if "temp_ratio" in lstm_memory:
            ex["scan_memory"] = guarded(lambda: scan_memory_scaling(args, lstm_memory))
        ex["frameworks"] = bench_other_frameworks(args)
        if not args.no_while:
            ex["while_loops"] = run_while_section(args)
    report["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=1))
    (args.out / "benchmark.md").write_text(markdown(report))
    plot(report, args.out / "benchmark.png")
    print(markdown(report))
    print(f"wrote {args.out}/benchmark.{{md,json,png}} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
