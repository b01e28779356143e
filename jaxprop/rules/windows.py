"""Window reductions (pooling): each output reduces one window of the padded, dilated input.

Every primitive here reads the padded, base-dilated input ``xp = pad(x, init, (lo, hi, bd−1))``
through windows at ``o·stride + w·window_dilation``. So the VJPs work on ``xp`` and finish with
the transpose of that pad (:func:`~jaxprop.rules.structural.unpad`):

- ``reduce_window_sum``: each input gets ct summed over the windows that contain it: dilate ct
  by the strides, pad it by the window extent and sum over the same window again.
- ``reduce_window_max/min``: each window's ct goes to its first maximal element in row-major
  window order (XLA's select-and-scatter, so JAX's convention: ties are not split).
- ``reduce_window`` (any reducer): differentiated through its unrolled form, a fold of the
  reducer over the window's strided slices, on jaxprop's own tape.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop import _jax
from jaxprop.registry import defvjp, noderule
from jaxprop.rules.reductions import compiled_when_eager, vjp_by_tracing
from jaxprop.rules._util import sharding_of
from jaxprop.rules.structural import unpad, zero_scalar


def _geometry(shape, window_dimensions, padding, base_dilation, window_dilation):
    """The pad config of ``xp`` and, per axis, its size and the window's dilated extent."""
    config = [(lo, hi, bd - 1) for (lo, hi), bd in zip(padding, base_dilation)]
    size = [lo + hi + (n - 1) * bd + 1 if n else lo + hi
            for n, (lo, hi), bd in zip(shape, padding, base_dilation)]
    extent = [(k - 1) * wd + 1 for k, wd in zip(window_dimensions, window_dilation)]
    return config, size, extent


def window_slices(xp, out_shape, window_dimensions, window_strides, window_dilation):
    """(start, strided slice of ``xp``) for each window offset, row-major: slice[o] = xp[o·s + w·wd].

    A dynamic_slice at the offset, then one strided slice: the same two operations for every
    offset, so eager mode compiles them once (under jit XLA folds the constant starts).
    """
    extent = tuple((o - 1) * s + 1 for o, s in zip(out_shape, window_strides))
    for w in itertools.product(*map(range, window_dimensions)):
        start = tuple(i * wd for i, wd in zip(w, window_dilation))
        region = lax.dynamic_slice(xp, start, extent)
        yield start, lax.slice(region, (0,) * len(extent), extent, window_strides)


def place_window_slice(ct, size, start, window_strides):
    """Transpose of one :func:`window_slices` entry: ct back into zeros of ``size`` at ``start``."""
    spread = lax.pad(ct, zero_scalar(ct.dtype), [(0, 0, s - 1) for s in window_strides])
    zeros = jnp.zeros(size, ct.dtype, out_sharding=sharding_of(ct))
    return lax.dynamic_update_slice(zeros, spread, start)


def _reduce_window_sum(ct, out, x, *, window_dimensions, window_strides, padding,
                       base_dilation, window_dilation):
    """Σ over windows: ct_xp[p] = Σ_{o·s + w·wd = p} ct[o] (a correlation of the dilated ct)."""
    config, size, extent = _geometry(np.shape(x), window_dimensions, padding, base_dilation,
                                     window_dilation)
    spread = [(o - 1) * s + 1 if o else 0 for o, s in zip(ct.shape, window_strides)]
    dilated = lax.pad(ct, zero_scalar(ct.dtype),
                      [(e - 1, p - l, s - 1) for e, p, l, s in
                       zip(extent, size, spread, window_strides)])
    ct_xp = lax.reduce_window(dilated, zero_scalar(ct.dtype), lax.add, window_dimensions,
                              (1,) * ct.ndim, [(0, 0)] * ct.ndim,
                              window_dilation=window_dilation)
    return unpad(ct_xp, config)


defvjp("reduce_window_sum", _reduce_window_sum)


GEOMETRY = ("window_dimensions", "window_strides", "padding", "base_dilation",
            "window_dilation")


def _chooser(identity):
    def rule(ct, out, x, *, window_dimensions, window_strides, padding, base_dilation,
             window_dilation):
        """max/min pooling: each window's ct goes to its first extremal element."""
        if 0 in ct.shape or 0 in np.shape(x):
            return jnp.zeros(np.shape(x), ct.dtype)
        config, size, _ = _geometry(np.shape(x), window_dimensions, padding, base_dilation,
                                    window_dilation)
        xp = lax.pad(x, identity(x.dtype), config)
        taken = jnp.zeros(ct.shape, bool, out_sharding=sharding_of(ct))
        ct_xp = None
        for start, patch in window_slices(xp, ct.shape, window_dimensions, window_strides,
                                          window_dilation):
            first = (patch == out) & ~taken
            taken = taken | first
            placed = place_window_slice(jnp.where(first, ct, jnp.zeros_like(ct)), size, start,
                                        window_strides)
            ct_xp = placed if ct_xp is None else ct_xp + placed
        return unpad(ct_xp, config)
    rule_compiled = compiled_when_eager(rule, GEOMETRY)
    return lambda ct, out, x, **params: rule_compiled(ct, out, x, **params)


defvjp("reduce_window_max", _chooser(lambda t: np.array(-np.inf, t)))
defvjp("reduce_window_min", _chooser(lambda t: np.array(np.inf, t)))


@noderule("reduce_window")
def _reduce_window(node, cts):
    """Any reducer: VJP of its unrolled form, acc = reducer(acc, window slice), on the tape."""
    p = node.params
    n = len(node.inputs) // 2
    shape, out_shape = np.shape(node.inputs[0]), np.shape(node.outputs[0])
    config, _, _ = _geometry(shape, p["window_dimensions"], p["padding"], p["base_dilation"],
                             p["window_dilation"])

    def unrolled(*args):
        operands, inits = args[:n], args[n:]
        padded = [lax.pad(x, i, config) for x, i in zip(operands, inits)]
        acc = [lax.broadcast(i, out_shape) for i in inits]
        per_operand = [window_slices(xp, out_shape, p["window_dimensions"],
                                     p["window_strides"], p["window_dilation"])
                       for xp in padded]
        for slices in zip(*per_operand):
            acc = _apply_reducer(p["jaxpr"], p["consts"], acc, [sl for _, sl in slices])
        return acc

    if 0 in out_shape:
        return [jnp.zeros(np.shape(x), x.dtype) if s is not None else None
                for x, s in zip(node.inputs, node.in_slots)]
    cts = [c if c is not None else jnp.zeros(np.shape(o), o.dtype)
           for c, o in zip(cts, node.outputs)]
    return vjp_by_tracing(unrolled, list(node.inputs), cts)


def _apply_reducer(jaxpr, consts, acc, new):
    """The reducer's scalar jaxpr applied elementwise to whole arrays."""
    return _jax.eval_jaxpr(jaxpr, consts, *acc, *new)
