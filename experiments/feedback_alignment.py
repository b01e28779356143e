"""Feedback alignment vs backprop on the digits MLP (scikit-learn's 8×8 digits).

    python experiments/feedback_alignment.py            # ~1 min on 2 cores
    python experiments/feedback_alignment.py --quick    # smoke run for the tests

Feedback alignment (Lillicrap et al., 2016) sends the error down through fixed random
matrices B instead of the transposed weights Wᵀ. jaxprop changes that one rule and nothing
else: the hidden layers call ``jaxprop.feedback_alignment(h, W, B)`` (forward ``h @ W``,
backward ``ct @ Bᵀ`` to ``h``, the usual ``hᵀ ct`` to ``W``). The same model with backprop
uses ``h @ W``. Both train with the same seed, batches and SGD.

It prints the final test accuracy of each, and plots the test accuracy per epoch and the
angle between the feedback-alignment update of the first layer and the true gradient
(the "alignment": it falls below 90° as the forward weights learn to agree with B).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxprop

parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    epilog="Both models share the seed, the initial weights, the batches and the SGD settings; "
           "only the backward rule of the hidden layers differs.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--epochs", type=int, default=60,
                    help="passes over the training set (75 %% of the 1797 digits), for each of "
                         "the two models")
parser.add_argument("--hidden", type=int, default=128,
                    help="width of each of the two hidden layers (64-H-H-10 MLP, tanh)")
parser.add_argument("--batch", type=int, default=32, help="examples per SGD step")
parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (no momentum)")
parser.add_argument("--seed", type=int, default=0,
                    help="seed of the train/test split, the initial weights, the fixed feedback "
                         "matrices B and the batch order")
parser.add_argument("--out", default="experiments/results/feedback_alignment.png",
                    help="where to write the plot (accuracy per epoch and alignment angle)")
parser.add_argument("--quick", action="store_true",
                    help="smoke run for the tests: 3 epochs, hidden width 32, no plot")
args = parser.parse_args()
if args.quick:
    args.epochs, args.hidden = 3, 32

# -- data ------------------------------------------------------------------------------------
digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    digits.data / 16.0, digits.target, test_size=0.25, random_state=args.seed)
x_train, x_test = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)
y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)
sizes = [64, args.hidden, args.hidden, 10]

# -- model -------------------------------------------------------------------------------------
keys = jax.random.split(jax.random.key(args.seed), 2 * len(sizes))
init = {f"w{i}": jax.random.normal(keys[i], (a, b)) / np.sqrt(a)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
init.update({f"b{i}": jnp.zeros(b) for i, b in enumerate(sizes[1:])})
feedback = {f"w{i}": jax.random.normal(keys[len(sizes) + i], (a, b)) / np.sqrt(a)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def forward(params, x, mode):
    h = x
    for i in range(len(sizes) - 1):
        w, b = params[f"w{i}"], params[f"b{i}"]
        z = (jaxprop.feedback_alignment(h, w, feedback[f"w{i}"]) if mode == "fa" else h @ w) + b
        h = jnp.tanh(z) if i < len(sizes) - 2 else z
    return h


def loss(params, x, y, mode):
    logits = forward(params, x, mode)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(forward(params, x, "bp"), axis=1) == y)


@jax.jit
def epoch(params, perm, mode_is_fa):
    """One pass over the training set in minibatches; returns new params and the angle (°)
    between the feedback-alignment and backprop gradients of the first layer at the start."""
    g_fa = jaxprop.grad(loss)(params, x_train, y_train, "fa")["w0"]
    g_bp = jaxprop.grad(loss)(params, x_train, y_train, "bp")["w0"]
    cos = jnp.sum(g_fa * g_bp) / (jnp.linalg.norm(g_fa) * jnp.linalg.norm(g_bp))
    angle = jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
    n = perm.shape[0] // args.batch
    batches = perm[: n * args.batch].reshape(n, args.batch)

    def step(p, idx):
        x, y = x_train[idx], y_train[idx]
        g = jax.lax.cond(mode_is_fa, lambda: jaxprop.grad(loss)(p, x, y, "fa"),
                         lambda: jaxprop.grad(loss)(p, x, y, "bp"))
        return jax.tree_util.tree_map(lambda a, b: a - args.lr * b, p, g), None

    params, _ = jax.lax.scan(step, params, batches)
    return params, angle


def train(mode):
    params, curve, angles = init, [], []
    rng = np.random.default_rng(args.seed)
    for _ in range(args.epochs):
        perm = jnp.asarray(rng.permutation(x_train.shape[0]))
        params, angle = epoch(params, perm, mode == "fa")
        curve.append(float(accuracy(params, x_test, y_test)))
        angles.append(float(angle))
    return curve, angles


start = time.time()
bp_curve, _ = train("bp")
fa_curve, fa_angles = train("fa")
print(f"backprop            test accuracy {bp_curve[-1]:.3f}")
print(f"feedback alignment  test accuracy {fa_curve[-1]:.3f}")
print(f"FA update vs true gradient of layer 1: {fa_angles[0]:.0f}° at the start, "
      f"{fa_angles[-1]:.0f}° at the end  ({time.time() - start:.0f} s)")

if not args.quick:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = np.arange(1, args.epochs + 1)
    ax1.plot(epochs, bp_curve, label="backprop (Wᵀ)")
    ax1.plot(epochs, fa_curve, label="feedback alignment (random B)")
    ax1.set(xlabel="epoch", ylabel="test accuracy", title="digits MLP 64-%d-%d-10"
            % (args.hidden, args.hidden))
    ax1.legend()
    ax2.plot(epochs, fa_angles, color="C1")
    ax2.axhline(90, color="gray", lw=0.8, ls="--")
    ax2.set(xlabel="epoch", ylabel="degrees", title="FA update vs gradient, layer 1")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")
