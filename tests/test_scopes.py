"""Hooks by where a value is computed: jax.named_scope / Flax module paths, jaxprop.scoped.

Each hooked gradient is compared with what it must be: doubling the cotangent of what a
block sends out doubles the gradients of everything below that block (its own parameters
and the earlier layers') and leaves the layers above unchanged.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprop
from jaxprop.scopes import scope_matches

X = jax.random.normal(jax.random.key(1), (4, 3))


def double(ct):
    return 2 * ct


def test_scope_patterns():
    assert scope_matches("block1", "MLP/block1/dense")
    assert scope_matches("MLP/block1", "MLP/block1")
    assert scope_matches("MLP/block*", "MLP/block2/dense")
    assert not scope_matches("block1", "MLP/block10")
    assert not scope_matches("MLP/dense", "MLP/block1/dense")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(3, name="dense")(x))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block(name="block1")(x)
        x = Block(name="block2")(x)
        return nn.Dense(2, name="head")(x)


LINEN = MLP()
PARAMS = LINEN.init(jax.random.key(0), X)


def linen_loss(p):
    return jnp.sum(jax.nn.softplus(LINEN.apply(p, X)) ** 2)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_scope_hook_on_a_flax_linen_module(mode):
    seen = []

    def fn(ct):
        seen.append(ct)
        return 2 * ct

    grad = jaxprop.grad(jaxprop.scope_hook("MLP/block2", fn)(linen_loss))
    g = (jax.jit(grad) if mode == "jit" else grad)(PARAMS)["params"]
    ref = jax.grad(linen_loss)(PARAMS)["params"]
    for name, factor in (("block1", 2.0), ("block2", 2.0), ("head", 1.0)):
        for a, b in zip(jax.tree.leaves(g[name]), jax.tree.leaves(ref[name])):
            np.testing.assert_allclose(a, factor * b, rtol=1e-5, atol=1e-7)
    h1 = Block().apply({"params": PARAMS["params"]["block1"]}, X)
    h2 = Block().apply({"params": PARAMS["params"]["block2"]}, h1)
    head = lambda h: jnp.sum(jax.nn.softplus(nn.Dense(2).apply(  # noqa: E731
        {"params": PARAMS["params"]["head"]}, h)) ** 2)
    assert len(seen) == 1
    if mode == "eager":                              # fn saw ∂L/∂(block2's output)
        np.testing.assert_allclose(seen[0], jax.grad(head)(h2), rtol=1e-5, atol=1e-7)


def test_scope_hook_that_matches_nothing_warns():
    with pytest.warns(jaxprop.ScopeWarning, match="scope matching 'MLP/block9'"):
        with jaxprop.scope_hook("MLP/block9", double) as hook:
            jaxprop.grad(linen_loss)(PARAMS)
    assert not hook.matched


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.dense(x))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.block1, self.block2 = NnxBlock(rngs), NnxBlock(rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.block2(self.block1(x)))


def test_scope_hook_on_a_flax_nnx_module_given_a_scope():
    model = NnxMLP(nnx.Rngs(0))
    model.block1 = jaxprop.scoped(model.block1, "block1")      # nnx pushes no scope itself
    graphdef, state = nnx.split(model)

    def loss(state):
        return jnp.sum(jax.nn.softplus(nnx.merge(graphdef, state)(X)) ** 2)

    with jaxprop.scope_hook("block1", double):
        g = jaxprop.grad(loss)(state)
    ref = jax.grad(loss)(state)
    for key, factor in (("block1", 2.0), ("block2", 1.0), ("head", 1.0)):
        for a, b in zip(jax.tree.leaves(g[key]), jax.tree.leaves(ref[key])):
            np.testing.assert_allclose(a, factor * b, rtol=1e-5, atol=1e-7)


def test_scope_hook_on_an_equinox_model_given_a_scope():
    model = eqx.nn.MLP(3, 2, 5, 2, activation=jnp.tanh, key=jax.random.key(0))
    scoped = eqx.tree_at(lambda m: m.layers[1], model, jaxprop.scoped(model.layers[1], "b1"))
    np.testing.assert_allclose(jax.vmap(scoped)(X), jax.vmap(model)(X))
    loss = lambda m: jnp.sum(jax.vmap(m)(X) ** 2)  # noqa: E731
    with jaxprop.scope_hook("b1", double):
        g = jaxprop.filter_grad(loss)(scoped)
    ref = eqx.filter_grad(loss)(model)
    pairs = [(g.layers[0], ref.layers[0], 2.0), (g.layers[1].inner, ref.layers[1], 2.0),
             (g.layers[2], ref.layers[2], 1.0)]
    for ours, theirs, factor in pairs:
        np.testing.assert_allclose(ours.weight, factor * theirs.weight, rtol=1e-5, atol=1e-7)


def test_override_by_flax_module_path():
    """tanh of block1 only gets the identity rule: the same as jax.grad of the model with
    that tanh replaced by x + stop_gradient(tanh(x) - x)."""
    identity = jaxprop.vjp_rule(lambda ct, out, x: ct)
    f = jaxprop.override("tanh", identity, scope="MLP/block1")(linen_loss)
    g = jax.jit(jaxprop.grad(f))(PARAMS)

    class StraightBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            z = nn.Dense(3, name="dense")(x)
            return z + jax.lax.stop_gradient(jnp.tanh(z) - z)

    class Explicit(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = StraightBlock(name="block1")(x)
            x = Block(name="block2")(x)
            return nn.Dense(2, name="head")(x)

    want = jax.grad(lambda p: jnp.sum(jax.nn.softplus(Explicit().apply(p, X)) ** 2))(PARAMS)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
