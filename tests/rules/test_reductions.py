"""Reduction and prefix-scan rules against jax.vjp, at orders 1 and 2: ties in max/min, zeros in
products, empty dims, reverse scans, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import jaxprop
from jaxprop.testing import check_vjp

DTYPES = ["float32", "float64"]


@pytest.fixture(params=DTYPES)
def dtype(request):
    """float32, and float64 under x64."""
    if request.param == "float64":
        request.getfixturevalue("x64")
    return jnp.dtype(request.param)


def rand(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def arr(values, dtype=jnp.float32):
    return jnp.asarray(np.asarray(values, np.float64), dtype)


TIES = [[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 0.0, 5.0]]
ZEROS = [[1.5, 0.0, 2.0, -1.0], [0.0, 3.0, 0.0, 2.0], [0.5, -2.0, 1.5, 1.0]]  # one / two 0s


# -- sum -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1), ()])
def test_reduce_sum(axes, dtype):
    check_vjp(lambda x: lax.reduce_sum(x, axes) * 2, rand((3, 4), dtype), order=2)


def test_reduce_sum_empty_and_bfloat16():
    check_vjp(lambda x: jnp.sum(x, 0), jnp.zeros((0, 3)), order=2)
    check_vjp(lambda x: jnp.mean(x ** 2, 1), rand((3, 4), jnp.bfloat16), order=2)


# -- max / min -------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
@pytest.mark.parametrize("reduce", [jnp.max, jnp.min], ids=["max", "min"])
def test_max_min_ties_share_equally(reduce, axes, dtype):
    """JAX divides ct equally among the tied extrema (here 2, 3 and 4-way ties)."""
    x = arr(TIES, dtype)
    f = lambda x: reduce(x, axis=axes)
    assert {"reduce_max", "reduce_min"} & {e.primitive.name
                                          for e in jax.make_jaxpr(f)(x).jaxpr.eqns}
    check_vjp(f, x, order=2)
    check_vjp(f, rand((3, 4), dtype), order=2)


def test_max_tie_values():
    g = jaxprop.grad(lambda x: jnp.max(x))(arr([1.0, 3.0, 3.0, 3.0]))
    np.testing.assert_allclose(g, [0, 1 / 3, 1 / 3, 1 / 3])


def test_max_min_edge_shapes():
    check_vjp(lambda x: jnp.max(x, 0), jnp.zeros((3, 0)), order=2)
    check_vjp(lambda x: jnp.max(x), jnp.asarray(2.0), order=2)
    check_vjp(lambda x: jnp.min(x, 1), arr([[-np.inf, 1.0], [np.inf, np.inf]]), order=2)
    check_vjp(lambda x: jnp.max(x, 1), arr(TIES, jnp.bfloat16), order=2)


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), data=st.data())
def test_max_hypothesis(shape, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    x = jnp.round(rand(tuple(shape)) * 2) / 2      # coarse values: frequent ties
    check_vjp(lambda x: jnp.max(x, axis=axes), x, order=2)


def test_argmax_and_max_mixed():
    """argmax/argmin are integer-valued (no node); indexing by them and max still work."""
    x = arr(TIES)
    f = lambda x: jnp.max(x, 1) * x[jnp.arange(3), jnp.argmax(x, 1)] + x[0, jnp.argmin(x[0])]
    check_vjp(f, x, order=2)
    check_vjp(f, rand((3, 4)), order=2)


def test_boolean_reductions_have_no_gradient():
    f = lambda x: jnp.where(jnp.all(x > -5), x, -x) + jnp.any(x > 0) * x ** 2
    check_vjp(f, rand((3, 4)), order=2)


# -- product ---------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
def test_reduce_prod_zeros(axes, dtype):
    """Rows with one 0 (the 0 gets the product of the others) and with two 0s (all get 0)."""
    f = lambda x: jnp.prod(x, axis=axes)
    check_vjp(f, arr(ZEROS, dtype), order=2)
    check_vjp(f, rand((3, 4), dtype), order=2)
    check_vjp(f, jnp.zeros((3, 4), dtype), order=2)


def test_reduce_prod_edge_shapes():
    check_vjp(lambda x: jnp.prod(x, 0), jnp.zeros((0, 3)), order=2)    # empty product = 1
    check_vjp(lambda x: jnp.prod(x, 1), jnp.zeros((3, 0)), order=2)
    check_vjp(lambda x: jnp.prod(x), jnp.asarray(0.0), order=2)
    check_vjp(lambda x: jnp.prod(x, (0, 2)), rand((2, 3, 2)), order=2)
    check_vjp(lambda x: jnp.prod(x, 1), arr(ZEROS, jnp.bfloat16), order=2)


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), data=st.data())
def test_prod_hypothesis(shape, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    x = jnp.round(rand(tuple(shape)))              # integers: plenty of zeros
    check_vjp(lambda x: jnp.prod(x, axis=axes), x, order=2)


# -- prefix scans ----------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
def test_cumsum(axis, reverse, dtype):
    check_vjp(lambda x: lax.cumsum(x, axis, reverse=reverse) ** 2, rand((3, 4), dtype), order=2)


@pytest.mark.parametrize("reverse", [False, True])
def test_cumprod_zeros(reverse, dtype):
    f = lambda x: lax.cumprod(x, 1, reverse=reverse)
    check_vjp(f, arr(ZEROS, dtype), order=2)
    check_vjp(f, rand((3, 4), dtype), order=2)
    check_vjp(lambda x: jnp.cumprod(x, 0), arr(ZEROS, dtype), order=2)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("op", [lax.cummax, lax.cummin], ids=["cummax", "cummin"])
def test_cummax_cummin_ties(op, reverse, dtype):
    """Ties are shared as in JAX, whose JVP differentiates the parallel prefix scan."""
    f = lambda x: op(x, 1, reverse=reverse)
    check_vjp(f, arr(TIES, dtype), order=2)
    check_vjp(f, rand((3, 5), dtype), order=2)
    check_vjp(lambda x: op(x, 0, reverse=reverse), jnp.ones((5, 2), dtype), order=2)


@pytest.mark.parametrize("reverse", [False, True])
def test_cumlogsumexp(reverse, dtype):
    f = lambda x: lax.cumlogsumexp(x, 1, reverse=reverse)
    check_vjp(f, rand((3, 5), dtype), order=2)
    check_vjp(f, 40 * rand((2, 4), dtype, 1), order=2)          # no overflow


def test_scans_edge_shapes_and_bfloat16():
    for op in [lax.cumsum, lax.cumprod, lax.cummax, lax.cumlogsumexp]:
        check_vjp(lambda x: op(x, 0), jnp.zeros((0, 2)), order=2)
        check_vjp(lambda x: op(x, 0), rand((1,)), order=2)
    check_vjp(lambda x: jnp.cumsum(x, 1), rand((2, 4), jnp.bfloat16), order=2)
    check_vjp(lambda x: lax.cummax(x, 1), arr(TIES, jnp.bfloat16), order=2)


def test_scans_under_jit_and_vmap():
    x = arr(ZEROS)
    f = lambda x: jnp.sum(jnp.sin(lax.cumprod(x, 1)) + lax.cummax(x, 0) ** 2)
    np.testing.assert_allclose(jax.jit(jaxprop.grad(f))(x), jax.grad(f)(x), rtol=1e-6)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(jaxprop.grad(f))(xs), jax.vmap(jax.grad(f))(xs),
                               rtol=1e-6)
