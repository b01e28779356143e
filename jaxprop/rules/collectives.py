"""Collectives: each rule is JAX 0.10's own transpose of that primitive (``lax/parallel.py``).

=========================  ====================================  ===============================
primitive (public API)     forward                               VJP: ct_in =
=========================  ====================================  ===============================
``psum`` (``lax.psum``     all-reduce sum over named axes;       broadcast ct back over the
under pmap, vmap,          positional int axes (vmap's batcher)  positional axes, then
``check_vma=False``)       are a local ``reduce_sum``            ``psum(ct, named axes)``
``psum_invariant``         all-reduce sum, result invariant      ``pvary(ct)``: values unchanged
(``lax.psum`` / ``pmean``
under ``check_vma=True``)
``pvary`` (inserted by     invariant → varying, values           ``psum_invariant(ct)``: the sum
JAX, ``lax.pcast``)        unchanged                             over devices of a replicated
                                                                 value's cotangents
``all_gather``             concatenate / stack the devices'      ``psum_scatter(ct)`` on the
                           blocks (varying → varying)            gathered dimension
``all_gather_invariant``   same values, varying → invariant      this device's block of ct
                                                                 (``dynamic_slice``)
``reduce_scatter``         sum over devices, keep own block      ``all_gather(ct)``
(``lax.psum_scatter``)
``ppermute``               send block of ``src`` to ``dst``       ``ppermute(ct)``, inverse perm
``all_to_all``             split / exchange / concatenate        ``all_to_all(ct)`` with split
                                                                 and concat axes swapped
``pbroadcast``             every device gets ``source``'s block  ``psum(ct)`` on ``source``,
                                                                 zeros elsewhere
``axis_index``             this device's index (int32)           none (integer)
``pmax`` / ``pmin``        all-reduce max / min                  none, as in JAX: a clear error
=========================  ====================================  ===============================

``pmean`` is ``psum`` (either flavour) then ``/ N``: it has no primitive of its own.

Two consequences of these transposes that users meet (JAX's semantics, reproduced exactly):
``psum`` and ``psum_invariant`` differ by a factor N in the per-device gradient (a psum is
"psum + broadcast", so its transpose sums the cotangents again); and under
``check_vma=True`` the gradient of a replicated parameter taken inside the body is already
the **sum** over devices (the ``pvary`` JAX inserted transposes to ``psum_invariant``), so a
later ``pmean`` of it is N× the single-device gradient — differentiate ``pmean(loss)``
instead.

Inside a ``check_vma=True`` body jaxprop's seed cotangent is invariant where JAX's matches
the loss's type; each rule first casts its cotangent to varying where JAX's would be
(``pvary``, which changes no value), so every value equals JAX's.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from jaxprop import _jax
from jaxprop.registry import defvjp
from jaxprop.rules.reductions import expand_to
from jaxprop.tracer import JaxpropTrace, handler

__all__ = ["NoCollectiveDerivative"]


def _axes(axis_name: Any) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _varying(ct: Any, axis_name: Any) -> Any:
    """``ct`` cast to varying over ``axis_name`` (a no-op on values; see the docstring)."""
    return _jax.pvary(ct, _axes(axis_name))


def _psum_vjp(ct: Any, out: Any, x: Any, *, axes: tuple, axis_index_groups: Any) -> Any:
    """psum: ct_x = psum(broadcast(ct), named axes) — psum is treated as psum + broadcast."""
    named = tuple(a for a in axes if not isinstance(a, int))
    positional = tuple(a % x.ndim for a in axes if isinstance(a, int))
    if positional:
        ct = expand_to(ct, x, positional)
    if not named:
        return ct
    return _jax.PSUM.bind(ct, axes=named, axis_index_groups=axis_index_groups)


defvjp("psum", _psum_vjp)
defvjp("psum_invariant",                                 # invariant ct → varying, no sum
       lambda ct, out, x, *, axes: _varying(ct, axes))
defvjp("pvary",                                          # Σ over devices: psum_invariant
       lambda ct, out, x, *, axes: _jax.PSUM_INVARIANT.bind(_varying(ct, axes), axes=axes))
defvjp("all_gather",                                     # each device keeps its slice of Σ ct
       lambda ct, out, x, *, axis_name, all_gather_dimension, axis_index_groups, tiled, **_:
       lax.psum_scatter(_varying(ct, axis_name), axis_name,
                        scatter_dimension=all_gather_dimension,
                        axis_index_groups=axis_index_groups, tiled=tiled))
defvjp("reduce_scatter",                                 # gather the slices' cts
       lambda ct, out, x, *, axis_name, scatter_dimension, axis_index_groups, tiled, **_:
       lax.all_gather(_varying(ct, axis_name), axis_name, axis=scatter_dimension,
                      axis_index_groups=axis_index_groups, tiled=tiled))
defvjp("ppermute",                                       # send cts back: inverse permutation
       lambda ct, out, x, *, axis_name, perm:
       lax.ppermute(_varying(ct, axis_name), axis_name, [(d, s) for s, d in perm]))
defvjp("all_to_all",                                     # the exchange, split ↔ concat
       lambda ct, out, x, *, axis_name, split_axis, concat_axis, axis_index_groups, tiled:
       _jax.ALL_TO_ALL.bind(_varying(ct, axis_name), axis_name=axis_name,
                            split_axis=concat_axis, concat_axis=split_axis,
                            axis_index_groups=axis_index_groups, tiled=tiled))


def _all_gather_invariant_vjp(ct: Any, out: Any, x: Any, *, all_gather_dimension: int,
                              axis_name: Any, axis_size: int, tiled: bool) -> Any:
    """all_gather_invariant: ct_x = this device's block of ct (no communication)."""
    size = ct.shape[all_gather_dimension] // axis_size
    block = lax.dynamic_slice_in_dim(ct, lax.axis_index(axis_name) * size, size,
                                     axis=all_gather_dimension)
    return block if tiled else lax.squeeze(block, (all_gather_dimension,))


def _pbroadcast_vjp(ct: Any, out: Any, x: Any, *, axis_name: Any, source: int) -> Any:
    """pbroadcast: ct_x = Σ_devices ct on the source device, 0 elsewhere. (JAX 0.10's own
    transpose fills with ``full_like``, so it handles scalars only; this is the same map for
    any shape.)"""
    total = lax.psum(ct, axis_name)
    return jnp.where(lax.axis_index(axis_name) == source, total, jnp.zeros_like(total))


defvjp("all_gather_invariant", _all_gather_invariant_vjp)
defvjp("pbroadcast", _pbroadcast_vjp)


class NoCollectiveDerivative(NotImplementedError):
    """``pmax`` / ``pmin`` of a differentiated value: JAX defines no derivative either."""


@handler("pmax", "pmin")
def no_derivative(trace: JaxpropTrace, primitive: Any, tracers: Any, params: dict) -> Any:
    """pmax / pmin have no JVP or transpose in JAX; say so, and what to write instead."""
    where = _jax.source_summary(_jax.current_source())
    reducer = "max" if primitive.name == "pmax" else "min"
    raise NoCollectiveDerivative(
        f"Differentiation rule for '{primitive.name}' not implemented"
        + (f" (at {where})" if where else "") + f": lax.{primitive.name} has no derivative "
        f"in JAX either (jax.grad raises the same). Apply it to lax.stop_gradient(x) if no "
        f"gradient should flow through it, or gather and reduce locally, which is "
        f"differentiable: jnp.{reducer}(lax.all_gather(x, axis_name), axis=0) (ties share "
        f"the gradient as jnp.{reducer}'s do).")
