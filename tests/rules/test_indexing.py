"""Gather and scatter rules against jax.vjp, at orders 1 and 2: every gather mode, the indexing
forms that emit them (x[i], x[:, i], take, take_along_axis, embeddings), duplicate indices,
out-of-bounds indices, ties in scatter-max/min, zeros in scatter-mul."""

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

def emits(f, *args):
    return {e.primitive.name for e in jax.make_jaxpr(f)(*args).jaxpr.eqns} | {
        e.primitive.name for eq in jax.make_jaxpr(f)(*args).jaxpr.eqns
        if "jaxpr" in eq.params and hasattr(eq.params["jaxpr"], "jaxpr")
        for e in eq.params["jaxpr"].jaxpr.eqns}


DUP = jnp.array([1, 3, 1, 1])            # duplicates: their cotangents must add up
OOB = jnp.array([0, 7, -9, 2, 2])        # out of bounds both ways, and a duplicate


# -- gather ----------------------------------------------------------------------------------
GATHERS = {
    "rows": lambda x: x[DUP],
    "columns": lambda x: x[:, DUP],
    "points": lambda x: x[jnp.array([[0, 1], [1, 1]]), jnp.array([[2], [2]])],
    "negative": lambda x: x[jnp.array([-1, 0, -1])],
    "take_clip": lambda x: jnp.take(x, OOB, axis=1, mode="clip"),
    "take_fill": lambda x: jnp.take(x, OOB, axis=1, mode="fill", fill_value=2.0),
    "get_fill": lambda x: x.at[OOB % 6].get(mode="fill", fill_value=-1.0),
    "take_along_axis": lambda x: jnp.take_along_axis(
        x, jnp.array([[0, 0], [1, 4], [2, 2], [3, 1]]), axis=1),
    "take_along_axis_0": lambda x: jnp.take_along_axis(x, jnp.array([[3, 0, 0, 1, 1]]), axis=0),
    "embedding": lambda x: jnp.take(x, jnp.array([[0, 2, 2], [3, 3, 3]]), axis=0),
    "scalar": lambda x: x[2, 3],
    "empty_indices": lambda x: x[jnp.zeros((0,), jnp.int32)],
}


@pytest.mark.parametrize("name", list(GATHERS))
def test_gather(name, dtype):
    x = rand((4, 5), dtype)
    assert name == "empty_indices" or emits(GATHERS[name], x) & {"gather", "slice"}
    check(GATHERS[name], x, order=2)


@pytest.mark.parametrize("mode", ["clip", "fill", "promise_in_bounds"])
def test_gather_modes(mode):
    """lax.gather directly, with each mode (out-of-bounds windows only where defined)."""
    x = rand((5, 4))
    idx = jnp.array([[0], [4], [2], [2]]) if mode == "promise_in_bounds" else \
        jnp.array([[0], [7], [-3], [2], [2]])
    dn = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                    start_index_map=(0,))
    f = lambda x: lax.gather(x, idx, dn, (1, 3), mode=mode, fill_value=0.5)
    check(f, x, order=2)
    empty = lambda x: lax.gather(x, idx[:0], dn, (1, 3), mode=mode, fill_value=0.5)
    assert "gather" in emits(empty, x)
    check(empty, x, order=2)


def test_gather_batching_dims(dtype):
    """Gathers with operand batching dims (what take_along_axis and vmap emit)."""
    x = rand((3, 4, 2), dtype)
    idx = jnp.array([[[1], [3]], [[0], [0]], [[2], [3]]])
    dn = lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(1,),
                                    start_index_map=(1,), operand_batching_dims=(0,),
                                    start_indices_batching_dims=(0,))
    check(lambda x: lax.gather(x, idx, dn, (1, 1, 2), mode="clip"), x, order=2)
    check(jax.vmap(lambda row, i: row[i]), x, idx[..., 0], order=2)


def test_gather_empty_operand_and_bfloat16():
    check(lambda x: x[:, jnp.array([1, 1, 0])], jnp.zeros((0, 3)), order=2)
    check(lambda x: x[DUP] * 2, rand((4, 3), jnp.bfloat16), order=2)
    check(lambda x: jnp.take(x, OOB, axis=1, mode="fill"), rand((2, 5), jnp.float16),
              order=2)


@given(n=st.integers(1, 5), idx=st.lists(st.integers(-6, 6), min_size=0, max_size=6),
       mode=st.sampled_from(["clip", "fill"]))
def test_take_hypothesis(n, idx, mode):
    x = rand((n, 3))
    check(lambda x: jnp.take(x, jnp.asarray(idx, jnp.int32), axis=0, mode=mode), x,
          order=1)  # order 2: test_gather


def test_embedding_lookup_under_jit_and_vmap():
    table = rand((6, 3))
    ids = jnp.array([[0, 5, 5], [2, 2, 1]])
    loss = lambda t, ids: jnp.sum(jnp.tanh(t[ids]) ** 2)
    np.testing.assert_allclose(jax.jit(jaxprop.grad(loss))(table, ids),
                               jax.grad(loss)(table, ids), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(jaxprop.grad(loss), (None, 0))(table, ids),
                               jax.vmap(jax.grad(loss), (None, 0))(table, ids), rtol=1e-6)


# -- scatter-add / scatter-sub ---------------------------------------------------------------
SCATTER_INDICES = {
    "duplicates": DUP,
    "unique": jnp.array([0, 2, 3, 1]),
    "out_of_bounds": jnp.array([0, 9, -7, 1]),   # x.at[] drops these
}


@pytest.mark.parametrize("which", list(SCATTER_INDICES))
@pytest.mark.parametrize("op", ["add", "subtract"])
def test_scatter_add_sub(op, which, dtype):
    x, u = rand((4, 5), dtype, 1), rand((4, 5), dtype, 2)
    idx = SCATTER_INDICES[which]
    f = lambda x, u: getattr(x.at[idx], op)(u * u)
    assert emits(f, x, u) & {"scatter-add", "scatter-sub"}
    check(f, x, u, order=2)


def test_scatter_add_forms():
    x, u = rand((4, 5), seed=1), rand((3,), seed=2)
    check(lambda x, u: x.at[:, jnp.array([4, 0, 4])].add(u), x, u, order=2)
    check(lambda x, u: x.at[jnp.array([1, 1]), jnp.array([2, 2])].add(u[:2]), x, u,
              order=2)
    check(lambda x, u: x.at[DUP].add(u[0]), x, u, order=2)             # broadcast update
    check(lambda x, u: x.at[jnp.array([0, 9])].add(u[:2, None], mode="clip"),
              x, u, order=2)
    seg = jnp.array([0, 2, 2, 0, 1])
    check(lambda x: jax.ops.segment_sum(x, seg, num_segments=3), x.T, order=2)
    check(lambda x, u: x.at[jnp.zeros((0,), jnp.int32)].add(u[:0]), x, u, order=2)
    check(lambda x, u: x.at[DUP].add(u[:, None]), rand((4, 2), jnp.bfloat16),
              rand((4,), jnp.bfloat16), order=2)


# -- scatter (set) ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", list(SCATTER_INDICES))
def test_scatter_set(which, dtype):
    """The operand keeps ct where nothing was written; only the winning update gets ct."""
    x, u = rand((4, 5), dtype, 1), rand((4, 5), dtype, 2)
    idx = SCATTER_INDICES[which]
    f = lambda x, u: x.at[idx].set(jnp.sin(u))
    assert "scatter" in emits(f, x, u)
    check(f, x, u, order=2)


def test_scatter_set_forms():
    x, u = rand((4, 5), seed=1), rand((3,), seed=2)
    check(lambda x, u: x.at[:, jnp.array([4, 0, 4])].set(u * x[0, :3]), x, u, order=2)
    check(lambda x, u: x.at[1:3, 2].set(u[0]), x, u, order=2)
    check(lambda x, u: x.at[jnp.array([0, 2, 3])].set(u[:, None], unique_indices=True),
              x, u, order=2)
    check(lambda x, u: x.at[jnp.array([3, 3])].set(u[:2, None], mode="clip"), x, u,
              order=2)


def test_scatter_set_winner_gets_cotangent():
    g = jaxprop.grad(lambda u: jnp.zeros(3).at[jnp.array([1, 1, 1])].set(u)[1])(
        jnp.array([1.0, 2.0, 3.0]))
    assert float(g.sum()) == 1.0 and set(np.asarray(g).tolist()) <= {0.0, 1.0}


# -- scatter-mul -----------------------------------------------------------------------------
def test_scatter_mul_unique(dtype):
    x, u = rand((4, 5), dtype, 1), rand((3, 5), dtype, 2).at[0, 1].set(0)
    idx = jnp.array([0, 3, 1])
    f = lambda x, u: x.at[idx].multiply(u, unique_indices=True)
    assert "scatter-mul" in emits(f, x, u)
    check(f, x, u, order=2)
    check(lambda x: x.at[DUP].multiply(2.0), x, order=2)     # operand only: any indices


def test_scatter_mul_duplicates_with_zeros(dtype):
    """JAX has no VJP here; compare with the same product written as a masked reduce_prod."""
    x = rand((4, 5), dtype, 1)
    u = rand((4, 5), dtype, 2)
    u = u.at[0, 0].set(0).at[1, 1].set(0).at[2, 1].set(0).at[0, 2].set(0).at[2, 2].set(0)
    f = lambda x, u: x.at[DUP].multiply(u)

    def ref(x, u):
        hits = DUP[:, None] == jnp.arange(4)[None, :]
        return x * jnp.prod(jnp.where(hits[:, :, None], u[:, None, :], 1.0), axis=0)

    np.testing.assert_allclose(f(x, u), ref(x, u), rtol=1e-6)
    ct = random_like(f(x, u), 3)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    for a, b in zip(jaxprop.vjp(f, x, u)[1](ct), jax.vjp(ref, x, u)[1](ct)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    # second order where no update is 0 (at 0s it is exact only when one 0 shares a position)
    u = u + 3.0
    second = lambda grad, fn: grad(lambda u: jnp.sum(jnp.sin(
        grad(lambda u: jnp.sum(fn(x, u) * ct))(u))))(u)
    np.testing.assert_allclose(second(jaxprop.grad, f), second(jax.grad, ref), rtol=1e-4,
                               atol=1e-5)


# -- scatter-max / scatter-min ---------------------------------------------------------------
@pytest.mark.parametrize("op", ["max", "min"])
def test_scatter_max_min(op, dtype):
    x, u = rand((4, 5), dtype, 1), rand((4, 5), dtype, 2)
    f = lambda x, u: getattr(x.at[DUP], op)(u)
    assert emits(f, x, u) & {"scatter-max", "scatter-min"}
    check(f, x, u, order=2)
    check(lambda x, u: getattr(x.at[jnp.array([0, 9, 1, 1])], op)(u), x, u, order=2)


@pytest.mark.parametrize("op", ["max", "min"])
def test_scatter_max_min_ties(op):
    """Tied winners (the operand included) share ct equally, as in JAX."""
    x = jnp.asarray([[0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    u = jnp.asarray([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [0.0, 2.0]])
    idx = jnp.array([0, 0, 1, 1])
    check(lambda x, u: getattr(x.at[idx], op)(u), x, u, order=2)
    check(lambda x, u: getattr(x.at[idx], op)(u), jnp.zeros((3, 2)), jnp.zeros((4, 2)),
              order=2)
    seg = jnp.array([0, 0, 2, 2])
    check(lambda u: jax.ops.segment_max(u, seg, num_segments=3), u, order=2)
