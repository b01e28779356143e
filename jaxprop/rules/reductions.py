"""Reductions: a sum copies its cotangent back to every summand (broadcast = copy gate)."""

from __future__ import annotations

import numpy as np
from jax import lax

from jaxprop.rules._util import convert_like
from jaxprop.registry import defvjp


def expand_to(ct, x, axes):
    """Broadcast a cotangent reduced over ``axes`` back to ``x``'s shape."""
    shape = np.shape(x)
    kept = tuple(i for i in range(len(shape)) if i not in axes)
    return lax.broadcast_in_dim(ct, shape, kept)


defvjp("reduce_sum",                                     # Σ: every element gets ct
       lambda ct, out, x, axes, **_: convert_like(expand_to(ct, x, axes), x.dtype))
