"""Models others wrote (Flax linen, Equinox): jaxprop.grad equals jax.grad, under jit and
eagerly on every call (the eager fast paths: compiled sweeps, deferred custom JVPs, cached
scans)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop

nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def both_grads(loss, *args):
    ours = jax.jit(jaxprop.grad(loss))(*args)
    theirs = jax.jit(jax.grad(loss))(*args)
    return ours, theirs


def assert_eager_grads_match(loss, *args, calls=jaxprop.eager.WARMUP + 2):
    """Eagerly, the first (per node) and later (compiled sweep) calls all equal jax.grad."""
    theirs = jax.grad(loss)(*args)
    compiled = jaxprop.eager.STATS["compiled"]
    for _ in range(calls):
        assert_trees_close(jaxprop.grad(loss)(*args), theirs)
    assert jaxprop.eager.STATS["compiled"] > compiled


# -- Flax linen ---------------------------------------------------------------------------
class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), padding="SAME")(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(8, (3, 3), strides=(1, 1), padding="VALID")(x)
        x = nn.avg_pool(x, (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(10)(x)


def test_flax_cnn_batchnorm_dropout():
    model = CNN()
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    y = jnp.arange(4) % 10
    variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, False)

    def loss(params, batch_stats, x, y):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, True,
                                rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    assert_trees_close(*both_grads(loss, variables["params"], variables["batch_stats"], x, y))
    assert_eager_grads_match(loss, variables["params"], variables["batch_stats"], x, y)


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h, _):
        a = nn.SelfAttention(num_heads=2, qkv_features=self.width)(nn.LayerNorm()(h))
        h = h + a
        h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(h))))
        return h, None


class Transformer(nn.Module):
    width: int = 16
    depth: int = 2

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(11, self.width)(tokens)
        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=self.depth)
        h, _ = stack(self.width)(h, None)
        return nn.Dense(11)(nn.LayerNorm()(h))


@pytest.mark.slow
def test_flax_transformer_scan_remat():
    model = Transformer()
    tokens = jnp.arange(2 * 6).reshape(2, 6) % 11
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, tokens[..., None], -1)[..., 0])

    assert_trees_close(*both_grads(loss, params, tokens))
    assert_eager_grads_match(loss, params, tokens)


# -- Equinox --------------------------------------------------------------------------------
def eqx_loss(model, x, y):
    pred = jax.vmap(model)(x)
    return jnp.mean((pred - y) ** 2)


def eqx_grads(model, x, y):
    params, static = eqx.partition(model, eqx.is_array)
    loss = lambda p, x, y: eqx_loss(eqx.combine(p, static), x, y)
    return both_grads(loss, params, x, y)


def eqx_eager(model, x, y):
    params, static = eqx.partition(model, eqx.is_array)
    loss = lambda p, x, y: eqx_loss(eqx.combine(p, static), x, y)
    assert_eager_grads_match(loss, params, x, y)


def test_equinox_mlp():
    model = eqx.nn.MLP(3, 2, 16, 2, activation=jax.nn.silu, key=jax.random.key(0))
    x, y = jax.random.normal(jax.random.key(1), (5, 3)), jnp.ones((5, 2))
    assert_trees_close(*eqx_grads(model, x, y))
    eqx_eager(model, x, y)


def test_equinox_conv():
    model = eqx.nn.Sequential([eqx.nn.Conv2d(1, 4, 3, key=jax.random.key(0)),
                               eqx.nn.Lambda(jnp.tanh),
                               eqx.nn.Conv2d(4, 2, 3, stride=2, key=jax.random.key(1))])
    x = jax.random.normal(jax.random.key(2), (3, 1, 8, 8))
    y = jnp.zeros((3, 2, 2, 2))
    assert_trees_close(*eqx_grads(model, x, y))


class LSTMModel(eqx.Module):
    cell: eqx.nn.LSTMCell
    head: eqx.nn.Linear

    def __call__(self, xs):
        def step(carry, x):
            carry = self.cell(x, carry)
            return carry, None

        init = (jnp.zeros(self.cell.hidden_size), jnp.zeros(self.cell.hidden_size))
        (h, _), _ = jax.lax.scan(step, init, xs)
        return self.head(h)


def test_equinox_lstm_scan():
    k1, k2 = jax.random.split(jax.random.key(0))
    model = LSTMModel(eqx.nn.LSTMCell(3, 8, key=k1), eqx.nn.Linear(8, 2, key=k2))
    x, y = jax.random.normal(jax.random.key(1), (4, 7, 3)), jnp.ones((4, 2))
    assert_trees_close(*eqx_grads(model, x, y))
    eqx_eager(model, x, y)
