"""Reductions: a sum copies its cotangent back to every summand (broadcast = copy gate); a max
routes it to the maximal elements, shared equally among ties; a product sends each factor the
product of the others. Cumulative ops (prefix scans) are differentiated through the parallel
prefix scan that computes them, as JAX does, so ties and zeros are shared as in JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop import _jax
from jaxprop.registry import Node, defvjp, noderule
from jaxprop.rules._util import convert_like, sharding_of


def expand_to(ct, x, axes):
    """Broadcast a cotangent reduced over ``axes`` back to ``x``'s shape (and, under an
    Explicit mesh, to ``x``'s sharding, as JAX's transpose of a reduction does)."""
    shape = np.shape(x)
    kept = tuple(i for i in range(len(shape)) if i not in axes)
    return lax.broadcast_in_dim(ct, shape, kept, out_sharding=sharding_of(x))


def vjp_by_tracing(fn: Callable[..., Any], primals: Sequence[Any],
                   cts: Sequence[Any]) -> list[Any]:
    """Cotangents of ``primals`` for ``fn``'s outputs' ``cts``: jaxprop's own tape of ``fn``.

    For rules best stated as "differentiate this composite of simpler primitives" (prefix
    scans, generic window reductions). The sweep binds on the current trace, so it nests.
    """
    from jaxprop.sweep import backward      # the sweep imports nothing from rules; lazy anyway
    from jaxprop.tracer import run_traced
    trace, tracers, out = run_traced(fn, primals)
    outs = out if isinstance(out, (list, tuple)) else [out]
    return backward(trace.nodes, [trace.unwrap(o)[1] for o in outs], cts,
                    [t.slot for t in tracers])


def compiled_when_eager(fn: Callable[..., Any], static_argnames: Sequence[str]):
    """``fn`` jitted, except when differentiated again (an input is a jaxprop tracer).

    For rules made of many small operations: eagerly each would be dispatched (and compiled)
    alone, jitted they are one program per shape. Under a higher-order jaxprop trace a jit
    call is inlined op by op anyway, so there ``fn`` runs directly.
    """
    from jaxprop.tracer import JaxpropTracer
    jitted = jax.jit(fn, static_argnames=tuple(static_argnames))

    def call(*args, **params):
        traced = any(isinstance(a, JaxpropTracer) for a in jax.tree.leaves(args))
        return (fn if traced else jitted)(*args, **params)
    return call


# -- total reductions ------------------------------------------------------------------------
defvjp("reduce_sum",                                     # Σ: every element gets ct
       lambda ct, out, x, axes, **_: convert_like(expand_to(ct, x, axes), x.dtype))


def _chooser(ct, out, x, axes, **_):
    """max/min: ct / (number of tied extrema), to each element equal to the result."""
    hits = (x == expand_to(out, x, axes)).astype(ct.dtype)
    count = lax.reduce_sum(hits, axes)
    return expand_to(ct / count, x, axes) * hits


defvjp("reduce_max", _chooser)
defvjp("reduce_min", _chooser)


def _reduce_prod(ct, out, x, axes, **_):
    """∏x: ∂/∂xᵢ = ∏_{j≠i} xⱼ = (prefix product before i)·(suffix product after i), exact at 0."""
    shape = np.shape(x)
    rest = tuple(i for i in range(len(shape)) if i not in axes)
    perm = tuple(axes) + rest
    flat = lax.transpose(x, perm).reshape((-1,) + tuple(shape[i] for i in rest))
    one = np.ones((), x.dtype)
    no_pad = [(0, 0, 0)] * (flat.ndim - 1)
    before = lax.cumprod(lax.pad(flat, one, [(1, -1, 0)] + no_pad), axis=0)
    after = lax.cumprod(lax.pad(flat, one, [(-1, 1, 0)] + no_pad), axis=0, reverse=True)
    others = (before * after).reshape(tuple(shape[i] for i in perm))
    return expand_to(ct, x, axes) * lax.transpose(others, tuple(np.argsort(perm)))


defvjp("reduce_prod", _reduce_prod)


# -- prefix scans ----------------------------------------------------------------------------
defvjp("cumsum",                                         # yᵢ = Σ_{j≤i} xⱼ: ctₓ = reverse cumsum
       lambda ct, out, x, axis, reverse: lax.cumsum(ct, axis, reverse=not reverse))


def _by_prefix_scan(combine: Callable[[Any, Any], Any]):
    """cum-op(x) = associative_scan(combine, x): VJP of that scan's tape (as JAX's JVP)."""
    def scan_vjp(ct, x, axis, reverse):
        scan = lambda v: lax.associative_scan(combine, v, reverse=reverse, axis=axis)
        return vjp_by_tracing(scan, [x], [ct])[0]

    scan_vjp = compiled_when_eager(scan_vjp, ("axis", "reverse"))
    return lambda ct, out, x, axis, reverse: scan_vjp(ct, x, axis=axis, reverse=reverse)


defvjp("cumprod", _by_prefix_scan(lax.mul))
defvjp("cummax", _by_prefix_scan(lax.max))
defvjp("cummin", _by_prefix_scan(lax.min))
defvjp("cumlogsumexp", _by_prefix_scan(jnp.logaddexp))


# -- variadic reduce (lax.reduce with a user's reducer) ---------------------------------------
@noderule("reduce")
def _reduce(node: Node, cts: Sequence[Any]) -> list[Any]:
    """reduce((x₁…xₙ), inits, f, axes): the reduction is a tree of f applications (halves
    against halves); its VJP is that tree's tape swept back — for a reducer that selects
    (max carrying an index or a second value), the cotangent reaches the selected elements."""
    n = len(node.inputs) // 2
    if any(s is not None for s in node.in_slots[n:]):
        raise NotImplementedError(
            "Gradient of general lax.reduce with respect to its initial values is not "
            "implemented (nor in JAX); pass constant initial values.")
    wanted = tuple(i for i in range(n) if node.in_slots[i] is not None)
    in_cts = iter(_reduce_vjp(list(node.inputs[:n]), list(node.inputs[n:]), list(cts),
                              jaxpr=node.params["jaxpr"], axes=tuple(node.params["dimensions"]),
                              wanted=wanted))
    return [next(in_cts) if s is not None else None for s in node.in_slots[:n]] + [None] * n


def _reduce_vjp_traced(operands, inits, cts, *, jaxpr, axes, wanted):
    """Cotangents of ``operands[wanted]``: the sweep of the reduction tree's tape."""
    reducer = _jax.jaxpr_as_fun(jaxpr)

    def tree(*diff_operands):
        xs = list(operands)
        for i, x in zip(wanted, diff_operands):
            xs[i] = x
        return _reduce_tree(reducer, xs, inits, axes)

    return vjp_by_tracing(tree, [operands[i] for i in wanted], cts)


_reduce_vjp = compiled_when_eager(_reduce_vjp_traced, ("jaxpr", "axes", "wanted"))


def _reduce_tree(reducer: Callable, xs: list, inits: Sequence[Any], axes: tuple) -> list:
    """reduce(xs, inits, reducer, axes) as ⌈log₂ N⌉ levels of elementwise reducer calls: the
    reduced axes flattened to the front, the first half combined with the second (an odd
    element out is paired with the initial value)."""
    shape = np.shape(xs[0])
    rest = tuple(d for d in range(len(shape)) if d not in axes)
    rest_shape = tuple(shape[d] for d in rest)
    count = int(np.prod([shape[a] for a in axes], dtype=int))
    xs = [lax.reshape(x, (count, *rest_shape), axes + rest) for x in xs]
    combine = reducer
    for _ in range(len(rest_shape) + 1):
        combine = jax.vmap(combine)
    while xs[0].shape[0] > 1:
        half = (xs[0].shape[0] + 1) // 2
        first = [x[:half] for x in xs]
        second = [x[half:] for x in xs]
        if second[0].shape[0] < half:   # odd: the init value stands in for the missing one
            second = [jnp.concatenate([s, jnp.full((1, *rest_shape), i, s.dtype)])
                      for s, i in zip(second, inits)]
        xs = list(combine(*first, *second))
    if xs[0].shape[0] == 0:
        return [jnp.full(rest_shape, i, x.dtype) for x, i in zip(xs, inits)]
    return [x[0] for x in xs]
