"""Linear algebra. ``dot_general`` is bilinear: each operand's cotangent is the cotangent
contracted with the *other* operand (the mul gate, with axes)."""

from __future__ import annotations

import numpy as np
from jax import lax

from jaxprop.registry import defvjp
from jaxprop.rules._util import convert_like


def _dot_transpose(ct, other, this_ndim, dims, this_is_lhs, precision):
    """Cotangent of one dot_general operand: contract ``ct`` with ``other`` over ``other``'s
    free axes, then permute the result into this operand's axis order."""
    (c_l, c_r), (b_l, b_r) = dims
    c_this, c_other = (c_l, c_r) if this_is_lhs else (c_r, c_l)
    b_this, b_other = (b_l, b_r) if this_is_lhs else (b_r, b_l)
    other_ndim = np.ndim(other)
    nb = len(b_this)
    free_this = [i for i in range(this_ndim) if i not in c_this and i not in b_this]
    free_other = [i for i in range(other_ndim) if i not in c_other and i not in b_other]
    # ct axes: batch, lhs free, rhs free.
    ct_free_other = (list(range(nb + len(free_this), nb + len(free_this) + len(free_other)))
                     if this_is_lhs else list(range(nb, nb + len(free_other))))
    ct_free_this = (list(range(nb, nb + len(free_this))) if this_is_lhs
                    else list(range(nb + len(free_other), nb + len(free_other) + len(free_this))))
    result = lax.dot_general(ct, other, ((ct_free_other, free_other),
                                         (list(range(nb)), list(b_other))), precision=precision)
    # result axes: batch, ct's remaining (= this free, in ct order), other's remaining (= c_other
    # in increasing order, each matching c_this).
    del ct_free_this
    remaining_other = sorted(c_other)
    position = {}
    for k, axis in enumerate(b_this):
        position[axis] = k
    for j, axis in enumerate(free_this):
        position[axis] = nb + j
    for a_this, a_other in zip(c_this, c_other):
        position[a_this] = nb + len(free_this) + remaining_other.index(a_other)
    perm = tuple(position[a] for a in range(this_ndim))
    return lax.transpose(result, perm) if perm != tuple(range(this_ndim)) else result


def _dot_lhs(ct, out, x, y, dimension_numbers, precision=None, **_):
    """∂(x·y)/∂x: ct contracted with y."""
    return convert_like(_dot_transpose(ct, y, np.ndim(x), dimension_numbers, True, precision),
                        x.dtype)


def _dot_rhs(ct, out, x, y, dimension_numbers, precision=None, **_):
    """∂(x·y)/∂y: ct contracted with x."""
    return convert_like(_dot_transpose(ct, x, np.ndim(y), dimension_numbers, False, precision),
                        y.dtype)


defvjp("dot_general", _dot_lhs, _dot_rhs)
