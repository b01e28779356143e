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
def _trace(fun: Callable, primals: Sequence[Any], has_aux: bool, name: str | None = None
           ) -> tuple[Any, Callable[[Any], tuple], Any]:
    """Run ``fun(*primals)`` on a tape; return (output, pullback, aux). ``name``: the
    function's name in the pullback's error messages (default: ``fun``'s)."""
    leaves, in_tree = tree_flatten(primals)
    _check_args(leaves)
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
            raise TypeError("expected function with aux output to return a two-element "
                            f"tuple, but got type {type(result)} with value {result!r}")
        out, aux = result
        aux = tree_map(lambda x: trace.unwrap(x)[0], aux)
    else:
        out, aux = result, None
    out_leaves, out_tree = tree_flatten(out)
    out_values, out_slots = zip(*map(trace.unwrap, out_leaves)) if out_leaves else ((), ())
    in_slots = iter(t.slot for t in tracers)
    tape = Tape(trace.nodes, [next(in_slots) if d else None for d in diff], out_slots)
    static = _VjpFunction(name or _name_of(fun), in_tree, leaves_like(leaves))
    pullback = Partial(static, tape, tree_unflatten(out_tree, list(out_values)))
    return tree_unflatten(out_tree, list(out_values)), pullback, aux


def leaves_like(leaves: Sequence[Any]) -> list[Any]:
    """Types of the primal leaves (shape, dtype, sharding), kept for zero cotangents."""
    return [_jax.aval_of(x) for x in leaves]


def _name_of(fun: Any) -> str:
    fun = getattr(fun, "func", fun)  # functools.partial
    return getattr(fun, "__name__", None) or type(fun).__name__


class _VjpFunction:
    """The static part of a ``vjp_fn``: called as ``vjp_fn(cotangent)`` it pulls the
    cotangent of the output back through the tape to the primals."""

    __slots__ = ("name", "in_tree", "in_specs")

    def __init__(self, name: str, in_tree: Any, in_specs: list) -> None:
        self.name, self.in_tree, self.in_specs = name, in_tree, in_specs

    def __call__(self, tape: Tape, out: Any, *cotangent: Any) -> tuple:
        if len(cotangent) != 1:
            raise TypeError(_VJP_ARITY.format(self.name, len(cotangent)))
        ct_leaves = self._checked(out, cotangent[0])
        return tuple(tree_unflatten(self.in_tree, sweep(tape, ct_leaves, self.in_specs)))

    def _checked(self, out: Any, cotangent: Any) -> list[Any]:
        """The cotangent's leaves as arrays of the outputs' dtypes; JAX's errors for a wrong
        structure, shape or dtype."""
        ct_leaves, ct_tree = tree_flatten(cotangent)
        out_leaves, out_tree = tree_flatten(out)
        if ct_tree != out_tree:
            raise ValueError(
                "unexpected tree structure.\n\nThe argument to a VJP function returned by "
                "`jaxprop.vjp` must match the pytree structure of the differentiated function "
                f"{self.name}: expected {out_tree}, got {ct_tree}.")
        checked = []
        for ct, o in zip(ct_leaves, out_leaves):
            out_aval = _jax.aval_of(o)
            error = _jax.cotangent_type_error(ct, out_aval)
            if error is not None:
                raise ValueError(error)
            if not isinstance(ct, jax.Array) or ct.dtype != out_aval.dtype:
                if is_differentiable(out_aval):  # Python scalars, weakly typed arrays
                    ct = jnp.asarray(ct, out_aval.dtype)
            checked.append(ct)
        return checked


_VJP_ARITY = """
The function returned by `jaxprop.vjp` applied to {} was called with {} arguments,
but functions returned by `jaxprop.vjp` must be called with a single argument
corresponding to the single value returned by the function being differentiated
(even if that returned value is a tuple or other container).

For example, if we have:

  def f(x):
    return (x, x)
  _, f_vjp = jaxprop.vjp(f, 1.0)

the function `f` returns a single tuple as output, and so we call `f_vjp` with a
single tuple as its argument:

  x_bar, = f_vjp((2.0, 2.0))

If we instead call `f_vjp(2.0, 2.0)`, with the values 'splatted out' as
arguments rather than in a tuple, this error can arise.
"""


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
        _check_inputs("grad", chosen, holomorphic, allow_int)

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
        _check_inputs("jacrev", chosen, holomorphic, allow_int)

        def partial_fun(*diff_args: Any) -> Any:
            full = list(args)
            for i, a in zip(nums, diff_args):
                full[i] = a
            return fun(*full, **kwargs)

        out, pullback, aux = _trace(partial_fun, chosen, has_aux)
        _check_output_dtype("jacrev", out, holomorphic)
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
    most = max(nums, default=0)
    if most >= nargs:
        raise TypeError(f"differentiating with respect to argnums={argnums} requires at least "
                        f"{most + 1} positional arguments to be passed by the caller, but got "
                        f"only {nargs} positional arguments.")
    if any(i < -nargs for i in nums):
        raise TypeError(f"argnums={argnums} is out of bounds for a function called with "
                        f"{nargs} positional arguments.")
    normal = tuple(int(i) % nargs for i in nums)
    if len(set(normal)) != len(normal):  # JAX fails here too (with an internal TypeError)
        raise TypeError(f"argnums={argnums} names an argument more than once; differentiate "
                        "with respect to each argument once and reuse its gradient.")
    return normal


def _check_args(leaves: Sequence[Any]) -> None:
    for x in leaves:
        if not _jax.is_valid_jaxtype(x):
            raise TypeError(f"Argument '{x}' of type {type(x)} is not a valid JAX type.")


def _check_inputs(name: str, args: tuple, holomorphic: bool, allow_int: bool) -> None:
    leaves = tree_flatten(args)[0]
    _check_args(leaves)
    for x in leaves:
        dtype = _jax.aval_of(x).dtype
        if holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"{name} with holomorphic=True requires inputs with complex "
                            f"dtype, but got {dtype.name}.")
        if not allow_int and not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name} requires real- or complex-valued inputs (input dtype that is a "
                f"sub-dtype of np.inexact), but got {dtype.name}. If you want to use Boolean- "
                "or integer-valued inputs, use vjp or set allow_int to True.")


def _check_scalar_output(out: Any, holomorphic: bool) -> None:
    leaves = tree_flatten(out)[0]
    if len(leaves) != 1 or not hasattr(_jax.aval_of(leaves[0]), "shape"):
        raise TypeError(f"Gradient only defined for scalar-output functions. Output was {out}.")
    aval = _jax.aval_of(leaves[0])
    if aval.shape != ():
        raise TypeError("Gradient only defined for scalar-output functions. "
                        f"Output had shape: {aval.shape}.")
    _check_output_dtype("grad", out, holomorphic)


def _check_output_dtype(name: str, out: Any, holomorphic: bool) -> None:
    """Reverse mode of ``grad`` / ``jacrev`` needs real outputs, or complex ones with
    ``holomorphic=True`` (else ``jax.vjp``): JAX's rule and messages."""
    for leaf in tree_flatten(out)[0]:
        dtype = _jax.aval_of(leaf).dtype
        complex_out = jnp.issubdtype(dtype, jnp.complexfloating)
        if holomorphic and not complex_out:
            raise TypeError(f"{name} with holomorphic=True requires outputs with complex "
                            f"dtype, but got {dtype.name}.")
        if not holomorphic and complex_out:
            raise TypeError(
                f"{name} requires real-valued outputs (output dtype that is a sub-dtype of "
                f"np.floating), but got {dtype.name}. For holomorphic differentiation, pass "
                "holomorphic=True. For differentiation of non-holomorphic functions involving "
                "complex outputs, use jax.vjp directly.")
        if not holomorphic and not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} requires real-valued outputs (output dtype that is a sub-dtype of "
                f"np.floating), but got {dtype.name}. For holomorphic differentiation, pass "
                "holomorphic=True. For differentiation of non-holomorphic functions involving "
                "complex outputs, use jax.vjp directly.")
