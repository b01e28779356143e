"""Structural rules (slices, pads, joins, splits, copies, permutations) against jax.vjp, at
orders 1 and 2, over shapes (scalars, size-1 and empty dims) and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import jaxprop
from rulecheck import check, rand

def primitives(f, *args):
    return {e.primitive.name for e in jax.make_jaxpr(f)(*args).jaxpr.eqns}


# -- slice -----------------------------------------------------------------------------------
SLICES = [  # (shape, start, limit, strides)
    ((4, 5), (0, 1), (4, 5), (2, 2)),
    ((4, 5), (1, 0), (4, 5), (3, 1)),
    ((4, 5), (1, 1), (1, 5), (2, 2)),        # empty result
    ((7,), (2,), (7,), (5,)),
    ((3, 0), (1, 0), (3, 0), None),          # empty input
    ((2, 3, 4), (0, 1, 1), (2, 3, 4), (1, 2, 2)),
]


@pytest.mark.parametrize("shape,start,limit,strides", SLICES)
def test_slice(shape, start, limit, strides, dtype):
    f = lambda x: lax.slice(x, start, limit, strides)
    assert "slice" in primitives(f, rand(shape, dtype))
    check(f, rand(shape, dtype), order=2)


@given(n=st.integers(1, 7), start=st.integers(0, 6), size=st.integers(0, 7),
       stride=st.integers(1, 4))
def test_slice_hypothesis(n, start, size, stride):
    start = min(start, n)
    limit = min(start + size, n)
    check(lambda x: lax.slice(x, (start, 0), (limit, 2), (stride, 1)) ** 2,
          rand((n, 2)), order=1)  # order 2: test_slice


def test_numpy_slicing_and_unstacking():
    x = rand((4, 5))
    check(lambda x: x[::-2, 1:4:2] * x[1:3, :2].sum(), x, order=2)
    check(lambda x: [r * 2 for r in x], x, order=2)
    check(lambda x: x[..., None, 1:], x, order=2)


def test_slice_bfloat16():
    x = rand((6, 5), jnp.bfloat16)
    check(lambda x: lax.slice(x, (1, 0), (6, 5), (2, 3)) * 3, x, order=2)


# -- dynamic_slice / dynamic_update_slice ----------------------------------------------------
@pytest.mark.parametrize("start", [(1, 2), (3, 4), (-1, 7)])   # last two clamp
def test_dynamic_slice(start, dtype):
    f = lambda x: lax.dynamic_slice(x, start, (2, 3))
    assert "dynamic_slice" in primitives(f, rand((4, 5), dtype))
    check(f, rand((4, 5), dtype), order=2)


def test_dynamic_indexing_traced_index():
    x = rand((4, 5))
    f = lambda x, i: jnp.sin(x[i]) * x[i + 1, 2]
    for i in [2, -2]:
        check(lambda x: f(x, i), x, order=2)
    grad = jax.jit(jaxprop.grad(lambda x, i: jnp.sum(f(x, i))))
    np.testing.assert_allclose(grad(x, 1), jax.grad(lambda x: jnp.sum(f(x, 1)))(x), rtol=1e-6)
    batched = jax.vmap(jaxprop.grad(lambda x, i: jnp.sum(f(x, i))), in_axes=(None, 0))
    expect = jax.vmap(jax.grad(lambda x, i: jnp.sum(f(x, i))), in_axes=(None, 0))
    idx = jnp.array([0, 2, 1])
    np.testing.assert_allclose(batched(x, idx), expect(x, idx), rtol=1e-6)


@pytest.mark.parametrize("start", [(1, 2), (3, 4), (-2, 0)])            # (3, 4) clamps
def test_dynamic_update_slice(start, dtype):
    x, u = rand((4, 5), dtype, 1), rand((2, 2), dtype, 2)
    f = lambda x, u: lax.dynamic_update_slice(x, u * x[:2, :2], start)
    assert "dynamic_update_slice" in primitives(f, x, u)
    check(f, x, u, order=2)
    check(lambda u: lax.dynamic_update_slice(jnp.zeros((4, 5), dtype), u, start), u,
              order=2)
    check(lambda x: lax.dynamic_update_slice(x, jnp.ones((2, 2), dtype), start), x,
              order=2)


def test_dynamic_update_slice_bfloat16_and_empty():
    x, u = rand((4, 5), jnp.bfloat16), rand((2, 3), jnp.bfloat16, 1)
    check(lambda x, u: lax.dynamic_update_slice(x, u, (1, 1)), x, u, order=2)
    check(lambda x, u: lax.dynamic_update_slice(x, u, (1, 1)), rand((3, 4)),
              jnp.zeros((0, 2)), order=2)


# -- concatenate / pad -----------------------------------------------------------------------
def test_concatenate():
    dtype = jnp.float32
    x, y = rand((3, 2), dtype, 1), rand((3, 4), dtype, 2)
    f = lambda x, y: jnp.concatenate([x, y * y, x[:, :0], jnp.ones((3, 1), dtype)], axis=1)
    assert "concatenate" in primitives(f, x, y)
    check(f, x, y, order=2)
    check(lambda x: jnp.concatenate([x, x * 2], axis=0), x, order=2)   # one value twice
    check(lambda x: jnp.concatenate([x[:0], x[:0]]), x, order=2)
    check(lambda x: jnp.concatenate([x, x]), rand((3, 2), jnp.bfloat16), order=2)


PADS = [
    [(1, 2, 0), (0, 0, 0)],
    [(1, -1, 1), (0, 3, 2)],           # interior and negative
    [(-2, -1, 0), (-1, 0, 1)],         # negative cuts elements off
    [(-3, -2, 1), (0, 0, 0)],          # cuts into the interior holes
    [(0, 0, 3), (2, -4, 0)],
]


@pytest.mark.parametrize("config", PADS)
def test_pad(config, dtype):
    x = rand((4, 3), dtype)
    f = lambda x, v: lax.pad(x, v, config)
    check(f, x, jnp.asarray(1.5, dtype), order=2)
    check(lambda x: lax.pad(x * x, jnp.asarray(0, dtype), config), x, order=2)


def test_pad_empty_and_jnp_pad():
    check(lambda x, v: lax.pad(x, v, [(1, 2, 1)]), jnp.zeros((0,)), jnp.float32(2),
              order=2)
    x = rand((3, 4))
    check(lambda x: jnp.pad(x, ((1, 2), (0, 1)), constant_values=0.0), x, order=2)
    check(lambda x: lax.pad(x, jnp.bfloat16(1), [(1, 2, 1), (-1, 0, 0)]),
          rand((3, 4), jnp.bfloat16), order=2)


@pytest.mark.slow
def test_jnp_pad_reflect():
    check(lambda x: jnp.pad(x, ((1, 2), (2, 1)), mode="reflect"), rand((3, 4)), order=2)


@given(lo=st.integers(-3, 3), hi=st.integers(-3, 3), interior=st.integers(0, 2),
       n=st.integers(1, 4))
def test_pad_hypothesis(lo, hi, interior, n):
    if n + (n - 1) * interior + lo + hi < 0:
        return
    check(lambda x, v: lax.pad(x, v, [(lo, hi, interior)]), rand((n,)),
              jnp.float32(0.7), order=2)


# -- rev, split, tile, stack, unstack --------------------------------------------------------
def test_rev():
    dtype = jnp.float32
    check(lambda x: lax.rev(x, (0, 2)) * x, rand((2, 3, 4), dtype), order=2)
    check(lambda x: jnp.flip(x), rand((0, 3), dtype), order=2)


def test_split():
    dtype = jnp.float32
    x = rand((3, 7), dtype)
    f = lambda x: jnp.split(x, [1, 4], axis=1)
    assert "split" in primitives(f, x)
    check(f, x, order=2)
    check(lambda x: jnp.split(x, [1, 4], axis=1)[1] ** 2, x, order=2)   # unused pieces
    check(lambda x: jnp.split(x, [0, 0, 3])[3], x, order=2)             # empty pieces


def test_tile():
    dtype = jnp.float32
    x = rand((2, 3), dtype)
    f = lambda x: jnp.tile(x, (2, 1, 3)) * 1.5
    assert "tile" in primitives(f, x)
    check(f, x, order=2)
    check(lambda x: jnp.tile(x, (0, 2)), x, order=2)
    check(lambda x: jnp.tile(x, 3), jnp.float32(2.0), order=2)


def test_stack_unstack():
    dtype = jnp.float32
    x, y = rand((2, 3), dtype, 1), rand((2, 3), dtype, 2)
    f = lambda x, y: jnp.stack([x, y * y, x, jnp.ones_like(x)], axis=1)
    assert "stack" in primitives(f, x, y)
    check(f, x, y, order=2)
    g = lambda x: jnp.unstack(x, axis=1)
    assert "unstack" in primitives(g, x)
    check(g, x, order=2)
    check(lambda x: jnp.unstack(x, axis=0)[1] * 2, x, order=2)


# -- reshape family, transpose, broadcast ----------------------------------------------------
def test_reshape_family():
    dtype = jnp.float32
    x = rand((2, 1, 3), dtype)
    check(lambda x: x.reshape(3, 2) ** 2, x, order=2)
    check(lambda x: jnp.squeeze(x, 1) * x[:, 0], x, order=2)
    check(lambda x: jnp.expand_dims(x, (0, 3)) * 2, x, order=2)
    check(lambda x: x.reshape(()) * x, jnp.ones((1, 1), dtype), order=2)
    check(lambda x: x.reshape(0, 4), jnp.zeros((2, 0, 3), dtype), order=2)
    check(lambda x: x[None, None], jnp.asarray(3.0, dtype), order=2)
    check(lambda x: jnp.ravel(x.T), x, order=2)


def test_transpose():
    dtype = jnp.float32
    check(lambda x: jnp.transpose(x, (2, 0, 1)) * x.transpose(2, 0, 1),
              rand((2, 3, 4), dtype), order=2)


def test_broadcast_in_dim():
    dtype = jnp.float32
    x = rand((3, 1), dtype)
    check(lambda x: lax.broadcast_in_dim(x, (2, 3, 4), (1, 2)), x, order=2)
    check(lambda x: jnp.broadcast_to(x, (2, 3, 5)) * x[:, 0, None], x, order=2)
    check(lambda x: jnp.broadcast_to(x, (0, 3, 1)), x, order=2)
    check(lambda x: lax.broadcast_in_dim(x, (1, 1), ()), jnp.asarray(2.0, dtype),
              order=2)
    check(lambda x: x + jnp.zeros((4, 3, 2), dtype), x, order=2)


def test_iota_records_no_node():
    """iota has no float inputs (and integer iotas no float outputs): nothing to record."""
    from jaxprop.tracer import run_traced
    x = rand((3,))
    f = lambda x: x * jnp.arange(3.0) + lax.iota(jnp.int32, 3)
    assert "iota" in primitives(f, x)
    trace, _, _ = run_traced(f, [x])
    assert "iota" not in [node.name for node in trace.nodes]
    check(f, x, order=2)


def test_sharding_constraint():
    x = rand((3, 4))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    f = lambda x: jax.lax.with_sharding_constraint(x * x, sharding)
    assert "sharding_constraint" in primitives(f, x)
    check(f, x, order=2)
    np.testing.assert_allclose(jax.jit(jaxprop.grad(lambda x: jnp.sum(f(x))))(x), 2 * x)
