"""Convolution: ``conv_general_dilated`` is bilinear, so each cotangent is another convolution.

Per spatial dimension (lhs length L dilated by ``ld``, padding ``(lo, hi)``, kernel length K
dilated by ``rd``, so its span is K' = (K − 1)·rd + 1, stride ``s``, output length M)::

    out[m] = Σ_k  pad(dilate(x, ld), lo, hi)[m·s + k·rd] · w[k]

- ∂lhs: scatter ct back along the same index map: a convolution of ct *dilated by s* with the
  *flipped* kernel (dilated by rd), read every ``ld``-th position (stride ld), padded by
  (K' − 1 − lo) below and to exactly L outputs above.
- ∂rhs: correlate lhs with ct: a convolution of pad(dilate(x, ld), lo, ·) with ct as the kernel
  (dilated by s), stride rd, cropped to exactly K outputs; batch and feature swap roles.

Groups: with ``feature_group_count`` G the lhs transpose is G-grouped again (kernel regrouped
from (G·O/G, I) to (G·I, O/G)) and the rhs transpose becomes ``batch_group_count`` G; with
``batch_group_count`` B it is the other way round, and the lhs cotangent's B feature groups
move back into the batch. Both rules work in canonical (N, C, spatial…) layouts and transpose
back to the operand's layout. Complex operands: plain transposes (no conjugation), as JAX.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from jaxprop.registry import defvjp
from jaxprop.rules._util import convert_like, respec, sharding_of


def _swapped(nd: int) -> tuple[int, ...]:
    """Spec whose batch/out-feature is axis 1 and feature/in-feature axis 0."""
    return (1, 0) + tuple(range(2, nd))


def _in_spec_order(operand, spec):
    """Under an Explicit mesh: ``operand``'s sharding with its axes in ``spec``'s order (the
    layout the cotangent convolution produces before its final transpose)."""
    sharding = sharding_of(operand)
    return None if sharding is None else respec(sharding, [sharding.spec[a] for a in spec])
def _empty(*arrays) -> bool:
    """An operand or the output has no elements: every cotangent is zero (XLA cannot lower
    the transposed convolutions of zero-length windows)."""
    return any(0 in np.shape(a) for a in arrays)


def _zeros_like(x):
    return lax.full(np.shape(x), 0, x.dtype)


def _conv_lhs(ct, out, lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, batch_group_count, precision, **_):
    """∂lhs = conv(dilate(ct, s), flip(w)ᵀ) with stride ld: ct scattered back through w."""
    if _empty(ct, lhs, rhs):
        return _zeros_like(lhs)
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nd, groups = len(lhs_spec), max(feature_group_count, batch_group_count)
    w = lax.transpose(rhs, tuple(rhs_spec))                       # (O, I, K…)
    o, i, ks = w.shape[0], w.shape[1], w.shape[2:]
    w = w.reshape((groups, o // groups, i) + ks).swapaxes(1, 2)   # (G, I, O/G, K…)
    w = lax.rev(w.reshape((groups * i, o // groups) + ks), tuple(range(2, nd)))
    pads = []
    for d in range(2, nd):
        n_in, n_out = lhs.shape[lhs_spec[d]], ct.shape[out_spec[d]]
        span = (rhs.shape[rhs_spec[d]] - 1) * rhs_dilation[d - 2] + 1
        p_lo = span - 1 - padding[d - 2][0]
        ct_len = (n_out - 1) * window_strides[d - 2] + 1
        pads.append((p_lo, (n_in - 1) * lhs_dilation[d - 2] + span - ct_len - p_lo))
    dn = lax.ConvDimensionNumbers(tuple(out_spec), tuple(range(nd)), tuple(range(nd)))
    res = lax.conv_general_dilated(
        ct, convert_like(w, ct.dtype), window_strides=lhs_dilation, padding=pads,
        lhs_dilation=window_strides, rhs_dilation=rhs_dilation, dimension_numbers=dn,
        feature_group_count=groups, precision=precision,
        out_sharding=None if batch_group_count > 1 else _in_spec_order(lhs, lhs_spec))
    # (N/B, B·C, L…)
    if batch_group_count > 1:                                     # B feature groups -> batch
        b, sp = batch_group_count, res.shape[2:]
        res = res.reshape((res.shape[0], b, res.shape[1] // b) + sp).swapaxes(0, 1)
        res = res.reshape((res.shape[0] * res.shape[1], res.shape[2]) + sp)
    return convert_like(lax.transpose(res, tuple(np.argsort(lhs_spec))), lhs.dtype)


def _conv_rhs(ct, out, lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, batch_group_count, precision, **_):
    """∂rhs[o, c, k] = Σ_n,m ct[n, o, m] · pad(dilate(x))[n, c, m·s + k·rd]: conv(x, ct)."""
    if _empty(ct, lhs, rhs):
        return _zeros_like(rhs)
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nd = len(lhs_spec)
    pads = []
    for d in range(2, nd):
        n_in, n_out = lhs.shape[lhs_spec[d]], ct.shape[out_spec[d]]
        n_k = rhs.shape[rhs_spec[d]]
        lo = padding[d - 2][0]
        ct_span = (n_out - 1) * window_strides[d - 2] + 1
        in_len = (n_in - 1) * lhs_dilation[d - 2] + 1
        pads.append((lo, (n_k - 1) * rhs_dilation[d - 2] + ct_span - in_len - lo))
    x = lax.transpose(lhs, tuple(lhs_spec))                       # (N, C, L…)
    c = lax.transpose(ct, tuple(out_spec))                        # (N/B, O, M…)
    dn = lax.ConvDimensionNumbers(_swapped(nd), _swapped(nd), _swapped(nd))
    res = lax.conv_general_dilated(
        convert_like(x, c.dtype), c, window_strides=rhs_dilation, padding=pads,
        lhs_dilation=lhs_dilation, rhs_dilation=window_strides, dimension_numbers=dn,
        feature_group_count=batch_group_count, batch_group_count=feature_group_count,
        precision=precision, out_sharding=_in_spec_order(rhs, rhs_spec))  # (O, I, K…)
    return convert_like(lax.transpose(res, tuple(np.argsort(rhs_spec))), rhs.dtype)


defvjp("conv_general_dilated", _conv_lhs, _conv_rhs)
