"""Property-test VJPs against JAX: ``check_vjp(f, *args)``.

Used by jaxprop's own rule tests and meant for users who write their own rules
(``jaxprop.defvjp``) or ``jax.custom_vjp`` functions.

Example::

    from jaxprop.testing import check_vjp
    check_vjp(jnp.tanh, jnp.linspace(-2.0, 2.0, 7), order=2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten, tree_map, tree_unflatten

from jaxprop import api

__all__ = ["arrays", "check_vjp", "default_tolerance", "pytrees", "random_like", "shapes"]


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
              zip(tree_flatten(ct)[0], tree_flatten(fp)[0], tree_flatten(fm)[0])
              if c.dtype != jax.dtypes.float0)  # integer outputs carry no derivative
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


# -- hypothesis strategies: arrays, shapes and pytrees for property tests -----------------
def _hypothesis() -> tuple[Any, Any]:
    try:
        from hypothesis import strategies as st
        from hypothesis.extra import numpy as hnp
    except ImportError as err:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError("jaxprop.testing's strategies need hypothesis: "
                          "pip install hypothesis") from err
    return st, hnp


def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1,
           max_side: int = 4) -> Any:
    """Hypothesis strategy for array shapes: tuples of ``min_dims..max_dims`` sides in
    ``min_side..max_side`` (``min_side=0`` includes empty arrays).

    >>> @hypothesis.given(jaxprop.testing.shapes(max_dims=2))
    ... def test_shape(shape): ...
    """
    st, hnp = _hypothesis()
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def arrays(dtype: Any = jnp.float32, shape: Any = None, *, min_value: float = -3.0,
           max_value: float = 3.0, exclude: Sequence[float] = ()) -> Any:
    """Hypothesis strategy for finite ``jnp`` arrays of ``dtype`` in [min_value, max_value].

    ``shape`` is a tuple or a strategy (default :func:`shapes`); ``exclude`` lists values to
    keep away from (e.g. ``(0.0,)`` for log or 1/x: elements within 1e-2 of them are moved).
    Complex dtypes draw real and imaginary parts independently.

    >>> @hypothesis.given(jaxprop.testing.arrays(shape=(3,), min_value=0.1))
    ... def test_log(x):
    ...     jaxprop.testing.check_vjp(jnp.log, x, order=2)
    """
    st, hnp = _hypothesis()
    dtype = jnp.dtype(dtype)
    shape = shapes() if shape is None else shape
    shape = shape if hasattr(shape, "example") else st.just(tuple(shape))
    if jnp.issubdtype(dtype, jnp.integer):
        elements = st.integers(int(min_value), int(max_value))
    else:
        elements = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False,
                             width=64)
    draw_dtype = np.float64 if not jnp.issubdtype(dtype, jnp.integer) else np.int64

    def build(parts: Any) -> Any:
        x = np.asarray(parts[0], draw_dtype)
        for v in exclude:
            x = np.where(np.abs(x - v) < 1e-2, v + 1e-2, x)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = x + 1j * np.asarray(parts[1], draw_dtype)
        return jnp.asarray(x, dtype)

    def for_shape(s: tuple) -> Any:
        part = hnp.arrays(draw_dtype, s, elements=elements)
        n = 2 if jnp.issubdtype(dtype, jnp.complexfloating) else 1
        return st.tuples(*[part] * n).map(build)

    return shape.flatmap(for_shape)


def pytrees(leaves: Any = None, max_leaves: int = 4) -> Any:
    """Hypothesis strategy for pytrees (nested dicts, lists and tuples) of ``leaves``
    (default: float32 :func:`arrays`) with at most ``max_leaves`` leaves.

    >>> @hypothesis.given(jaxprop.testing.pytrees())
    ... def test_tree(params):
    ...     jaxprop.testing.check_vjp(lambda p: jax.tree.map(jnp.tanh, p), params)
    """
    st, _ = _hypothesis()
    leaves = arrays() if leaves is None else leaves
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from("abcdefgh"), children, min_size=1, max_size=3)),
        max_leaves=max_leaves)
