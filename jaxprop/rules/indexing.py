"""Indexing gates: gather reads elements at indices, scatters write or combine them.

A gather copies operand elements (possibly the same one several times), so its VJP is a
scatter-add of the cotangent back to where they came from; a scatter-add's VJP for the updates
is the gather that reads ct at the written positions. ``scatter`` (``x.at[i].set``) routes ct
to whichever update won each position (the operand keeps ct where nothing was written);
scatter-max/min share ct equally among the tied winners, the operand included, as JAX does.
Indices are integers and get no cotangent.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop.registry import defvjp, noderule
from jaxprop.rules._util import respec, sharding_of


def scatter_numbers(g: lax.GatherDimensionNumbers) -> lax.ScatterDimensionNumbers:
    """The scatter that writes back where the gather ``g`` reads."""
    return lax.ScatterDimensionNumbers(
        update_window_dims=g.offset_dims, inserted_window_dims=g.collapsed_slice_dims,
        scatter_dims_to_operand_dims=g.start_index_map,
        operand_batching_dims=g.operand_batching_dims,
        scatter_indices_batching_dims=g.start_indices_batching_dims)


def gather_numbers(s: lax.ScatterDimensionNumbers) -> lax.GatherDimensionNumbers:
    """The gather that reads where the scatter ``s`` writes."""
    return lax.GatherDimensionNumbers(
        offset_dims=s.update_window_dims, collapsed_slice_dims=s.inserted_window_dims,
        start_index_map=s.scatter_dims_to_operand_dims,
        operand_batching_dims=s.operand_batching_dims,
        start_indices_batching_dims=s.scatter_indices_batching_dims)


def read_back(values, indices, updates_shape, dimension_numbers, mode, **flags):
    """Gather ``values`` (operand-shaped) at each scatter update's positions: updates-shaped.

    Windows a FILL_OR_DROP scatter dropped read 0.
    """
    s = dimension_numbers
    window = iter(updates_shape[d] for d in s.update_window_dims)
    slice_sizes = tuple(1 if (i in s.inserted_window_dims or i in s.operand_batching_dims)
                        else next(window) for i in range(np.ndim(values)))
    return lax.gather(values, indices, gather_numbers(s), slice_sizes, mode=mode,
                      fill_value=0, **flags)


def _flags(params):
    return dict(indices_are_sorted=params["indices_are_sorted"],
                unique_indices=params["unique_indices"])


# -- gather ----------------------------------------------------------------------------------
def _gather(ct, out, operand, indices, *, dimension_numbers, mode, indices_are_sorted,
            unique_indices, **_):
    """gather: out = operand[idx] ⇒ ct_operand = scatter-add of ct at idx (duplicates add)."""
    zeros = jnp.zeros(np.shape(operand), ct.dtype, out_sharding=sharding_of(operand))
    return lax.scatter_add(zeros, indices, ct, scatter_numbers(dimension_numbers), mode=mode,
                           indices_are_sorted=indices_are_sorted, unique_indices=unique_indices)


defvjp("gather", _gather, None)


# -- scatter-add / scatter-sub ---------------------------------------------------------------
def _updates_read(sign):
    def rule(ct, out, operand, indices, updates, **params):
        """scatter-add: out[idx] += u ⇒ ct_u = ct[idx] (gather), ct_operand = ct."""
        read = read_back(ct, indices, np.shape(updates), params["dimension_numbers"],
                         params["mode"], **_flags(params))
        return read if sign > 0 else -read
    return rule


defvjp("scatter-add", lambda ct, out, operand, indices, updates: ct, None, _updates_read(+1))
defvjp("scatter-sub", lambda ct, out, operand, indices, updates: ct, None, _updates_read(-1))


# -- scatter (set) ---------------------------------------------------------------------------
def _winners(operand, indices, updates, params):
    """(operand positions nothing overwrote, updates that won their position).

    Which of several updates to one position wins is up to XLA, so ask it: scatter each
    update's id (1, 2, …) the same way and read back which id landed.
    """
    s, mode = params["dimension_numbers"], params["mode"]
    ids = lax.iota(np.int32, int(np.prod(np.shape(updates)))).reshape(np.shape(updates)) + 1
    landed = lax.scatter(jnp.zeros(np.shape(operand), np.int32), indices, ids, s, mode=mode,
                         **_flags(params))
    won = read_back(landed, indices, np.shape(updates), s, mode, **_flags(params)) == ids
    return landed == 0, won


@noderule("scatter")
def _scatter(node, cts):
    """scatter: out = x with x[idx] := u ⇒ ct_x = ct where nothing landed (else 0);
    each update that landed gets ct at its position, overwritten ones get 0."""
    (ct,), (operand, indices, updates), p = cts, node.inputs, node.params
    kept, won = _winners(operand, indices, updates, p)
    want_x, _, want_u = node.wants
    read = read_back(ct, indices, np.shape(updates), p["dimension_numbers"], p["mode"],
                     **_flags(p)) if want_u else None
    return [jnp.where(kept, ct, jnp.zeros_like(ct)) if want_x else None, None,
            jnp.where(won, read, jnp.zeros_like(read)) if want_u else None]


# -- scatter-mul -----------------------------------------------------------------------------
def _scatter_mul_operand(ct, out, operand, indices, updates, **params):
    """scatter-mul: out = x · ∏(updates at x's position) ⇒ ct_x = ct · that product."""
    return lax.scatter_mul(ct, indices, updates, params["dimension_numbers"],
                           mode=params["mode"], **_flags(params))


def _scatter_mul_updates(ct, out, operand, indices, updates, **params):
    """scatter-mul: ct_uⱼ = (ct·x)[idxⱼ] · ∏(other updates at idxⱼ); exact at zero updates."""
    s, mode, flags = params["dimension_numbers"], params["mode"], _flags(params)
    read = lambda v: read_back(v, indices, np.shape(updates), s, mode, **flags)
    ct_x = read(ct * operand)
    if params["unique_indices"]:
        return ct_x
    zero = updates == 0
    ones = jnp.ones(np.shape(operand), updates.dtype)
    nonzero_product = read(lax.scatter_mul(ones, indices, jnp.where(zero, 1, updates), s,
                                           mode=mode, **flags))
    zeros_there = read(lax.scatter_add(jnp.zeros(np.shape(operand), np.int32), indices,
                                       zero.astype(np.int32), s, mode=mode, **flags))
    others = jnp.where(zero, jnp.where(zeros_there == 1, nonzero_product, 0),
                       jnp.where(zeros_there == 0,
                                 nonzero_product / jnp.where(zero, 1, updates), 0))
    return ct_x * others


defvjp("scatter-mul", _scatter_mul_operand, None, _scatter_mul_updates)


# -- scatter-max / scatter-min ---------------------------------------------------------------
@noderule("scatter-max")
@noderule("scatter-min")
def _scatter_extremal(node, cts):
    """scatter-max/min: out = max(x, updates at x's position) ⇒ ct is shared equally by the
    tied winners there: x gets ct·[x won]/#winners, update j gets ct[idxⱼ]·[uⱼ won]/#winners."""
    (ct,), (operand, indices, updates), (out,) = cts, node.inputs, node.outputs
    p = node.params
    s, mode, flags = p["dimension_numbers"], p["mode"], _flags(p)
    read = lambda v: read_back(v, indices, np.shape(updates), s, mode, **flags)
    won = updates == read(out)
    kept = (operand == out).astype(ct.dtype)
    winners = lax.scatter_add(kept, indices, won.astype(ct.dtype), s, mode=mode, **flags)
    share = 1 / jnp.maximum(winners, 1)
    want_x, _, want_u = node.wants
    return [ct * kept * share if want_x else None, None,
            jnp.where(won, read(ct * share), 0).astype(ct.dtype) if want_u else None]
