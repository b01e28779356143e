"""Property-test VJPs against JAX: ``check_vjp(f, *args)``.

Used by jaxprop's own rule tests and meant for users who write their own rules
(``jaxprop.defvjp``) or ``jax.custom_vjp`` functions.

Example::

    from jaxprop.testing import check_vjp
    check_vjp(jnp.tanh, jnp.linspace(-2.0, 2.0, 7), order=2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten, tree_map, tree_unflatten

from jaxprop import api

__all__ = ["check_vjp", "default_tolerance", "random_like"]


def default_tolerance(dtype: Any) -> float:
    """Relative/absolute tolerance that the dtype's rounding allows."""
    dtype = jnp.dtype(dtype)
    return {jnp.dtype(jnp.bfloat16): 3e-2, jnp.dtype(jnp.float16): 1e-2,
            jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.complex64): 2e-5,
            jnp.dtype(jnp.float64): 1e-10, jnp.dtype(jnp.complex128): 1e-10}.get(dtype, 1e-5)


def random_like(tree: Any, seed: int = 0) -> Any:
    """Standard-normal arrays shaped like the floating leaves of ``tree`` (None elsewhere)."""
    leaves, treedef = tree_flatten(tree)
    rng = np.random.default_rng(seed)
    out = []
    for x in leaves:
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            v = rng.normal(size=np.shape(x)) + 1j * rng.normal(size=np.shape(x))
            out.append(jnp.asarray(v, dtype))
        elif jnp.issubdtype(dtype, jnp.inexact):
            out.append(jnp.asarray(rng.normal(size=np.shape(x)), dtype))
        else:
            out.append(np.zeros(np.shape(x), jax.dtypes.float0))
    return tree_unflatten(treedef, out)


def check_vjp(f: Callable, *args: Any, order: int = 1, seed: int = 0,
              rtol: float | None = None, atol: float | None = None,
              finite_differences: bool = False, eps: float = 1e-4) -> None:
    """Assert that jaxprop's VJP of ``f`` at ``args`` equals ``jax.vjp``'s, to ``order``.

    For each order k = 1..order, the k-th derivative is contracted with random cotangents and
    compared leaf by leaf: jaxprop's ``vjp`` applied k times versus JAX's. With
    ``finite_differences=True`` the first-order VJP is also checked against central differences
    along a random direction v: ⟨ct, (f(x + εv) − f(x − εv)) / 2ε⟩ ≈ ⟨vjp(ct), v⟩ (use float64).
    """
    g_jax, g_ours = f, f
    for k in range(1, order + 1):
        out = g_jax(*args)
        ct = random_like(out, seed + k)
        out_ours, pull_ours = api.vjp(g_ours, *args)
        out_jax, pull_jax = jax.vjp(g_jax, *args)
        _assert_close(out_ours, out_jax, rtol, atol, f"order {k} primal output")
        _assert_close(pull_ours(ct), pull_jax(ct), rtol, atol, f"order {k} VJP")
        if finite_differences and k == 1:
            _check_finite_differences(f, args, ct, pull_ours(ct), eps, rtol, atol)
        if k < order:
            g_jax = _sum_pulled_back(jax.vjp, g_jax, ct, seed + 100 * k)
            g_ours = _sum_pulled_back(api.vjp, g_ours, ct, seed + 100 * k)


def _sum_pulled_back(vjp: Callable, g: Callable, ct: Any, seed: int) -> Callable:
    """x ↦ ⟨w, vjp(g)(x)(ct)⟩ with fixed random w: a scalar whose gradient is the next order."""

    def h(*xs: Any) -> Any:
        cts_in = vjp(g, *xs)[1](ct)
        w = random_like(cts_in, seed)
        terms = [jnp.sum(jnp.real(a * b)) for a, b in zip(tree_flatten(cts_in)[0],
                                                            tree_flatten(w)[0])
                 if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
        return sum(terms) if terms else jnp.zeros(())

    return h


def _check_finite_differences(f: Callable, args: tuple, ct: Any, vjp_ct: Any, eps: float,
                              rtol: float | None, atol: float | None) -> None:
    v = random_like(args, 12345)
    shift = lambda s: tree_map(lambda x, d: x + s * eps * d if d.dtype != jax.dtypes.float0
                               else x, args, v)
    fp, fm = f(*shift(1.0)), f(*shift(-1.0))
    lhs = sum(jnp.sum(c * (a - b)) / (2 * eps) for c, a, b in
              zip(tree_flatten(ct)[0], tree_flatten(fp)[0], tree_flatten(fm)[0]))
    rhs = sum(jnp.sum(a * d) for a, d in zip(tree_flatten(vjp_ct)[0], tree_flatten(v)[0])
              if d.dtype != jax.dtypes.float0)
    tol = rtol if rtol is not None else 1e-5
    scale = max(1.0, float(jnp.abs(rhs)))
    if not abs(float(jnp.real(lhs - rhs))) <= (atol or 0) + tol * scale * 10:
        raise AssertionError(f"finite differences disagree: {float(lhs)} vs VJP {float(rhs)}")


def _assert_close(ours: Any, theirs: Any, rtol: float | None, atol: float | None,
                  what: str) -> None:
    a_leaves, a_tree = tree_flatten(ours)
    b_leaves, b_tree = tree_flatten(theirs)
    if a_tree != b_tree:
        raise AssertionError(f"{what}: structure {a_tree} != JAX's {b_tree}")
    for i, (a, b) in enumerate(zip(a_leaves, b_leaves)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"{what} leaf {i}: {a.shape} {a.dtype} != JAX's "
                                 f"{b.shape} {b.dtype}")
        if a.dtype == jax.dtypes.float0:
            continue
        tol = default_tolerance(a.dtype)
        r = tol if rtol is None else rtol
        t = tol if atol is None else atol
        a64, b64 = a.astype(np.complex128), b.astype(np.complex128)
        scale = np.maximum(np.abs(b64), 1.0)
        bad = ~((np.abs(a64 - b64) <= t + r * scale) | (np.isnan(a64) & np.isnan(b64))
                | (a64 == b64))
        if bad.any():
            err = np.max(np.abs(a64 - b64)[bad] / scale[bad])
            raise AssertionError(f"{what} leaf {i} ({a.dtype}{list(a.shape)}): "
                                 f"{bad.sum()} of {a.size} entries differ, max rel err {err:.3g}"
                                 f"\n jaxprop: {a.ravel()[:8]}\n jax:     {b.ravel()[:8]}")
