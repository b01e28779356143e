"""Structural gates: they move, copy or drop elements, so their VJPs move cotangents back.

A broadcast copies, so its VJP sums (the copy gate); a reshape/transpose permutes, so its VJP
applies the inverse permutation; a slice selects, so its VJP pads with zeros.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from jaxprop.registry import defvjp
from jaxprop.rules._util import convert_like


def _broadcast_in_dim(ct, out, x, *dyn, shape, broadcast_dimensions, **_):
    """broadcast_in_dim: sum ct over the new axes and over axes broadcast from size 1."""
    x_shape = np.shape(x)
    new_axes = tuple(i for i in range(len(shape)) if i not in broadcast_dimensions)
    ones = tuple(d for i, d in enumerate(broadcast_dimensions)
                 if x_shape[i] == 1 and shape[d] != 1)
    summed = lax.reduce_sum(ct, new_axes + ones) if new_axes + ones else ct
    return convert_like(summed.reshape(x_shape), x.dtype)


defvjp("broadcast_in_dim", _broadcast_in_dim)
defvjp("reshape", lambda ct, out, x, *dyn, **_: ct.reshape(np.shape(x)))    # inverse reshape
defvjp("squeeze", lambda ct, out, x, **_: ct.reshape(np.shape(x)))
defvjp("expand_dims", lambda ct, out, x, **_: ct.reshape(np.shape(x)))
defvjp("transpose",                                                         # inverse perm
       lambda ct, out, x, permutation: lax.transpose(ct, tuple(np.argsort(permutation))))

