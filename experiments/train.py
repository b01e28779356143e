"""Train a small network with jaxprop's gradients and optax SGD — the README's main job.

    python experiments/train.py                          # MLP on scikit-learn's digits, ~97-98 %
    python experiments/train.py --task breast_cancer     # binary: one logistic output, BCE
    python experiments/train.py --task diabetes --loss huber --activation selu
    python experiments/train.py --task digits --epochs 40 --resume   # continue a run exactly

Everything runs on bundled or synthetic data (no download). The gradient of every step is
``jaxprop.value_and_grad`` (jaxprop's own tracer, tape and reverse sweep); ``jax.grad`` appears
only in the periodic gradient check and in the reference run drawn on the plot. One epoch is a
``lax.scan`` over SGD steps inside ``jax.jit``; data order is a function of (seed, epoch), so a
run resumed from a checkpoint repeats the uninterrupted run's losses exactly.

Outputs (in --out, default runs/<task>): metrics.jsonl (one JSON line per epoch),
curves.png (loss per step and test metric per epoch, jaxprop solid, jax.grad dashed),
checkpoint.npz (after every epoch). Ctrl-C stops after saving the last complete epoch and
prints the command that resumes the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprop

# -- flags ---------------------------------------------------------------------------------
TASKS = {  # kind, default architecture, epochs, batch size, learning rate, momentum, quick epochs, weight decay
    "digits":          dict(kind="multiclass", arch="128", epochs=30, batch=32, lr=0.05, momentum=0.9, quick=4, wd=3e-3),
    "iris":            dict(kind="multiclass", arch="16", epochs=60, batch=16, lr=0.05, momentum=0.9, quick=15),
    "wine":            dict(kind="multiclass", arch="32", epochs=60, batch=16, lr=0.05, momentum=0.9, quick=10),
    "breast_cancer":   dict(kind="binary", arch="32", epochs=40, batch=32, lr=0.02, momentum=0.9, quick=5),
    "multilabel":      dict(kind="multilabel", arch="64", epochs=12, batch=32, lr=0.05, momentum=0.9, quick=5),
    "diabetes":        dict(kind="regression", arch="8", epochs=30, batch=32, lr=0.01, momentum=0.9, quick=10),
    "digits_cnn":      dict(kind="multiclass", arch="cnn", epochs=15, batch=32, lr=0.01, momentum=0.9, quick=2, wd=1e-3),
    "seq_transformer": dict(kind="sequence", arch="transformer", epochs=15, batch=64, lr=0.05, momentum=0.9, quick=1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a model with jaxprop gradients and optax SGD (whole epoch jit-compiled).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="per-task defaults (override with the flags):\n" + "\n".join(
            f"  {name:16s} arch {t['arch']:12s} epochs {t['epochs']:3d} (--quick {t['quick']}), "
            f"batch {t['batch']}, lr {t['lr']}, momentum {t['momentum']}, weight decay {t.get('wd', 0)}"
            for name, t in TASKS.items()))
    p.add_argument("--task", default="digits", choices=sorted(TASKS),
                   help="dataset and objective: digits/iris/wine (softmax, cross-entropy), "
                        "breast_cancer (1 logistic output, BCE), multilabel (1 logistic per label), "
                        "diabetes (regression, linear output), digits_cnn (small CNN), "
                        "seq_transformer (sort a token sequence with a small transformer); default digits")
    p.add_argument("--arch", default=None,
                   help="hidden layer sizes of the MLP, e.g. '64,64' ('' = linear model), or 'cnn' "
                        "(digits only) or 'transformer' (seq_transformer only); default per task")
    p.add_argument("--activation", default="relu", choices=["relu", "selu", "tanh"],
                   help="hidden activation (default relu)")
    p.add_argument("--loss", default="mse", choices=["mse", "mae", "huber"],
                   help="regression loss (diabetes only; default mse); huber uses delta=1 on standardized targets")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training set (default per task)")
    p.add_argument("--steps", type=int, default=None,
                   help="train for at least this many SGD steps (rounded up to whole epochs); overrides --epochs")
    p.add_argument("--batch-size", type=int, default=None, help="examples per SGD step (default per task)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per task)")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (0 = plain SGD; default per task)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="L2 weight decay added to the gradient (optax.add_decayed_weights; default per task)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation and data order (default 0; the train/test split is fixed)")
    p.add_argument("--out", default=None, help="output folder (default runs/<task>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.npz; the result equals an uninterrupted run")
    p.add_argument("--quick", action="store_true", help="a tiny run (few epochs) for tests and smoke checks")
    p.add_argument("--no-plot", action="store_true",
                   help="skip the plot and the jax.grad reference run drawn on it")
    p.add_argument("--check-every", type=int, default=5,
                   help="every K epochs compare jaxprop's gradient with jax.grad's on the current batch "
                        "and print the largest difference (default 5; 0 = never)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    spec = TASKS[args.task]
    args.kind = spec["kind"]
    args.arch = spec["arch"] if args.arch is None else args.arch
    args.batch_size = args.batch_size or spec["batch"]
    args.lr = spec["lr"] if args.lr is None else args.lr
    args.momentum = spec["momentum"] if args.momentum is None else args.momentum
    args.weight_decay = spec.get("wd", 0.0) if args.weight_decay is None else args.weight_decay
    args.epochs = args.epochs or (spec["quick"] if args.quick else spec["epochs"])
    args.out = Path(args.out or Path("runs") / args.task)
    if args.arch == "cnn" and args.task not in ("digits", "digits_cnn"):
        p.error("--arch cnn needs image data: --task digits or digits_cnn")
    if (args.arch == "transformer") != (args.task == "seq_transformer"):
        p.error("--task seq_transformer goes with --arch transformer, and only it")
    if args.loss != "mse" and args.kind != "regression":
        p.error("--loss applies to the regression task (diabetes) only")
    return args




# -- data ----------------------------------------------------------------------------------
def load_task(task: str) -> dict:
    """Fixed train/test split, features standardized with the training statistics."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if task == "seq_transformer":  # sort a sequence of 8 tokens from a 10-token vocabulary
        rng = np.random.default_rng(0)
        x = rng.integers(0, 10, size=(4096 + 512, 8)).astype(np.int32)
        y = np.sort(x, axis=1)
        return dict(x_train=x[:4096], y_train=y[:4096], x_test=x[4096:], y_test=y[4096:],
                    n_out=10, name="sort 8 tokens (vocab 10), synthetic")
    if task == "multilabel":
        x, y = datasets.make_multilabel_classification(
            n_samples=1000, n_features=20, n_classes=5, n_labels=2, random_state=0)
        name = "make_multilabel_classification (20 features, 5 labels)"
    else:
        loader = {"digits": datasets.load_digits, "digits_cnn": datasets.load_digits,
                  "iris": datasets.load_iris, "wine": datasets.load_wine,
                  "breast_cancer": datasets.load_breast_cancer,
                  "diabetes": datasets.load_diabetes}[task]
        x, y = loader(return_X_y=True)
        name = loader.__name__.removeprefix("load_")
    kind = TASKS[task]["kind"]
    stratify = y if kind in ("multiclass", "binary") else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=stratify)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = np.where(std > 0, std, 1.0)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if kind == "regression":  # train on standardized targets; R² does not depend on the scale
        y_mean, y_std = y_tr.mean(), y_tr.std()
        y_tr, y_te = (y_tr - y_mean) / y_std, (y_te - y_mean) / y_std
        y_tr, y_te, n_out = y_tr[:, None].astype(np.float32), y_te[:, None].astype(np.float32), 1
    elif kind == "multiclass":
        y_tr, y_te, n_out = y_tr.astype(np.int32), y_te.astype(np.int32), int(y.max()) + 1
    elif kind == "binary":
        y_tr, y_te, n_out = y_tr[:, None].astype(np.float32), y_te[:, None].astype(np.float32), 1
    else:  # multilabel
        y_tr, y_te, n_out = y_tr.astype(np.float32), y_te.astype(np.float32), y.shape[1]
    x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, n_out=n_out, name=name)


# -- models (plain jax.numpy; params are dicts and lists) ------------------------------------
ACTIVATIONS = {"relu": jax.nn.relu, "selu": jax.nn.selu, "tanh": jnp.tanh}


def init_mlp(key, sizes: list[int], activation: str) -> list[dict]:
    """He-normal weights for ReLU, LeCun-normal for SELU/tanh; zero biases."""
    gain = 2.0 if activation == "relu" else 1.0
    keys = jax.random.split(key, len(sizes) - 1)
    return [dict(w=jax.random.normal(k, (m, n)) * math.sqrt(gain / m), b=jnp.zeros(n))
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params: list[dict], x, activation: str = "relu"):
    act = ACTIVATIONS[activation]
    for layer in params[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def init_cnn(key, n_out: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return dict(c1=jax.random.normal(k1, (3, 3, 1, 16)) * math.sqrt(2 / 9),
                b1=jnp.zeros(16),
                c2=jax.random.normal(k2, (3, 3, 16, 32)) * math.sqrt(2 / (9 * 16)),
                b2=jnp.zeros(32),
                w=jax.random.normal(k3, (2 * 2 * 32, n_out)) * math.sqrt(1 / 128),
                b=jnp.zeros(n_out))


def max_pool(x):
    """2×2 max pooling with stride 2 (NHWC)."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def cnn(params: dict, x, activation: str = "relu"):
    """8×8×1 → conv3×3(16) → ReLU → pool → conv3×3(32) → ReLU → pool → dense."""
    act = ACTIVATIONS[activation]
    x = x.reshape(x.shape[0], 8, 8, 1)
    dims = ("NHWC", "HWIO", "NHWC")
    x = max_pool(act(lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dims)
                     + params["b1"]))
    x = max_pool(act(lax.conv_general_dilated(x, params["c2"], (1, 1), "SAME", dimension_numbers=dims)
                     + params["b2"]))
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


D_MODEL, HEADS, LAYERS, SEQ_LEN, VOCAB = 32, 2, 2, 8, 10


def init_transformer(key, n_out: int) -> dict:
    keys = iter(jax.random.split(key, 3 + 6 * LAYERS))
    normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / math.sqrt(fan_in)  # noqa: E731
    ln = lambda: dict(g=jnp.ones(D_MODEL), b=jnp.zeros(D_MODEL))  # noqa: E731
    blocks = [dict(ln1=ln(), wq=normal((D_MODEL, D_MODEL), D_MODEL), wk=normal((D_MODEL, D_MODEL), D_MODEL),
                   wv=normal((D_MODEL, D_MODEL), D_MODEL), wo=normal((D_MODEL, D_MODEL), D_MODEL),
                   ln2=ln(), w1=normal((D_MODEL, 4 * D_MODEL), D_MODEL), b1=jnp.zeros(4 * D_MODEL),
                   w2=normal((4 * D_MODEL, D_MODEL), 4 * D_MODEL), b2=jnp.zeros(D_MODEL))
              for _ in range(LAYERS)]
    return dict(embed=normal((VOCAB, D_MODEL), 1), pos=normal((SEQ_LEN, D_MODEL), 1),
                blocks=blocks, ln_f=ln(), unembed=normal((D_MODEL, n_out), D_MODEL))


def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * p["g"] + p["b"]


def transformer(params: dict, tokens, activation: str = "relu"):
    """Pre-LN encoder: embedding + position, LAYERS × (self-attention, MLP), per-token logits."""
    act = ACTIVATIONS[activation]
    n, length = tokens.shape
    x = params["embed"][tokens] + params["pos"]                       # (n, L, d)
    for blk in params["blocks"]:
        h = layer_norm(x, blk["ln1"])
        split = lambda t: t.reshape(n, length, HEADS, D_MODEL // HEADS)  # noqa: E731
        q, k, v = split(h @ blk["wq"]), split(h @ blk["wk"]), split(h @ blk["wv"])
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(D_MODEL // HEADS)
        attn = jax.nn.softmax(scores, axis=-1)
        x = x + jnp.einsum("nhqk,nkhd->nqhd", attn, v).reshape(n, length, D_MODEL) @ blk["wo"]
        h = layer_norm(x, blk["ln2"])
        x = x + act(h @ blk["w1"] + blk["b1"]) @ blk["w2"] + blk["b2"]
    return layer_norm(x, params["ln_f"]) @ params["unembed"]


def build_model(args, n_in: int, n_out: int):
    """(init(key) -> params, apply(params, x) -> outputs, description)."""
    if args.arch == "cnn":
        return (lambda key: init_cnn(key, n_out)), cnn, "CNN conv3x3(16)-pool-conv3x3(32)-pool-dense"
    if args.arch == "transformer":
        return ((lambda key: init_transformer(key, n_out)), transformer,
                f"transformer {LAYERS} layers, d={D_MODEL}, {HEADS} heads")
    hidden = [int(h) for h in args.arch.split(",") if h.strip()]
    sizes = [n_in, *hidden, n_out]
    return ((lambda key: init_mlp(key, sizes, args.activation)), mlp,
            f"MLP {'-'.join(map(str, sizes))} ({args.activation})")


# -- losses and metrics ----------------------------------------------------------------------
def make_loss(kind: str, apply, activation: str, regression_loss: str = "mse"):
    """loss(params, x, y) -> scalar, the mean over the batch."""
    def loss(params, x, y):
        out = apply(params, x, activation)
        if kind in ("multiclass", "sequence"):   # softmax + cross-entropy
            logp = jax.nn.log_softmax(out, axis=-1)
            return -jnp.mean(jnp.sum(jax.nn.one_hot(y, out.shape[-1]) * logp, axis=-1))
        if kind in ("binary", "multilabel"):     # logistic + binary cross-entropy, −y log σ − (1−y) log(1−σ)
            return jnp.mean(jax.nn.softplus(out) - y * out)
        r = out - y                              # regression
        if regression_loss == "mae":
            return jnp.mean(jnp.abs(r))
        if regression_loss == "huber":           # ½r² for |r| ≤ 1, |r| − ½ beyond
            a = jnp.abs(r)
            return jnp.mean(jnp.where(a <= 1.0, 0.5 * r ** 2, a - 0.5))
        return jnp.mean(r ** 2)
    return loss


METRIC_NAMES = {"multiclass": "accuracy", "binary": "accuracy", "multilabel": "label accuracy",
                "regression": "R²", "sequence": "token accuracy"}


def make_metric(kind: str, apply, activation: str):
    def metric(params, x, y):
        out = apply(params, x, activation)
        if kind in ("multiclass", "sequence"):
            return jnp.mean(jnp.argmax(out, -1) == y)
        if kind in ("binary", "multilabel"):
            return jnp.mean((out > 0) == (y > 0.5))
        return 1.0 - jnp.sum((out - y) ** 2) / jnp.sum((y - y.mean()) ** 2)
    return metric


# -- training: one jit-compiled epoch = lax.scan over SGD steps --------------------------------
def epoch_key(seed: int, epoch: int):
    """Data order depends only on (seed, epoch): what makes --resume exact."""
    return jax.random.fold_in(jax.random.key(seed), 1_000_003 + epoch)


def batch_indices(key, n: int, batch_size: int):
    steps = n // batch_size
    return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size)


def make_epoch(loss, value_and_grad, optimizer, batch_size: int):
    """epoch(params, opt_state, x, y, key) -> (params, opt_state, per-step losses), jitted."""
    def step(carry, idx, x, y):
        params, opt_state = carry
        value, grads = value_and_grad(loss)(params, x[idx], y[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    @jax.jit
    def epoch(params, opt_state, x, y, key):
        idx = batch_indices(key, x.shape[0], batch_size)
        (params, opt_state), losses = lax.scan(lambda c, i: step(c, i, x, y), (params, opt_state), idx)
        return params, opt_state, losses
    return epoch


def make_grad_check(loss):
    """max |jaxprop.grad − jax.grad| and max |jax.grad| over all parameters, on one batch."""
    @jax.jit
    def check(params, x, y):
        ours, theirs = jaxprop.grad(loss)(params, x, y), jax.grad(loss)(params, x, y)
        diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), ours, theirs)
        size = jax.tree.map(lambda b: jnp.max(jnp.abs(b)), theirs)
        return jnp.max(jnp.stack(jax.tree.leaves(diff))), jnp.max(jnp.stack(jax.tree.leaves(size)))
    return check


# -- checkpoints: one .npz (flattened pytree + JSON metadata), written atomically -------------
CHECKPOINT_FORMAT = "jaxprop-train-checkpoint-v1"


def save_checkpoint(path: Path, state, meta: dict) -> None:
    """Write leaves and metadata to a temporary file in the same folder, then os.replace it."""
    leaves = jax.tree.leaves(state)
    meta = dict(meta, format=CHECKPOINT_FORMAT, num_leaves=len(leaves))
    arrays = {f"leaf_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, template):
    """(state shaped like ``template``, metadata); SystemExit with the reason if unusable."""
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}. Run once without --resume "
                         "(or point --out at the run's folder).")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r}")
            leaves = [data[f"leaf_{i:04d}"] for i in range(meta["num_leaves"])]
    except Exception as e:  # zip, CRC, JSON and key errors all mean the same to the user
        raise SystemExit(f"--resume: checkpoint {path} is corrupt or unreadable "
                         f"({type(e).__name__}: {e}). Delete it or run without --resume.") from e
    expected, treedef = jax.tree.flatten(template)
    for i, (got, want) in enumerate(zip(leaves, expected)):
        if got.shape != np.shape(want) or got.dtype != want.dtype:
            raise SystemExit(f"--resume: checkpoint {path} does not match this model: leaf {i} is "
                             f"{got.dtype}{list(got.shape)}, expected {want.dtype}{list(np.shape(want))}.")
    if len(leaves) != len(expected):
        raise SystemExit(f"--resume: checkpoint {path} has {len(leaves)} arrays, this model needs "
                         f"{len(expected)}: it was written by another configuration.")
    return jax.tree.unflatten(treedef, [jnp.asarray(leaf) for leaf in leaves]), meta


# -- plot -------------------------------------------------------------------------------------
def draw_curves(history: list[dict], metric_name: str, title: str):
    """The figure: train loss per SGD step and test loss per epoch (left), test metric (right).
    Per-epoch values are drawn with markers, so even a 1-epoch run shows its points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))

    def per_step(key):  # step losses at fractional epochs: epoch e's steps lie in (e-1, e]
        xs, ys = [], []
        for h in history:
            n = len(h[key])
            xs += [h["epoch"] - 1 + (i + 1) / n for i in range(n)]
            ys += h[key]
        return xs, ys

    ax1.plot(*per_step("step_losses"), "C0-", lw=0.8, label="train loss per step (jaxprop)")
    ax1.plot(epochs, [h["test_loss"] for h in history], "C1o-", ms=4, label="test loss (jaxprop)")
    ax2.plot(epochs, [h["test_metric"] for h in history], "C0o-", ms=4,
             label=f"test {metric_name} (jaxprop)")
    if all("ref_step_losses" in h for h in history):
        ax1.plot(*per_step("ref_step_losses"), "k--", lw=0.8, label="train loss per step (jax.grad)")
        ax1.plot(epochs, [h["ref_test_loss"] for h in history], "kx:", lw=1, label="test loss (jax.grad)")
        ax2.plot(epochs, [h["ref_test_metric"] for h in history], "kx--", lw=1,
                 label=f"test {metric_name} (jax.grad)")
    ax1.set(xlabel="epoch", ylabel="loss", yscale="log", title=title)
    ax2.set(xlabel="epoch", ylabel=metric_name, title=f"test {metric_name}")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    return fig


def plot(history: list[dict], metric_name: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = draw_curves(history, metric_name, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same flags plus --resume."""
    flags = [a for a in argv if a != "--resume"] + ["--resume"]
    return " ".join(["python", shlex.quote(sys.argv[0] or "experiments/train.py")]
                    + [shlex.quote(a) for a in flags])


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from tqdm import tqdm

    start_time = time.perf_counter()
    data = load_task(args.task)
    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
    n_train = x_train.shape[0]
    if not 0 < args.batch_size <= n_train:
        raise SystemExit(f"--batch-size must be between 1 and the training set size ({n_train})")
    steps_per_epoch = n_train // args.batch_size
    if args.steps:
        args.epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    n_in = int(np.prod(x_train.shape[1:]))
    init, apply, model_name = build_model(args, n_in, data["n_out"])
    loss = make_loss(args.kind, apply, args.activation, args.loss)
    metric = make_metric(args.kind, apply, args.activation)
    metric_name = METRIC_NAMES[args.kind]
    optimizer = optax.sgd(args.lr, momentum=args.momentum or None)
    if args.weight_decay:
        optimizer = optax.chain(optax.add_decayed_weights(args.weight_decay), optimizer)
    overlay = not args.no_plot

    params = init(jax.random.key(args.seed))
    n_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    state = dict(params=params, opt_state=optimizer.init(params))
    if overlay:   # the jax.grad reference run starts from the same point
        state["ref_params"], state["ref_opt_state"] = params, optimizer.init(params)
    config = dict(task=args.task, arch=args.arch, activation=args.activation, loss=args.loss,
                  batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                  weight_decay=args.weight_decay, seed=args.seed,
                  overlay=overlay)

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = args.out / "checkpoint.npz", args.out / "metrics.jsonl"
    history, start_epoch = [], 0
    if args.resume:
        state, meta = load_checkpoint(ckpt_path, state)
        if meta["config"] != config:
            diff = {k: (meta["config"].get(k), v) for k, v in config.items() if meta["config"].get(k) != v}
            raise SystemExit(f"--resume: checkpoint {ckpt_path} was written with other settings "
                             f"(checkpoint, now): {diff}")
        history, start_epoch = meta["history"], meta["epoch"]
    with open(metrics_path, "w") as f:   # rewritten so it always matches the checkpoint
        f.writelines(json.dumps(h) + "\n" for h in history)

    epoch_fn = make_epoch(loss, jaxprop.value_and_grad, optimizer, args.batch_size)
    ref_epoch_fn = make_epoch(loss, jax.value_and_grad, optimizer, args.batch_size) if overlay else None
    evaluate = jax.jit(lambda p, x, y: (loss(p, x, y), metric(p, x, y)))
    grad_check = make_grad_check(loss)
    grad_diffs = []

    bar = tqdm(range(start_epoch, args.epochs), desc=args.task, unit="epoch", initial=start_epoch,
               total=args.epochs, disable=args.no_progress, file=sys.stderr)
    saved = dict(state=dict(state), epoch=start_epoch)   # the last complete epoch's state
    try:
        for epoch in bar:
            key = epoch_key(args.seed, epoch)
            record = dict(epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch)
            if args.check_every and epoch % args.check_every == 0:
                idx = batch_indices(key, n_train, args.batch_size)[0]
                diff, size = map(float, grad_check(state["params"], x_train[idx], y_train[idx]))
                grad_diffs.append(diff)
                record["grad_check_max_abs_diff"] = diff
                bar.write(f"epoch {epoch + 1:4d}: max |jaxprop.grad - jax.grad| = {diff:.3g}  "
                          f"(max |grad| = {size:.3g})")
            state["params"], state["opt_state"], losses = epoch_fn(
                state["params"], state["opt_state"], x_train, y_train, key)
            test_loss, test_metric = evaluate(state["params"], x_test, y_test)
            record.update(train_loss=float(losses.mean()), test_loss=float(test_loss),
                          test_metric=float(test_metric), step_losses=[float(v) for v in losses])
            if overlay:
                state["ref_params"], state["ref_opt_state"], ref_losses = ref_epoch_fn(
                    state["ref_params"], state["ref_opt_state"], x_train, y_train, key)
                ref_test_loss, ref_test_metric = evaluate(state["ref_params"], x_test, y_test)
                record.update(ref_train_loss=float(ref_losses.mean()), ref_test_loss=float(ref_test_loss),
                              ref_test_metric=float(ref_test_metric),
                              ref_step_losses=[float(v) for v in ref_losses])
            history.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_path, state, dict(config=config, epoch=epoch + 1, history=history))
            saved.update(state=dict(state), epoch=epoch + 1)
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", **{metric_name: f"{record['test_metric']:.4f}"})
    except KeyboardInterrupt:  # Ctrl-C: keep the last complete epoch and say how to go on
        bar.close()
        save_checkpoint(ckpt_path, saved["state"], dict(config=config, epoch=saved["epoch"],
                                                        history=history[:saved["epoch"]]))
        if overlay and saved["epoch"]:
            plot(history[:saved["epoch"]], metric_name, f"{args.task}: {model_name}",
                 args.out / "curves.png")
        print(f"\ninterrupted: checkpoint of epoch {saved['epoch']}/{args.epochs} saved in "
              f"{ckpt_path}\nresume with: {resume_command(argv)}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()

    if overlay and history:
        plot(history, metric_name, f"{args.task}: {model_name}", args.out / "curves.png")
    wall = time.perf_counter() - start_time
    last = history[-1] if history else {}
    summary = dict(task=args.task, dataset=data["name"], n_train=n_train, n_test=int(x_test.shape[0]),
                   model=model_name, n_params=n_params, epochs=args.epochs,
                   steps=args.epochs * steps_per_epoch, final_train_loss=last.get("train_loss"),
                   final_step_loss=(last.get("step_losses") or [None])[-1],
                   test_loss=last.get("test_loss"), metric_name=metric_name,
                   test_metric=last.get("test_metric"), ref_test_metric=last.get("ref_test_metric"),
                   max_grad_diff=max(grad_diffs) if grad_diffs else None,
                   wall_time_s=wall, resumed_from_epoch=start_epoch if args.resume else None,
                   out=str(args.out))
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    print(f"dataset    {data['name']}: {n_train} train / {summary['n_test']} test")
    print(f"model      {model_name}, {n_params:,} parameters")
    print(f"optimizer  optax.sgd(lr={args.lr}, momentum={args.momentum})"
          + (f" + weight decay {args.weight_decay}" if args.weight_decay else "")
          + f", batch {args.batch_size}, seed {args.seed}")
    print(f"steps      {summary['steps']} ({args.epochs} epochs x {steps_per_epoch})"
          + (f", resumed at epoch {start_epoch}" if args.resume else ""))
    print(f"final      train loss {fmt(summary['final_train_loss'], '.4f')}, test loss "
          f"{fmt(summary['test_loss'], '.4f')}, test {metric_name} {fmt(summary['test_metric'], '.4f')}")
    if overlay:
        print(f"jax.grad   reference run: test {metric_name} {fmt(summary['ref_test_metric'], '.4f')}")
    if grad_diffs:
        print(f"grad check max |jaxprop.grad - jax.grad| over {len(grad_diffs)} checks: {max(grad_diffs):.3g}")
    print(f"wall time  {wall:.1f} s")
    print(f"outputs    {args.out}/ (metrics.jsonl, checkpoint.npz{', curves.png' if overlay else ''})")
    return summary


if __name__ == "__main__":
    main()
