"""Linear algebra. ``dot_general`` is bilinear: each operand's cotangent is the cotangent
contracted with the *other* operand (the mul gate, with axes)."""

from __future__ import annotations

import jax
import numpy as np
from jax import lax

from jaxprop.registry import defvjp
from jaxprop.rules._util import convert_like, respec, sharding_of


def _dot_transpose(ct, other, this, dims, this_is_lhs, precision):
    """Cotangent of one dot_general operand: contract ``ct`` with ``other`` over ``other``'s
    free axes, then permute the result into this operand's axis order. Of the two operand
    orders, the one that needs no permutation is used when there is one. Under a mesh with
    Explicit axes the contraction's ``out_sharding`` is this operand's sharding, its spec put
    in the contraction's axis order (JAX's own transpose does the same), so the cotangent is
    sharded like the operand."""
    (c_l, c_r), (b_l, b_r) = dims
    c_this, c_other = (c_l, c_r) if this_is_lhs else (c_r, c_l)
    b_this, b_other = (b_l, b_r) if this_is_lhs else (b_r, b_l)
    this_ndim = np.ndim(this)
    nb = len(b_this)
    free_this = [i for i in range(this_ndim) if i not in c_this and i not in b_this]
    free_other = [i for i in range(np.ndim(other)) if i not in c_other and i not in b_other]
    # ct's axes: batch, lhs free, rhs free.
    ct_free_other = list(range(nb + len(free_this), nb + len(free_this) + len(free_other))
                         if this_is_lhs else range(nb, nb + len(free_other)))
    rank = {a: r for r, a in enumerate(sorted(c_other))}  # other's leftover axes, in order
    batch = {a: k for k, a in enumerate(b_this)}
    # Order A: dot(ct, other) -> batch, this free, other's contracting axes.
    pos_a = {**batch, **{a: nb + j for j, a in enumerate(free_this)},
             **{a: nb + len(free_this) + rank[o] for a, o in zip(c_this, c_other)}}
    # Order B: dot(other, ct) -> batch, other's contracting axes, this free.
    pos_b = {**batch, **{a: nb + rank[o] for a, o in zip(c_this, c_other)},
             **{a: nb + len(c_other) + j for j, a in enumerate(free_this)}}
    perm_a = tuple(pos_a[a] for a in range(this_ndim))
    perm_b = tuple(pos_b[a] for a in range(this_ndim))
    identity = tuple(range(this_ndim))
    ct_batch = list(range(nb))
    sharding = _cotangent_sharding(this)
    if perm_b == identity and perm_a != identity:
        return lax.dot_general(other, ct, ((free_other, ct_free_other), (list(b_other), ct_batch)),
                               precision=precision, out_sharding=sharding)
    if sharding is not None:  # the spec in order A: position pos_a[a] holds axis a's entry
        spec = sharding.spec
        sharding = respec(sharding, [spec[a] if a < len(spec) else None
                                     for a in np.argsort(perm_a)])
    result = lax.dot_general(ct, other, ((ct_free_other, free_other), (ct_batch, list(b_other))),
                             precision=precision, out_sharding=sharding)
    return lax.transpose(result, perm_a) if perm_a != identity else result


def _cotangent_sharding(this):
    """The sharding the operand's cotangent must have: its own under an Explicit mesh, or
    replicated on the current Explicit mesh for an operand that carries none (as JAX)."""
    sharding = sharding_of(this)
    if sharding is None and jax.sharding.get_abstract_mesh().explicit_axes:
        return jax.sharding.NamedSharding(jax.sharding.get_abstract_mesh(), jax.P())
    return sharding


def _dot_lhs(ct, out, x, y, dimension_numbers, precision=None, **_):
    """∂(x·y)/∂x: ct contracted with y."""
    return convert_like(_dot_transpose(ct, y, x, dimension_numbers, True, precision),
                        x.dtype)


def _dot_rhs(ct, out, x, y, dimension_numbers, precision=None, **_):
    """∂(x·y)/∂y: ct contracted with x."""
    return convert_like(_dot_transpose(ct, x, y, dimension_numbers, False, precision),
                        y.dtype)


defvjp("dot_general", _dot_lhs, _dot_rhs)
