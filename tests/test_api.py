"""The public API against JAX's: signatures, pytrees, composition, errors."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop
from jaxprop.testing import random_like


def mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def loss(params, batch):
    x, y = batch
    logits = mlp(params, x)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n))
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


@pytest.fixture
def problem():
    params = init(jax.random.key(0), [5, 16, 16, 3])
    x = jax.random.normal(jax.random.key(1), (8, 5))
    y = jax.nn.one_hot(jnp.arange(8) % 3, 3)
    return params, (x, y)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.shape(u) == np.shape(v)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# -- the seeds' first example ----------------------------------------------------------------
def test_add_mul_graph_matches_seed_numbers():
    grads = jaxprop.grad(lambda x, y, z: (x + y) * z, argnums=(0, 1, 2))(-2.0, 5.0, -4.0)
    assert [float(g) for g in grads] == [-4.0, -4.0, 3.0]


def test_copy_gate_sums_not_averages():
    # x feeds two nodes: its gradient is the SUM of both downstream gradients.
    g = jaxprop.grad(lambda x: x * 3.0 + x * 5.0)(1.0)
    assert float(g) == 8.0


# -- drop-in equality with jax.grad ----------------------------------------------------------
def test_grad_mlp_matches_jax(problem):
    params, batch = problem
    assert_trees_close(jaxprop.grad(loss)(params, batch), jax.grad(loss)(params, batch))


def test_value_and_grad_has_aux_argnums(problem):
    params, batch = problem

    def f(p, b, scale):
        value = loss(p, b) * scale
        return value, {"value": value, "n": 3}

    ours = jaxprop.value_and_grad(f, argnums=(0, 2), has_aux=True)(params, batch, 2.0)
    theirs = jax.value_and_grad(f, argnums=(0, 2), has_aux=True)(params, batch, 2.0)
    assert_trees_close(ours, theirs)


def test_negative_argnums():
    f = lambda a, b: a * b ** 2
    assert float(jaxprop.grad(f, argnums=-1)(3.0, 2.0)) == float(jax.grad(f, argnums=-1)(3.0, 2.0))


class Pair(NamedTuple):
    w: jax.Array
    b: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    w: jax.Array
    b: jax.Array


@pytest.mark.parametrize("make", [
    lambda w, b: {"w": w, "b": b},
    lambda w, b: [w, b],
    lambda w, b: (w, (b,)),
    lambda w, b: Pair(w, b),
    lambda w, b: Linear(w, b),
])
def test_pytree_params(make):
    w, b = jnp.arange(6.0).reshape(2, 3) / 7, jnp.ones(3)
    params = make(w, b)

    def f(p):
        ws = jax.tree_util.tree_leaves(p)
        return jnp.sum(jnp.tanh(jnp.ones((4, 2)) @ ws[-1] if ws[-1].ndim == 2 else ws[-1])
                       * jnp.sum(ws[0]))

    assert_trees_close(jaxprop.grad(f)(params), jax.grad(f)(params))


def test_python_control_flow_on_concrete_values():
    def f(x):
        if x > 0:  # concrete under jaxprop, as under jax.grad
            return x ** 3
        return -x

    assert float(jaxprop.grad(f)(2.0)) == 12.0
    assert float(jaxprop.grad(f)(-2.0)) == -1.0


def test_constant_output_has_zero_gradient():
    g = jaxprop.grad(lambda x, y: y * 2.0, argnums=0)(jnp.ones(3), 1.0)
    np.testing.assert_array_equal(g, jnp.zeros(3))


def test_unused_input_in_pytree_gets_zeros():
    g = jaxprop.grad(lambda p: p["a"] * 2.0)({"a": 1.0, "b": jnp.ones(2)})
    np.testing.assert_array_equal(g["b"], jnp.zeros(2))
    assert float(g["a"]) == 2.0


# -- vjp, jacrev, hessian ----------------------------------------------------------------------
def test_vjp_matches_jax_and_passes_through_jit():
    f = lambda x, y: (jnp.sin(x) * y, {"z": x @ y})
    x, y = jnp.linspace(-1, 1, 4), jnp.linspace(0.5, 2, 4)
    out, pull = jaxprop.vjp(f, x, y)
    out_j, pull_j = jax.vjp(f, x, y)
    ct = random_like(out_j, 3)
    assert_trees_close(out, out_j)
    assert_trees_close(pull(ct), pull_j(ct))
    assert_trees_close(jax.jit(lambda p, c: p(c))(pull, ct), pull_j(ct))


def test_vjp_fn_returned_from_jit():
    f = lambda x: jnp.tanh(x) * x
    _, pull = jax.jit(lambda x: jaxprop.vjp(f, x))(jnp.arange(3.0))
    _, pull_j = jax.vjp(f, jnp.arange(3.0))
    assert_trees_close(pull(jnp.ones(3)), pull_j(jnp.ones(3)))


def test_vjp_has_aux():
    out, pull, aux = jaxprop.vjp(lambda x: (x * 2, x + 1), 3.0, has_aux=True)
    assert float(aux) == 4.0 and float(pull(1.0)[0]) == 2.0


@pytest.mark.parametrize("argnums", [0, (0, 1)])
def test_jacrev_matches_jax(argnums):
    f = lambda x, y: {"a": jnp.sin(x) * y[0], "b": jnp.outer(x, y)}
    x, y = jnp.linspace(-1, 1, 3), jnp.array([0.5, 2.0])
    assert_trees_close(jaxprop.jacrev(f, argnums)(x, y), jax.jacrev(f, argnums)(x, y))


def test_hessian_matches_jax():
    f = lambda x: jnp.sum(jnp.sin(x) * x[::-1] ** 2) if False else jnp.sum(jnp.sin(x) * x ** 3)
    x = jnp.linspace(-1, 1, 4)
    assert_trees_close(jaxprop.hessian(f)(x), jax.hessian(f)(x), rtol=1e-5, atol=1e-5)


# -- composition -----------------------------------------------------------------------------
def test_jit_of_grad(problem):
    params, batch = problem
    assert_trees_close(jax.jit(jaxprop.grad(loss))(params, batch), jax.grad(loss)(params, batch))


def test_grad_of_jitted_function(problem):
    params, batch = problem
    jitted = jax.jit(loss)
    assert_trees_close(jaxprop.grad(jitted)(params, batch), jax.grad(loss)(params, batch))


def test_vmap_per_example_gradients(problem):
    params, (x, y) = problem
    per_example = lambda p, xi, yi: loss(p, (xi[None], yi[None]))
    ours = jax.vmap(jaxprop.grad(per_example), in_axes=(None, 0, 0))(params, x, y)
    theirs = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(params, x, y)
    assert_trees_close(ours, theirs)


def test_grad_of_grad_of_grad():
    f = lambda x: jnp.sin(x) * jnp.exp(x / 3)
    ours = jaxprop.grad(jaxprop.grad(jaxprop.grad(f)))(0.7)
    theirs = jax.grad(jax.grad(jax.grad(f)))(0.7)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_jvp_of_grad_is_hvp(problem):
    params, batch = problem
    v = random_like(params, 5)
    ours = jax.jvp(jaxprop.grad(loss), (params, batch), (v, random_like(batch, 6)))[1]
    theirs = jax.jvp(jax.grad(loss), (params, batch), (v, random_like(batch, 6)))[1]
    assert_trees_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_jit_vmap_grad_of_grad():
    f = lambda x: jnp.tanh(x) ** 2
    ours = jax.jit(jax.vmap(jaxprop.grad(jaxprop.grad(f))))(jnp.linspace(-2, 2, 5))
    theirs = jax.vmap(jax.grad(jax.grad(f)))(jnp.linspace(-2, 2, 5))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_mixed_nesting_with_jax_grad():
    f = lambda x: jnp.sin(x) * x
    np.testing.assert_allclose(jax.grad(jaxprop.grad(f))(0.3), jax.grad(jax.grad(f))(0.3),
                               rtol=1e-6)
    np.testing.assert_allclose(jaxprop.grad(jax.grad(f))(0.3), jax.grad(jax.grad(f))(0.3),
                               rtol=1e-6)


# -- errors ----------------------------------------------------------------------------------
def test_non_scalar_output_error():
    with pytest.raises(TypeError, match="scalar-output"):
        jaxprop.grad(lambda x: x * 2)(jnp.ones(3))


def test_integer_input_error_and_allow_int():
    with pytest.raises(TypeError, match="allow_int"):
        jaxprop.grad(lambda x: x * 2.0)(3)
    g = jaxprop.grad(lambda x, n: x * n, argnums=(0, 1), allow_int=True)(2.0, 3)
    assert float(g[0]) == 3.0 and g[1].dtype == jax.dtypes.float0


def test_complex_output_error():
    with pytest.raises(TypeError, match="holomorphic"):
        jaxprop.grad(lambda x: x * 1j)(1.0)


def test_missing_rule_error_names_primitive_and_line():
    prim = jax.extend.core.Primitive("my_unknown_op")
    prim.def_impl(lambda x: x * 2)
    prim.def_abstract_eval(lambda x: x)
    with pytest.raises(jaxprop.MissingRuleError) as err:
        jaxprop.grad(lambda x: prim.bind(x))(1.0)  # THIS LINE
    msg = str(err.value)
    assert "my_unknown_op" in msg and "defvjp" in msg
    assert "test_api.py" in msg


def test_user_registered_rule():
    prim = jax.extend.core.Primitive("triple_op")
    prim.def_impl(lambda x: x * 3)
    prim.def_abstract_eval(lambda x: x)
    jaxprop.defvjp("triple_op", lambda ct, out, x: ct * 3.0)
    assert float(jaxprop.grad(lambda x: prim.bind(x) * x)(2.0)) == 12.0


def test_leaked_tracer_error():
    leaked = []

    def f(x):
        leaked.append(x)
        return x * 2.0

    jaxprop.grad(f)(1.0)
    with pytest.raises(Exception, match="(?i)escape|leak|unexpected tracer"):
        jnp.sin(leaked[0])


def test_cotangent_structure_error():
    _, pull = jaxprop.vjp(lambda x: (x, x), 1.0)
    with pytest.raises(ValueError, match="structure"):
        pull(1.0)
