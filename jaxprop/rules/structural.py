"""Structural gates: they move, copy or drop elements, so their VJPs move cotangents back.

A broadcast copies, so its VJP sums (the copy gate); a reshape/transpose permutes, so its VJP
applies the inverse permutation; a slice selects, so its VJP pads with zeros; a pad places, so
its VJP slices; a concatenate/stack joins, so its VJP splits, and a split's VJP joins.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop import _jax
from jaxprop.registry import defvjp, noderule
from jaxprop.rules._util import convert_like, instantiate


def zero_scalar(dtype):
    """A concrete 0 of ``dtype`` (numpy, so it stays a constant under jit)."""
    return np.zeros((), dtype)


def unpad(ct, padding_config):
    """Transpose of ``lax.pad(x, 0, padding_config)``: drop the padding, skip the holes."""
    kept = lax.pad(ct, zero_scalar(ct.dtype), [(-lo, -hi, 0) for lo, hi, _ in padding_config])
    return lax.slice(kept, (0,) * kept.ndim, kept.shape,
                     tuple(interior + 1 for _, _, interior in padding_config))


def unslice(ct, in_shape, start_indices, strides=None):
    """Transpose of a (strided) slice: place ``ct`` back into zeros of ``in_shape``."""
    strides = strides or (1,) * len(in_shape)
    config = []
    for n, start, stride, m in zip(in_shape, start_indices, strides, ct.shape):
        if m == 0:
            config.append((0, n, 0))
        else:
            config.append((start, n - start - (m - 1) * stride - 1, stride - 1))
    return lax.pad(ct, zero_scalar(ct.dtype), config)


# -- copies and permutations -----------------------------------------------------------------
def _broadcast_in_dim(ct, out, x, *dyn, shape, broadcast_dimensions, **_):
    """broadcast_in_dim: sum ct over the new axes and over axes broadcast from size 1."""
    x_shape = np.shape(x)
    new_axes = tuple(i for i in range(len(shape))  # new axes of size 1 go with the reshape
                     if i not in broadcast_dimensions and shape[i] != 1)
    ones = tuple(d for i, d in enumerate(broadcast_dimensions)
                 if x_shape[i] == 1 and shape[d] != 1)
    summed = lax.reduce_sum(ct, new_axes + ones) if new_axes + ones else ct
    return convert_like(summed.reshape(x_shape), x.dtype)


def _tile(ct, out, x, reps):
    """tile: out[r·n + i] = x[i], so x gets ct summed over the repetitions r."""
    shape = np.shape(x)
    split = tuple(d for r, n in zip(reps, shape) for d in (r, n))
    return lax.reduce_sum(ct.reshape(split), tuple(range(0, 2 * len(shape), 2)))


defvjp("broadcast_in_dim", _broadcast_in_dim)
defvjp("tile", _tile)


def _reshape(ct, out, x, *dyn, dimensions=None, **_):
    """reshape(x, dimensions=perm) = reshape(transpose(x, perm)): inverse reshape, then the
    inverse permutation."""
    if dimensions is None:
        return ct.reshape(np.shape(x))
    permuted = tuple(np.shape(x)[d] for d in dimensions)
    return lax.transpose(ct.reshape(permuted), tuple(np.argsort(dimensions)))


defvjp("reshape", _reshape)
defvjp("squeeze", lambda ct, out, x, **_: ct.reshape(np.shape(x)))
defvjp("expand_dims", lambda ct, out, x, **_: ct.reshape(np.shape(x)))
defvjp("transpose",                                                         # inverse perm
       lambda ct, out, x, permutation: lax.transpose(ct, tuple(np.argsort(permutation))))
defvjp("rev", lambda ct, out, x, dimensions: lax.rev(ct, dimensions))       # its own inverse


# -- selections and placements ---------------------------------------------------------------
defvjp("slice",                                                 # x[start:limit:stride]: pad ct back
       lambda ct, out, x, start_indices, limit_indices, strides:
       unslice(ct, np.shape(x), start_indices, strides))


def _pad_operand(ct, out, x, value, padding_config):
    """pad: x's elements sit at lo + k·(interior+1); ct there (negative pads cut some off)."""
    return unpad(ct, padding_config)


def _pad_value(ct, out, x, value, padding_config):
    """pad: every output element that is not one of x's is the padding value: Σct − Σct_x."""
    return (ct.sum() - unpad(ct, padding_config).sum()).astype(ct.dtype)


defvjp("pad", _pad_operand, _pad_value)


def _dynamic_slice(ct, out, x, *starts, slice_sizes):
    """dynamic_slice: ct goes back into zeros at the (clamped) start indices."""
    return lax.dynamic_update_slice(jnp.zeros(np.shape(x), ct.dtype), ct, starts)


def _dus_operand(ct, out, x, update, *starts):
    """dynamic_update_slice: the overwritten window of x gets no cotangent."""
    return lax.dynamic_update_slice(ct, jnp.zeros(np.shape(update), ct.dtype), starts)


def _dus_update(ct, out, x, update, *starts):
    """dynamic_update_slice: the update gets ct at its window."""
    return lax.dynamic_slice(ct, starts, np.shape(update))


defvjp("dynamic_slice", _dynamic_slice)
defvjp("dynamic_update_slice", _dus_operand, _dus_update)


# -- joins and splits (several inputs or outputs) --------------------------------------------
@noderule("concatenate")
def _concatenate(node, cts):
    """concatenate: each operand gets its own block of ct along ``dimension``."""
    ct, axis = cts[0], node.params["dimension"]
    ends = np.cumsum([np.shape(x)[axis] for x in node.inputs])
    return [lax.slice_in_dim(ct, int(end - np.shape(x)[axis]), int(end), axis=axis)
            if slot is not None else None
            for x, end, slot in zip(node.inputs, ends, node.in_slots)]


@noderule("split")
def _split(node, cts):
    """split: the operand's cotangent is its pieces' cotangents joined again."""
    pieces = [instantiate(ct, out) for ct, out in zip(cts, node.outputs)]
    return [lax.concatenate(pieces, node.params["axis"])]


@noderule("stack")
def _stack(node, cts):
    """stack: operand i gets ct[..., i, ...] along ``axis``."""
    ct, axis = cts[0], node.params["axis"]
    return [lax.index_in_dim(ct, i, axis, keepdims=False) if slot is not None else None
            for i, slot in enumerate(node.in_slots)]


@noderule("unstack")
def _unstack(node, cts):
    """unstack: the operand's cotangent is its slices' cotangents stacked again."""
    pieces = [instantiate(ct, out) for ct, out in zip(cts, node.outputs)]
    return [jnp.stack(pieces, axis=node.params["axis"])]


# -- identities that carry placement or scheduling information -------------------------------
def _rebind_on_cotangent(node, cts):
    """Identity-like: the cotangent gets the same constraint as the value."""
    return [node.primitive.bind(cts[0], **node.params)]


for _name in ("sharding_constraint", "layout_constraint"):
    noderule(_name)(_rebind_on_cotangent)



@noderule("reshard")
def _reshard(node, cts):
    """reshard (Explicit mesh): ct_in = reshard(ct, x's sharding) — back to where x lived."""
    (x,) = node.inputs
    params = dict(node.params, dst_sharding=_jax.aval_of(x).sharding)
    return [node.primitive.bind(cts[0], **params)]
