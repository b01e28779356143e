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
from rulecheck import check, rand
from jaxprop.testing import random_like

def arr(values, dtype=jnp.float32):
    return jnp.asarray(np.asarray(values, np.float64), dtype)


def check_vjp_compiled(f, x, tol=None):
    """check_vjp at orders 1 and 2 with each side compiled by jax.jit: for rules whose eager
    evaluation is many small operations (the prefix scans), one program instead of hundreds."""
    ct, w = random_like(f(x), 1), random_like(x, 2)
    tol = tol or (1e-5 if x.dtype == jnp.float32 else 1e-10)

    def orders(vjp):
        first = lambda x: vjp(f, x)[1](ct)[0]
        second = lambda x: vjp(lambda x: jnp.sum(first(x) * w), x)[1](jnp.ones((), x.dtype))[0]
        return jax.jit(first)(x), jax.jit(second)(x)

    for ours, theirs in zip(orders(jaxprop.vjp), orders(jax.vjp)):
        np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol)


TIES = [[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 0.0, 5.0]]
ZEROS = [[1.5, 0.0, 2.0, -1.0], [0.0, 3.0, 0.0, 2.0], [0.5, -2.0, 1.5, 1.0]]  # one / two 0s


# -- sum -------------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1), ()])
def test_reduce_sum(axes):
    check(lambda x: lax.reduce_sum(x, axes) * 2, rand((3, 4)), order=2)


def test_reduce_sum_x64(x64):
    check(lambda x: lax.reduce_sum(x, (1,)) * 2, rand((3, 4), jnp.float64), order=2)


def test_reduce_sum_empty_and_bfloat16():
    check(lambda x: jnp.sum(x, 0), jnp.zeros((0, 3)), order=2)
    check(lambda x: jnp.mean(x ** 2, 1), rand((3, 4), jnp.bfloat16), order=2)


# -- max / min -------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
@pytest.mark.parametrize("reduce", [jnp.max, jnp.min], ids=["max", "min"])
def test_max_min_ties_share_equally(reduce, axes):
    _max_min_ties(reduce, axes, jnp.float32)


@pytest.mark.parametrize("reduce", [jnp.max, jnp.min], ids=["max", "min"])
def test_max_min_ties_share_equally_x64(reduce, x64):
    _max_min_ties(reduce, (1,), jnp.float64)


def _max_min_ties(reduce, axes, dtype):
    """JAX divides ct equally among the tied extrema (here 2, 3 and 4-way ties)."""
    x = arr(TIES, dtype)
    f = lambda x: reduce(x, axis=axes)
    assert {"reduce_max", "reduce_min"} & {e.primitive.name
                                          for e in jax.make_jaxpr(f)(x).jaxpr.eqns}
    check(f, x, order=2)
    check(f, rand((3, 4), dtype), order=2)


def test_max_tie_values():
    g = jaxprop.grad(lambda x: jnp.max(x))(arr([1.0, 3.0, 3.0, 3.0]))
    np.testing.assert_allclose(g, [0, 1 / 3, 1 / 3, 1 / 3])


def test_max_min_edge_shapes():
    check(lambda x: jnp.max(x, 0), jnp.zeros((3, 0)), order=2)
    check(lambda x: jnp.max(x), jnp.asarray(2.0), order=2)
    # sin(±inf) = nan reaches the rule; whether nan·0 stays nan at the unchosen entry depends
    # on XLA's simplifier, so both engines are compared compiled (jaxprop's eager path runs
    # jnp.min's VJP compiled, as JAX does under jit).
    check_vjp_compiled(lambda x: jnp.sin(jnp.min(x, 1)), arr([[-np.inf, 1.0], [np.inf, np.inf]]))
    check(lambda x: jnp.max(x, 1), arr(TIES, jnp.bfloat16), order=2)


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), data=st.data())
def test_max_hypothesis(shape, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    x = jnp.round(rand(tuple(shape)) * 2) / 2      # coarse values: frequent ties
    check(lambda x: jnp.max(x, axis=axes), x, order=1)  # order 2 in the tests above


def test_argmax_and_max_mixed():
    """argmax/argmin are integer-valued (no node); indexing by them and max still work."""
    x = arr(TIES)
    f = lambda x: jnp.max(x, 1) * x[jnp.arange(3), jnp.argmax(x, 1)] + x[0, jnp.argmin(x[0])]
    check(f, x, order=2)
    check(f, rand((3, 4)), order=2)


def test_boolean_reductions_have_no_gradient():
    f = lambda x: jnp.where(jnp.all(x > -5), x, -x) + jnp.any(x > 0) * x ** 2
    check(f, rand((3, 4)), order=2)


# -- product ---------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
def test_reduce_prod_zeros(axes):
    _prod_zeros(axes, jnp.float32)


def test_reduce_prod_zeros_x64(x64):
    _prod_zeros((1,), jnp.float64)


def _prod_zeros(axes, dtype):
    """Rows with one 0 (the 0 gets the product of the others) and with two 0s (all get 0)."""
    f = lambda x: jnp.prod(x, axis=axes)
    check(f, arr(ZEROS, dtype), order=2)
    check(f, rand((3, 4), dtype), order=2)
    check(f, jnp.zeros((3, 4), dtype), order=2)


def test_reduce_prod_edge_shapes():
    check(lambda x: jnp.prod(x, 0), jnp.zeros((0, 3)), order=2)    # empty product = 1
    check(lambda x: jnp.prod(x, 1), jnp.zeros((3, 0)), order=2)
    check(lambda x: jnp.prod(x), jnp.asarray(0.0), order=2)
    check(lambda x: jnp.prod(x, (0, 2)), rand((2, 3, 2)), order=2)
    check(lambda x: jnp.prod(x, 1), arr(ZEROS, jnp.bfloat16), order=2)


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), data=st.data())
def test_prod_hypothesis(shape, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    x = jnp.round(rand(tuple(shape)))              # integers: plenty of zeros
    check(lambda x: jnp.prod(x, axis=axes), x, order=1)  # order 2 in the tests above


# -- prefix scans ----------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
def test_cumsum(axis, reverse, dtype):
    check(lambda x: lax.cumsum(x, axis, reverse=reverse) ** 2, rand((3, 4), dtype), order=2)


SCANS = {"cumprod": lax.cumprod, "cummax": lax.cummax, "cummin": lax.cummin,
         "cumlogsumexp": lax.cumlogsumexp}


@pytest.mark.parametrize("name", list(SCANS))
def test_scans_eager(name):
    """Orders 1 and 2 eagerly, on a short vector with ties and a zero."""
    x = arr([2.0, 0.0, 2.0, -1.0, 3.0])
    check(lambda x: SCANS[name](x, 0), x, order=2)
    check(lambda x: SCANS[name](x, 0, reverse=True), x, order=1)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", list(SCANS))
def test_scans(name, reverse, dtype):
    """Ties (cummax/cummin) and zeros (cumprod) shared as in JAX, whose JVP differentiates the
    same parallel prefix scan; cumlogsumexp without overflow at large magnitudes."""
    special = arr(ZEROS if name == "cumprod" else TIES, dtype)
    scale = 40 if name == "cumlogsumexp" else 1
    x = jnp.concatenate([special, jnp.ones((1, 4), dtype), scale * rand((2, 4), dtype)])
    check_vjp_compiled(lambda x: SCANS[name](x, 1, reverse=reverse), x)


def test_scans_edge_shapes_and_bfloat16():
    for op in [lax.cumsum, lax.cumprod, lax.cummax, lax.cumlogsumexp]:
        check(lambda x: op(x, 0), jnp.zeros((0, 2)), order=2)
        check(lambda x: op(x, 0), rand((1,)), order=2)
    check(lambda x: jnp.cumsum(x, 1), rand((2, 4), jnp.bfloat16), order=2)
    check_vjp_compiled(lambda x: lax.cummax(x, 1), arr(TIES, jnp.bfloat16), tol=3e-2)
    check_vjp_compiled(lambda x: jnp.cumprod(x, 1), arr(ZEROS, jnp.bfloat16), tol=3e-2)


def test_scans_under_jit_and_vmap():
    x = arr(ZEROS)
    f = lambda x: jnp.sum(jnp.sin(lax.cumprod(x, 1)) + lax.cummax(x, 0) ** 2)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.jit(jax.vmap(jaxprop.grad(f)))(xs),
                               jax.jit(jax.vmap(jax.grad(f)))(xs), rtol=1e-6)
    np.testing.assert_allclose(jaxprop.grad(f)(x), jax.jit(jax.grad(f))(x), rtol=1e-6)
