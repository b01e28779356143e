"""Equinox-style filtered transformations: differentiate the floating-point arrays of a pytree.

An Equinox model is a pytree whose leaves mix arrays with activation functions, integers and
flags. ``eqx.filter_grad`` differentiates its floating arrays and gives ``None`` for the rest;
jaxprop's versions do the same with jaxprop's tracer and sweep (Equinox is not needed)::

    grads = jaxprop.filter_grad(loss)(model, x, y)      # as eqx.filter_grad(loss)(model, x, y)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))

The partition is ``eqx.is_inexact_array``'s: NumPy and JAX arrays of a floating or complex
dtype are differentiated; Python floats are not (they count as static, as in Equinox).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten, tree_unflatten

from jaxprop import api

__all__ = ["filter_grad", "filter_value_and_grad", "filter_vjp", "is_inexact_array"]


def is_inexact_array(x: Any) -> bool:
    """A NumPy or JAX array of a floating or complex dtype (``eqx.is_inexact_array``)."""
    return (isinstance(x, (jax.Array, np.ndarray, np.generic))
            and jnp.issubdtype(x.dtype, jnp.inexact))


def _partition(tree: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(``tree`` with None for every leaf that is not an inexact array, a function that puts
    the static leaves back into such a tree)."""
    leaves, treedef = tree_flatten(tree)
    keep = [is_inexact_array(x) for x in leaves]
    diff = tree_unflatten(treedef, [x if k else None for x, k in zip(leaves, keep)])

    def combine(diff_tree: Any) -> Any:
        new = iter(tree_flatten(diff_tree)[0])
        return tree_unflatten(treedef, [next(new) if k else x for x, k in zip(leaves, keep)])

    return diff, combine


def filter_value_and_grad(fun: Callable, *, has_aux: bool = False) -> Callable:
    """Like ``eqx.filter_value_and_grad``: ``(fun(x, …), ∂fun/∂x)`` w.r.t. the inexact arrays
    of the first argument ``x``; the gradient has ``x``'s structure, None at other leaves.

    >>> (loss, grads) = jaxprop.filter_value_and_grad(loss_fn)(model, x, y)
    """

    @functools.wraps(fun)
    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        diff, combine = _partition(x)
        return api.value_and_grad(lambda d: fun(combine(d), *args, **kwargs),
                                  has_aux=has_aux)(diff)

    return wrapper


def filter_grad(fun: Callable, *, has_aux: bool = False) -> Callable:
    """Like ``eqx.filter_grad``: ∂fun/∂x w.r.t. the inexact arrays of the first argument
    (None at every other leaf); ``(grads, aux)`` with ``has_aux``.

    >>> grads = jaxprop.filter_grad(lambda m, x: jnp.sum(m(x) ** 2))(model, x)
    """
    vg = filter_value_and_grad(fun, has_aux=has_aux)

    @functools.wraps(fun)
    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        value, grads = vg(x, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper


def filter_vjp(fun: Callable, *primals: Any, has_aux: bool = False) -> tuple:
    """Like ``eqx.filter_vjp``: ``(out, vjp_fn[, aux])`` for ``out = fun(*primals)``.

    ``vjp_fn(ct)`` takes a cotangent with arrays for the inexact arrays of ``out`` and None
    for its other leaves, and returns a tuple with one cotangent per primal: arrays for their
    inexact arrays, None elsewhere.
    """
    diff, combine = _partition(primals)
    static_out: list[Any] = []

    def diff_fun(*d: Any) -> Any:
        out = fun(*combine(d))
        out, aux = out if has_aux else (out, None)
        out_diff, out_combine = _partition(out)
        static_out.append(out_combine)
        return out_diff, aux

    out_diff, vjp_fn, aux = api.vjp(diff_fun, *diff, has_aux=True)
    out = static_out[-1](out_diff)
    return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)
