"""jaxprop.filter_grad / filter_value_and_grad / filter_vjp against Equinox's own."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxprop

MODEL = eqx.nn.MLP(3, 2, 8, 2, activation=jax.nn.softplus, key=jax.random.key(0))
X = jax.random.normal(jax.random.key(1), (5, 3))


def loss(model, x, scale):
    return scale * jnp.mean(jax.vmap(model)(x) ** 2)


def assert_trees_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def test_filter_grad_equals_equinox():
    ours = jaxprop.filter_grad(loss)(MODEL, X, 2.0)
    assert_trees_close(ours, eqx.filter_grad(loss)(MODEL, X, 2.0))
    assert ours.activation is None                     # a function leaf: no gradient


def test_filter_value_and_grad_with_aux_under_jit():
    f = lambda m, x: (loss(m, x, 1.0), jnp.max(x))  # noqa: E731
    (v, aux), g = eqx.filter_jit(jaxprop.filter_value_and_grad(f, has_aux=True))(MODEL, X)
    (v2, aux2), g2 = eqx.filter_value_and_grad(f, has_aux=True)(MODEL, X)
    np.testing.assert_allclose(v, v2, rtol=1e-6)
    np.testing.assert_allclose(aux, aux2)
    assert_trees_close(g, g2)
    g3, aux3 = jaxprop.filter_grad(f, has_aux=True)(MODEL, X)
    assert_trees_close(g3, g2)


def test_filter_vjp_equals_equinox():
    def f(model, x, n):
        return {"y": jax.vmap(model)(x), "n": n, "x2": x * 2}

    out, vjp = jaxprop.filter_vjp(f, MODEL, X, 3)
    out2, vjp2 = eqx.filter_vjp(f, MODEL, X, 3)
    assert out["n"] == 3
    assert_trees_close(out, out2)
    ct = {"y": jnp.ones((5, 2)), "n": None, "x2": jnp.full((5, 3), 0.5)}
    assert_trees_close(vjp(ct), vjp2(ct))
