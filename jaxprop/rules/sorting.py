"""Sorting and selection: outputs are inputs moved to new positions, so the VJP moves each
cotangent back to where its value came from.

- ``sort``: jaxprop binds the sort with an extra ``iota`` operand, which records where every
  output element came from (the permutation). The VJP sorts the cotangents by that
  permutation, which is its inverse: the VJP of a sort is a sort.
- ``top_k`` / ``approx_top_k``: ct_x = scatter-add of ct_values into the returned indices.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop import _jax
from jaxprop.registry import noderule
from jaxprop.rules._util import convert_like
from jaxprop.tracer import handler


# -- sort ------------------------------------------------------------------------------------
@handler("sort")
def _record_sort(trace, primitive, tracers, params):
    """Sort with an iota appended (not a key), keeping the permutation as the residual."""
    values, slots = zip(*map(trace.unwrap, tracers))
    shape = _jax.aval_of(values[0]).shape
    with _jax.set_current_trace(trace.parent):
        iota = lax.broadcasted_iota(np.int32, shape, params["dimension"])
    outs = _jax.bind_on(trace.parent, primitive, (*values, iota), params)
    return trace.record(primitive, params, values, slots, outs[:-1], _sort_rule,
                        residuals=outs[-1], multiple_results=True)


def _sort_rule(node, cts):
    """out_i = x_i[perm]: ct_x_i = ct_i[perm⁻¹], i.e. the cotangents sorted by perm."""
    perm, dim = node.residuals, node.params["dimension"]
    idx = [i for i, (ct, s) in enumerate(zip(cts, node.in_slots))
           if ct is not None and s is not None]
    if not idx:
        return [None] * len(node.inputs)
    back = lax.sort((perm, *(cts[i] for i in idx)), dimension=dim, num_keys=1)[1:]
    out = [None] * len(node.inputs)
    for i, ct in zip(idx, back):
        out[i] = convert_like(ct, node.inputs[i].dtype)
    return out


# -- top_k -----------------------------------------------------------------------------------
def scatter_along_axis(ct, indices, shape, axis):
    """Zeros of ``shape`` with ``ct`` added at ``indices`` along ``axis`` (the transpose of
    ``take_along_axis``)."""
    axis = axis % len(shape)
    index = tuple(indices if d == axis else lax.broadcasted_iota(indices.dtype, indices.shape, d)
                  for d in range(len(shape)))
    return jnp.zeros(shape, ct.dtype).at[index].add(ct)


@noderule("top_k")
def _top_k(node, cts):
    """values = take_along_axis(x, indices): ct_x = scatter-add of ct into indices."""
    ct, x = cts[0], node.inputs[0]
    if ct is None:
        return [None] * len(node.inputs)
    axis = node.params.get("axis", -1)
    return [convert_like(scatter_along_axis(ct, node.outputs[1], x.shape, axis), x.dtype)]


@noderule("approx_top_k")
def _approx_top_k(node, cts):
    """Like top_k, along ``reduction_dimension``."""
    ct, x = cts[0], node.inputs[0]
    if ct is None:
        return [None]
    axis = node.params["reduction_dimension"]
    return [convert_like(scatter_along_axis(ct, node.outputs[1], x.shape, axis), x.dtype)]

