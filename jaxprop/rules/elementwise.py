"""Elementwise gates. Each line: the primitive, then ∂out/∂input times the upstream ``ct``.

Arguments of every per-input rule: ``(ct, out, *inputs, **params)``. Binary ops broadcast
rank-0 operands, so their cotangents pass through :func:`unbroadcast`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxprop.registry import defvjp, defzero, noderule
from jaxprop.rules._util import convert_like, unbroadcast as ub

# -- the seeds' gates -----------------------------------------------------------------------
defvjp("add", lambda ct, out, x, y: ub(ct, x),          # add gate: pass ct through
              lambda ct, out, x, y: ub(ct, y))
defvjp("add_any", lambda ct, out, x, y: ub(ct, x),
                  lambda ct, out, x, y: ub(ct, y))
defvjp("sub", lambda ct, out, x, y: ub(ct, x),          # x - y: (ct, -ct)
              lambda ct, out, x, y: ub(-ct, y))
defvjp("mul", lambda ct, out, x, y: ub(ct * y, x),      # mul gate: inputs swap
              lambda ct, out, x, y: ub(ct * x, y))
defvjp("div", lambda ct, out, x, y: ub(ct / y, x),      # x / y: (ct/y, -ct·x/y²)
              lambda ct, out, x, y: ub(-ct * out / y, y))
defvjp("neg", lambda ct, out, x: -ct)                   # -x: -1


def _max_share(x, y):
    """1 where x wins, ½ on ties (JAX's choice), 0 where y wins."""
    return jnp.where(x > y, 1.0, jnp.where(x == y, 0.5, 0.0)).astype(jnp.result_type(x, y))


defvjp("max", lambda ct, out, x, y: ub(ct * _max_share(x, y), x),   # max gate: route to winner
              lambda ct, out, x, y: ub(ct * _max_share(y, x), y))
defvjp("min", lambda ct, out, x, y: ub(ct * _max_share(y, x), x),
              lambda ct, out, x, y: ub(ct * _max_share(x, y), y))

# -- exponentials, logs, powers ------------------------------------------------------------
defvjp("exp", lambda ct, out, x: ct * out)                          # eˣ
defvjp("exp2", lambda ct, out, x: ct * out * jnp.log(2.0).astype(out.dtype))
defvjp("log", lambda ct, out, x: ct / x)                            # 1/x
defvjp("log1p", lambda ct, out, x: ct / (1 + x))
defvjp("expm1", lambda ct, out, x: ct * (out + 1))
defvjp("logistic", lambda ct, out, x: ct * out * (1 - out))         # sigmoid: y(1 − y)
defvjp("tanh", lambda ct, out, x: ct * (1 - out * out))             # 1 − y²
defvjp("sqrt", lambda ct, out, x: ct / (2 * out))                   # 1 / (2√x)
defvjp("rsqrt", lambda ct, out, x: ct * (-0.5) * out / x)           # −½ x^(−3/2)
defvjp("cbrt", lambda ct, out, x: ct * out / (3 * x))               # ⅓ x^(−2/3)
defvjp("integer_pow",                                               # n xⁿ⁻¹
       lambda ct, out, x, y: ct * (0 if y == 0 else y * (x if y == 2 else lax.integer_pow(x, y - 1))))


def _pow_dx(ct, out, x, y):
    """∂xʸ/∂x = y xʸ⁻¹ (0 where y = 0)."""
    dx = jnp.where(y == 0, 0, y * lax.pow(x, y - jnp.ones_like(y)))
    return ub(ct * dx, x)


def _pow_dy(ct, out, x, y):
    """∂xʸ/∂y = log(x) xʸ (0 where x = 0)."""
    safe_log = jnp.log(jnp.where(x == 0, jnp.ones_like(x), x))
    return ub(ct * safe_log * out, y)


defvjp("pow", _pow_dx, _pow_dy)

# -- trigonometric ---------------------------------------------------------------------------
defvjp("sin", lambda ct, out, x: ct * jnp.cos(x))
defvjp("cos", lambda ct, out, x: -ct * jnp.sin(x))

# -- piecewise ------------------------------------------------------------------------------
defvjp("abs", lambda ct, out, x: ct * jnp.sign(x))                  # sign(x)
defzero("sign", "floor", "ceil", "round", "stop_gradient", "is_finite")


def _select_case(i):
    """select_n(p, c0, c1, …) routes ct to case p: ct where p == i, else 0."""
    def rule(ct, out, pred, *cases):
        k = i - 1
        hit = pred == k if pred.dtype != jnp.bool_ else (pred if k == 1 else ~pred)
        return ub(jnp.where(hit, ct, jnp.zeros_like(ct)), cases[k])
    return rule


@noderule("select_n")
def _select_n(node, cts):
    """select_n(p, c0, c1, …): case i gets ct where p == i, else 0."""
    ct, pred, cases = cts[0], node.inputs[0], node.inputs[1:]
    return [None] + [_select_case(i + 1)(ct, None, pred, *cases) if s is not None else None
                     for i, s in enumerate(node.in_slots[1:])]


def _clamp_lo(ct, out, lo, x, hi):
    return ub(jnp.where((lo > x) & (lo < hi), ct, jnp.zeros_like(ct)), lo)


def _clamp_x(ct, out, lo, x, hi):
    return ub(jnp.where((x > lo) & (x < hi), ct, jnp.zeros_like(ct)), x)


def _clamp_hi(ct, out, lo, x, hi):
    return ub(jnp.where(hi < x, ct, jnp.zeros_like(ct)), hi)


defvjp("clamp", _clamp_lo, _clamp_x, _clamp_hi)

# -- dtype ----------------------------------------------------------------------------------
defvjp("convert_element_type",                                      # cast back
       lambda ct, out, x, **_: convert_like(ct, x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact)
       else None)
defvjp("reduce_precision", lambda ct, out, x, **_: ct)
defvjp("copy", lambda ct, out, x: ct)
defvjp("copy_p", lambda ct, out, x: ct)
