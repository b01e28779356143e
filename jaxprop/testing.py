"""Property-test VJPs: ``check_vjp(f, *args)`` against JAX and finite differences.

Used by jaxprop's own rule tests and meant for users who write their own rules
(``jaxprop.defvjp``) or ``jax.custom_vjp`` / ``jax.custom_jvp`` functions:

- :func:`check_vjp` — jaxprop's VJPs to any order versus ``jax.vjp``'s, plus central finite
  differences (orders 1 and 2) wherever JAX is no independent judge (a rule written outside
  JAX: both sides call it; a primitive JAX cannot differentiate);
- :func:`gradcheck`, :func:`gradgradcheck` — the finite-difference checks alone;
- :func:`property_settings` — Hypothesis settings without the per-example deadline that JAX's
  first compilation exceeds; :func:`arrays`, :func:`shapes`, :func:`pytrees` — strategies
  (``arrays(jnp.float64)`` raises without x64 instead of drawing float32).

Example::

    from jaxprop.testing import check_vjp
    check_vjp(jnp.tanh, jnp.linspace(-2.0, 2.0, 7), order=2)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten, tree_map, tree_unflatten

from jaxprop import _jax, api

__all__ = ["arrays", "check_vjp", "default_tolerance", "gradcheck", "gradgradcheck",
           "property_settings", "pytrees", "random_like", "shapes", "user_rules"]


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
              finite_differences: bool | None = None, eps: float | None = None) -> None:
    """Assert that jaxprop's VJP of ``f`` at ``args`` is right, to ``order``.

    For each order k = 1..order, the k-th derivative is contracted with random cotangents and
    compared leaf by leaf with JAX's: jaxprop's ``vjp`` applied k times versus ``jax.vjp``.

    JAX is no independent judge where ``f`` contains a rule someone wrote — a
    ``jax.custom_vjp`` or ``jax.custom_jvp`` defined outside JAX: both sides call that rule.
    There, and where JAX has no rule at all, the VJPs are also checked against central finite
    differences along a random direction v, at orders 1 and 2 (see :func:`gradcheck`,
    :func:`gradgradcheck`): ⟨ct, (f(x + εv) − f(x − εv)) / 2ε⟩ ≈ ⟨vjp(ct), v⟩.
    ``finite_differences=None`` (default) decides so; True always checks them (raising
    ``ValueError`` where they cannot judge: no floating input); False never does (for rules
    that are deliberately not the derivative: clipping, straight-through estimators).

    >>> check_vjp(jnp.tanh, jnp.linspace(-2.0, 2.0, 7), order=2)
    """
    jax_judges = True
    fd = finite_differences
    if fd is None:
        rules = user_rules(f, *args)
        obstacle = _fd_obstacle(args) if rules else None
        fd = bool(rules) and obstacle is None
        if obstacle:
            warnings.warn(f"check_vjp: {', '.join(rules)} is a rule written outside JAX, so "
                          "jax.vjp calls it too and cannot judge it; finite differences cannot "
                          f"either ({obstacle}). Only jaxprop-versus-JAX agreement is checked.",
                          stacklevel=2)
    g_jax, g_ours = f, f
    for k in range(1, order + 1):
        out_ours, pull_ours = api.vjp(g_ours, *args)
        ct = random_like(out_ours, seed + k)
        ours = pull_ours(ct)
        if jax_judges:
            try:
                out_jax, pull_jax = jax.vjp(g_jax, *args)
                theirs = pull_jax(ct)
            except NotImplementedError as err:  # JAX has no rule: only differences can judge
                if finite_differences is False or _fd_obstacle(args):
                    raise AssertionError(f"JAX cannot differentiate f ({err}), and "
                                         f"{_fd_obstacle(args) or 'finite_differences=False'}"
                                         ": nothing can judge this VJP.") from err
                jax_judges, fd = False, True
            else:
                _assert_close(out_ours, out_jax, rtol, atol, f"order {k} primal output")
                _assert_close(ours, theirs, rtol, atol, f"order {k} VJP")
        if fd and k <= 2:
            _check_finite_differences(g_ours, args, ct, ours, k, eps, rtol, atol)
        if k < order:
            g_jax = _sum_pulled_back(jax.vjp, g_jax, ct, seed + 100 * k)
            g_ours = _sum_pulled_back(api.vjp, g_ours, ct, seed + 100 * k)


def gradcheck(f: Callable, *args: Any, seed: int = 0, eps: float | None = None,
              rtol: float | None = None, atol: float | None = None) -> None:
    """Assert that jaxprop's first-order VJP of ``f`` agrees with central finite differences.

    ⟨ct, (f(x + εv) − f(x − εv)) / 2ε⟩ ≈ ⟨vjp(ct), v⟩ for random ct and direction v; ε, the
    evaluation precision and the tolerance follow the inputs' dtype (float32 inputs are
    evaluated in float64 when x64 is on; without it the check is coarse, to ~1e-2).
    """
    ct = random_like(api.vjp(f, *args)[0], seed + 1)
    _check_finite_differences(f, args, ct, api.vjp(f, *args)[1](ct), 1, eps, rtol, atol)


def gradgradcheck(f: Callable, *args: Any, seed: int = 0, eps: float | None = None,
                  rtol: float | None = None, atol: float | None = None) -> None:
    """Assert that jaxprop's second-order VJP of ``f`` agrees with finite differences of its
    first-order VJP: with h(x) = ⟨w, vjp(f)(x)(ct)⟩ for fixed random w and ct,
    (h(x + εv) − h(x − εv)) / 2ε ≈ ⟨∇h(x), v⟩ — which differentiates ``f``'s backward pass
    (a ``custom_vjp``'s bwd function included)."""
    ct = random_like(api.vjp(f, *args)[0], seed + 1)
    h = _sum_pulled_back(api.vjp, f, ct, seed + 100)
    _check_finite_differences(h, args, jnp.ones(()), api.vjp(h, *args)[1](jnp.ones(())), 2,
                              eps, rtol, atol)


def user_rules(f: Callable, *args: Any) -> list[str]:
    """``'fn at file:line'`` of each ``custom_jvp`` / ``custom_vjp`` function in ``f`` at
    ``args`` that was written outside JAX (where ``jax.vjp`` calls the same rule as jaxprop).
    If ``f`` cannot be traced abstractly (Python branches on values), ``['f (not traceable)']``.
    """
    try:
        closed = jax.make_jaxpr(f)(*args)
    except Exception:  # noqa: BLE001 - any tracing failure: assume the worst, check by FD
        return [f"{getattr(f, '__name__', 'f')} (not traceable)"]
    return _jax.custom_rules_outside_jax(closed)


def _sum_pulled_back(vjp: Callable, g: Callable, ct: Any, seed: int) -> Callable:
    """x ↦ ⟨w, vjp(g)(x)(ct)⟩ with fixed random w: a scalar whose gradient is the next order."""

    def h(*xs: Any) -> Any:
        out, pull = vjp(g, *xs)
        cts_in = pull(tree_map(_cast_like, ct, out))  # xs may be widened (finite differences)
        w = random_like(cts_in, seed)
        terms = [jnp.sum(jnp.real(a * b)) for a, b in zip(tree_flatten(cts_in)[0],
                                                            tree_flatten(w)[0])
                 if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
        return sum(terms) if terms else jnp.zeros(())

    return h


def _cast_like(c: Any, like: Any) -> Any:
    return c if c.dtype == jax.dtypes.float0 else c.astype(jnp.result_type(like))


# -- finite differences --------------------------------------------------------------------
def _floating(x: Any) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))
    except TypeError:  # not an array (a function in an Equinox module, a string…)
        return False


def _fd_obstacle(args: tuple) -> str | None:
    """Why finite differences cannot judge at ``args`` (None if they can)."""
    leaves = tree_flatten(args)[0]
    strange = [type(x).__name__ for x in leaves if not (_floating(x) or hasattr(x, "dtype")
                                                       or isinstance(x, (int, bool)))]
    if strange:
        return f"inputs of type {', '.join(sorted(set(strange)))} cannot be perturbed"
    if not any(map(_floating, leaves)):
        return "no floating-point input: integer inputs have no derivative"
    return None


def _fd_precision(args: tuple) -> tuple[Any, float]:
    """(dtype to evaluate in, tolerance) for finite differences at ``args``' floating leaves.

    float64 is exact enough to judge to 1e-6; float32 (and half) inputs are evaluated in
    float64 when x64 is on, else in float32, which only judges to ~1e-2."""
    obstacle = _fd_obstacle(args)
    if obstacle:
        raise ValueError(f"finite differences cannot judge this function: {obstacle}. "
                         "Use finite_differences=False.")
    dtypes = [jnp.result_type(x) for x in tree_flatten(args)[0] if _floating(x)]
    x64 = jax.config.jax_enable_x64
    lowest = min(jnp.finfo(d).bits for d in dtypes)
    if lowest >= 64 or x64:
        return jnp.float64, (1e-6 if lowest >= 64 else 10 * default_tolerance(
            jnp.float16 if lowest == 16 else jnp.float32))
    return jnp.float32, 1e-2 if lowest >= 32 else 5e-2


def _check_finite_differences(f: Callable, args: tuple, ct: Any, vjp_ct: Any, order: int,
                              eps: float | None, rtol: float | None,
                              atol: float | None) -> None:
    dtype, tol = _fd_precision(args)
    tol = tol if rtol is None else rtol
    ulp = float(jnp.finfo(dtype).eps)
    floating = _floating
    size = max([float(jnp.max(jnp.abs(x))) for x in tree_flatten(args)[0]
                if floating(x) and jnp.size(x)] + [1.0])
    eps = eps if eps is not None else ulp ** (1 / 3) * size
    v = random_like(args, 12345 + order)
    widen = lambda x: x.astype(jnp.result_type(dtype, x)) if floating(x) else x  # noqa: E731

    def shifted(s: float) -> Any:
        return tree_map(lambda x, d: widen(x) + s * eps * d.astype(jnp.result_type(
            dtype, x)) if floating(x) else x, args, v)

    fp, fm = f(*shifted(1.0)), f(*shifted(-1.0))
    lhs = rhs = scale = noise = 0.0
    for c, a, b in zip(tree_flatten(ct)[0], tree_flatten(fp)[0], tree_flatten(fm)[0]):
        if c.dtype == jax.dtypes.float0 or not floating(a):
            continue  # integer outputs carry no derivative
        c, a, b = (np.asarray(z, np.complex128) for z in (c, a, b))
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AssertionError(f"finite differences cannot judge at order {order}: f is "
                                 "not finite within ε of these inputs.")
        lhs += float(np.sum(c * (a - b)).real) / (2 * eps)
        noise += float(np.sum(np.abs(c) * (np.abs(a) + np.abs(b)))) * ulp / eps
    for g, d in zip(tree_flatten(vjp_ct)[0], tree_flatten(v)[0]):
        if d.dtype != jax.dtypes.float0 and g is not None:
            term = np.asarray(g, np.complex128) * np.asarray(d, np.complex128)
            rhs += float(np.sum(term).real)
            scale += float(np.sum(np.abs(term)))
    scale = max(scale, abs(lhs), abs(rhs))
    if not abs(lhs - rhs) <= (atol or 0.0) + tol * scale + 10 * noise:
        which = "VJP" if order == 1 else "second-order VJP (gradgradcheck)"
        raise AssertionError(
            f"finite differences disagree with the {which}: ⟨ct, (f(x+εv) − f(x−εv))/2ε⟩ = "
            f"{lhs:.6g} but ⟨vjp(ct), v⟩ = {rhs:.6g} (ε = {eps:.2g}, evaluated in "
            f"{jnp.dtype(dtype).name}, tolerance {tol:.1g}). Either the rule is wrong, or f "
            "is not differentiable here (a kink, a tie, a discontinuity), or the rule is "
            "deliberately not the derivative (then pass finite_differences=False).")


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


def property_settings(max_examples: int = 20, **overrides: Any) -> Any:
    """Hypothesis settings for tests that run JAX: no per-example deadline (the first example
    compiles, which takes longer than Hypothesis' 200 ms default) and no "too slow" health
    check. Use as a decorator above ``@given`` or as a profile::

        @jaxprop.testing.property_settings()
        @hypothesis.given(jaxprop.testing.arrays(shape=(3,)))
        def test_rule(x): ...

        hypothesis.settings.register_profile("jax", jaxprop.testing.property_settings())
    """
    _hypothesis()  # a clear ImportError without hypothesis
    from hypothesis import HealthCheck, settings

    kwargs = dict(max_examples=max_examples, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
    return settings(**{**kwargs, **overrides})


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
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise ValueError(
                f"arrays({dtype.name}) would draw {jax.dtypes.canonicalize_dtype(dtype)} "
                "arrays: JAX's 64-bit types need x64. "
                "Enable it before the test runs (jax.config.update('jax_enable_x64', True), "
                "JAX_ENABLE_X64=1, or `with jax.enable_x64(True):` around the test body), or "
                "ask for float32.")
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
