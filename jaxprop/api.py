"""Drop-in replacements for JAX's reverse-mode API, computed by jaxprop's tracer and sweep.

``grad``, ``value_and_grad``, ``vjp``, ``jacrev`` and ``hessian`` take JAX's signatures. None
of them calls JAX's autodiff: the function runs under a :class:`~jaxprop.tracer.JaxpropTrace`
and the gradient is the reverse sweep of the tape it records.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial, tree_flatten, tree_map, tree_structure, tree_unflatten

from jaxprop import _jax
from jaxprop.eager import sweep
from jaxprop.tracer import Tape, is_differentiable, run_traced

__all__ = ["grad", "hessian", "jacrev", "value_and_grad", "vjp"]

Argnums = int | Sequence[int]


# -- the core: trace once, pull back many times -------------------------------------------
def _trace(fun: Callable, primals: Sequence[Any], has_aux: bool
           ) -> tuple[Any, Callable[[Any], tuple], Any]:
    """Run ``fun(*primals)`` on a tape; return (output, pullback, aux)."""
    leaves, in_tree = tree_flatten(primals)
    diff = [is_differentiable(_jax.aval_of(x)) for x in leaves]
    diff_leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x)
                   for x, d in zip(leaves, diff) if d]

    def flat_fun(*tracers: Any) -> Any:
        it = iter(tracers)
        args = tree_unflatten(in_tree, [next(it) if d else x for x, d in zip(leaves, diff)])
        return fun(*args)

    trace, tracers, result = run_traced(flat_fun, diff_leaves)
    if has_aux:
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError("has_aux=True requires the function to return a pair (output, aux),"
                            f" but it returned {type(result).__name__}.")
        out, aux = result
        aux = tree_map(lambda x: trace.unwrap(x)[0], aux)
    else:
        out, aux = result, None
    out_leaves, out_tree = tree_flatten(out)
    out_values, out_slots = zip(*map(trace.unwrap, out_leaves)) if out_leaves else ((), ())
    in_slots = iter(t.slot for t in tracers)
    tape = Tape(trace.nodes, [next(in_slots) if d else None for d in diff], out_slots)
    static = functools.partial(_pullback, in_tree=in_tree, in_specs=leaves_like(leaves))
    pullback = Partial(static, tape, tree_unflatten(out_tree, list(out_values)))
    return tree_unflatten(out_tree, list(out_values)), pullback, aux


def leaves_like(leaves: Sequence[Any]) -> list[Any]:
    """Types of the primal leaves (shape, dtype, sharding), kept for zero cotangents."""
    return [_jax.aval_of(x) for x in leaves]


def _pullback(tape: Tape, out: Any, cotangent: Any, *, in_tree: Any, in_specs: Any) -> tuple:
    """Cotangents of the primals, given the output's cotangent (same structure as output)."""
    ct_leaves, ct_tree = tree_flatten(cotangent)
    if ct_tree != tree_structure(out):
        raise ValueError("The cotangent must have the same pytree structure as the function's "
                         f"output: expected {tree_structure(out)}, got {ct_tree}.")
    for ct, o in zip(ct_leaves, tree_flatten(out)[0]):
        if np.shape(ct) != np.shape(o):
            raise ValueError(f"Cotangent shape {np.shape(ct)} does not match the output's "
                             f"shape {np.shape(o)}.")
    return tuple(tree_unflatten(in_tree, sweep(tape, ct_leaves, in_specs)))


def _unit(dtype: Any) -> Any:
    """The scalar 1 of ``dtype``: the seed cotangent of a scalar loss, made anew for each
    gradient: a cached array would stay on the mesh current when it was made, and every
    later gradient on another mesh (or on one device) would fail."""
    with _jax.outside_traces():  # not a per-device value of an eager shard_map body
        return jnp.ones((), dtype)


# -- public API ---------------------------------------------------------------------------
def vjp(fun: Callable, *primals: Any, has_aux: bool = False, reduce_axes: Sequence = ()
        ) -> tuple[Any, Callable] | tuple[Any, Callable, Any]:
    """Like ``jax.vjp``: ``(fun(*primals), vjp_fn[, aux])`` with ``vjp_fn(ct) = ctᵀ ∂fun``.

    ``vjp_fn`` is a :class:`jax.tree_util.Partial` whose leaves are the tape's residuals, so it
    can be passed into and returned from ``jax.jit``.

    >>> y, f_vjp = jaxprop.vjp(jnp.sin, 0.5)
    >>> f_vjp(1.0)   # (cos(0.5),)
    """
    del reduce_axes
    out, pullback, aux = _trace(fun, primals, has_aux)
    return (out, pullback, aux) if has_aux else (out, pullback)


def value_and_grad(fun: Callable, argnums: Argnums = 0, has_aux: bool = False,
                   holomorphic: bool = False, allow_int: bool = False,
                   reduce_axes: Sequence = ()) -> Callable:
    """Like ``jax.value_and_grad``: ``(f(x), ∇f(x))`` for scalar-valued ``f``.

    >>> jaxprop.value_and_grad(lambda x: x ** 2)(3.0)   # (9.0, 6.0)
    """
    del reduce_axes

    @functools.wraps(fun)
    def value_and_grad_f(*args: Any, **kwargs: Any) -> Any:
        nums = _check_argnums(argnums, len(args))
        chosen = tuple(args[i] for i in nums)
        _check_inputs(chosen, holomorphic, allow_int)

        def partial_fun(*diff_args: Any) -> Any:
            full = list(args)
            for i, a in zip(nums, diff_args):
                full[i] = a
            return fun(*full, **kwargs)

        out, pullback, aux = _trace(partial_fun, chosen, has_aux)
        _check_scalar_output(out, holomorphic)
        seed = _jax.pvary(_unit(_jax.aval_of(out).dtype), tuple(_jax.varying_axes(out)))
        grads = pullback(seed)  # varying where the loss is, as in a shard_map body
        grads = grads[0] if isinstance(argnums, int) else grads
        return ((out, aux), grads) if has_aux else (out, grads)

    return value_and_grad_f


def grad(fun: Callable, argnums: Argnums = 0, has_aux: bool = False,
         holomorphic: bool = False, allow_int: bool = False,
         reduce_axes: Sequence = ()) -> Callable:
    """Like ``jax.grad``: the gradient ∇f of a scalar-valued ``f`` w.r.t. ``argnums``.

    >>> jaxprop.grad(lambda x, y: (x + y) * 2.0, argnums=(0, 1))(1.0, 2.0)   # (2.0, 2.0)
    """
    vg = value_and_grad(fun, argnums, has_aux, holomorphic, allow_int, reduce_axes)

    @functools.wraps(fun)
    def grad_f(*args: Any, **kwargs: Any) -> Any:
        (_, aux), g = vg(*args, **kwargs) if has_aux else ((None, None), vg(*args, **kwargs)[1])
        return (g, aux) if has_aux else g

    return grad_f


def jacrev(fun: Callable, argnums: Argnums = 0, has_aux: bool = False,
           holomorphic: bool = False, allow_int: bool = False) -> Callable:
    """Like ``jax.jacrev``: the Jacobian ∂f/∂x by one pullback per output element (vmapped).

    The result has the output's structure outside and the inputs' structure inside, with
    shape ``out.shape + in.shape`` at each leaf pair.
    """

    @functools.wraps(fun)
    def jacfun(*args: Any, **kwargs: Any) -> Any:
        nums = _check_argnums(argnums, len(args))
        chosen = tuple(args[i] for i in nums)
        _check_inputs(chosen, holomorphic, allow_int)

        def partial_fun(*diff_args: Any) -> Any:
            full = list(args)
            for i, a in zip(nums, diff_args):
                full[i] = a
            return fun(*full, **kwargs)

        out, pullback, aux = _trace(partial_fun, chosen, has_aux)
        jac = _jacobian_from_pullback(out, pullback, isinstance(argnums, int))
        return (jac, aux) if has_aux else jac

    return jacfun


def _jacobian_from_pullback(out: Any, pullback: Callable, single: bool) -> Any:
    """Stack pullbacks of the standard basis of the output into ``out.shape + in.shape``."""
    out_leaves, out_tree = tree_flatten(out)
    sizes = [int(np.prod(np.shape(o))) for o in out_leaves]
    total = sum(sizes)
    dtype = jnp.result_type(*out_leaves) if out_leaves else jnp.float32
    eye = jnp.eye(total, dtype=dtype)
    offsets = np.cumsum([0] + sizes)

    def basis_ct(row: Any) -> Any:
        return tree_unflatten(out_tree, [
            row[a:b].reshape(np.shape(o)).astype(_jax.aval_of(o).dtype)
            for a, b, o in zip(offsets[:-1], offsets[1:], out_leaves)])

    rows = jax.vmap(lambda r: pullback(basis_ct(r)))(eye)  # leaves: (total,) + in.shape
    per_out = [tree_map(lambda g, a=a, b=b, o=o: g[a:b].reshape(np.shape(o) + g.shape[1:]),
                        rows[0] if single else rows)
               for a, b, o in zip(offsets[:-1], offsets[1:], out_leaves)]
    return tree_unflatten(out_tree, per_out)  # output structure outside, inputs' inside


def hessian(fun: Callable, argnums: Argnums = 0, has_aux: bool = False,
            holomorphic: bool = False) -> Callable:
    """Like ``jax.hessian``: ∂²f/∂x², as jaxprop's reverse-over-reverse ``jacrev(jacrev(f))``."""
    return jacrev(jacrev(fun, argnums, has_aux=has_aux, holomorphic=holomorphic), argnums,
                  has_aux=has_aux, holomorphic=holomorphic)


# -- checks with JAX's messages -----------------------------------------------------------
def _check_argnums(argnums: Argnums, nargs: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in nums:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"argnums must be an int or a tuple of ints, got {argnums!r}.")
        if not -nargs <= i < nargs:
            raise ValueError(f"argnums {argnums!r} out of bounds for a function called with "
                             f"{nargs} positional argument(s).")
    return tuple(int(i) % nargs for i in nums)


def _check_inputs(args: tuple, holomorphic: bool, allow_int: bool) -> None:
    for x in tree_flatten(args)[0]:
        dtype = _jax.aval_of(x).dtype
        if holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError("grad with holomorphic=True requires inputs with complex dtype, "
                            f"but got {dtype.name}.")
        if not allow_int and not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                "grad requires real- or complex-valued inputs (input dtype that is a sub-dtype "
                f"of np.inexact), but got {dtype.name}. If you want to use Boolean- or "
                "integer-valued inputs, use vjp or set allow_int to True.")


def _check_scalar_output(out: Any, holomorphic: bool) -> None:
    leaves = tree_flatten(out)[0]
    if len(leaves) != 1 or not hasattr(_jax.aval_of(leaves[0]), "shape"):
        raise TypeError(f"Gradient only defined for scalar-output functions. Output was {out}.")
    aval = _jax.aval_of(leaves[0])
    if aval.shape != ():
        raise TypeError("Gradient only defined for scalar-output functions. "
                        f"Output had shape: {aval.shape}.")
    if not holomorphic and not jnp.issubdtype(aval.dtype, jnp.floating):
        raise TypeError("grad requires real-valued outputs (output dtype that is a sub-dtype "
                        f"of np.floating), but got {aval.dtype.name}. For holomorphic "
                        "differentiation, pass holomorphic=True. For differentiating "
                        "non-holomorphic functions involving complex outputs, use jax.vjp "
                        "directly.")

