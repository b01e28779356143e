"""sort (single and multi-operand, num_keys, stable ties), argsort-based indexing, top_k and
approx_top_k against jax.vjp at orders 1 and 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop.testing import check_vjp

RNG = np.random.default_rng(2)


def normal(*shape, dtype="float32"):
    return jnp.asarray(RNG.normal(size=shape), dtype)


def check(f, *args, orders=(1, 2)):
    tol = 1e-5 if jnp.result_type(args[0]) == jnp.float32 else 1e-12
    for order in orders:
        check_vjp(f, *args, order=order, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,axis", [((7,), -1), ((3, 5), -1), ((3, 5), 0), ((2, 3, 4), 1),
                                        ((0, 4), -1), ((1,), 0)])
def test_sort(shape, axis):
    check(lambda x: jnp.sort(x, axis=axis), normal(*shape))


def test_sort_float64(x64):
    check(lambda x: jnp.sort(x, axis=0), normal(4, 3, dtype="float64"))


def test_sort_descending_and_ties():
    """Ties keep their order (stable sort): the cotangent goes back to the same positions."""
    x = jnp.asarray([2.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    check(jnp.sort, x)
    check(lambda x: jnp.sort(x, descending=True), x)
    check(lambda x: jnp.sort(x) * jnp.arange(6.0), x)


def test_sort_multiple_operands():
    """Keys and payloads: every float operand gets its cotangent unpermuted."""
    a, b, c = normal(6), normal(6), normal(6)
    check(lambda a, b: lax.sort((a, b), num_keys=1), a, b)
    check(lambda a, b, c: lax.sort((a, b, c), num_keys=2), jnp.round(a), b, c)
    k = jnp.asarray([3, 1, 2, 0, 5, 4])
    check(lambda b: lax.sort((k, b), num_keys=1)[1], b)          # integer key, float payload


def test_sort_unstable():
    check(lambda x: lax.sort(x, is_stable=False), normal(5))


def test_argsort_and_take_along_axis():
    x = normal(3, 5)
    check(lambda x: jnp.take_along_axis(x, jnp.argsort(x, axis=1), axis=1), x)


def test_median_and_quantile():
    x = normal(7)
    check(jnp.median, x)
    check(lambda x: jnp.quantile(x, jnp.asarray([0.1, 0.5, 0.9])), x)


def test_sort_under_jit_and_vmap():
    loss = lambda x: jnp.sum(jnp.sort(x) * jnp.arange(5.0))
    x = normal(3, 5)
    np.testing.assert_allclose(jax.jit(jax.vmap(jaxprop.grad(loss)))(x),
                               jax.vmap(jax.grad(loss))(x), rtol=1e-6)


# -- top_k --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,k", [((6,), 2), ((3, 5), 5), ((2, 3, 4), 1)])
def test_top_k(shape, k):
    check(lambda x: lax.top_k(x, k), normal(*shape))


def test_top_k_ties_and_axis():
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    check(lambda x: lax.top_k(x, 2)[0], x)
    check(lambda x: lax.top_k(x, 2, axis=0)[0], normal(4, 3))


def test_top_k_float64(x64):
    check(lambda x: lax.top_k(x, 3)[0], normal(2, 5, dtype="float64"))


def test_approx_max_min_k():
    x = normal(3, 8)
    check(lambda x: lax.approx_max_k(x, 3)[0], x)
    check(lambda x: lax.approx_min_k(x, 2, reduction_dimension=0)[0], x)
