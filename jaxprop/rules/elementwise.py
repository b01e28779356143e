"""Elementwise gates. Each line: the primitive, then ∂out/∂input times the upstream ``ct``.

Arguments of every per-input rule: ``(ct, out, *inputs, **params)``. Binary ops broadcast
rank-0 operands, so their cotangents pass through :func:`unbroadcast`.

Complex inputs follow JAX's convention: a VJP is the plain transpose of the JVP, with no
conjugation, so for a holomorphic f the rule ``ct · f'(x)`` serves real and complex alike.
The formulas mirror the forms JAX's JVPs use, so edge values (0, ±inf, nan) agree too.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop.registry import defvjp, defzero, noderule
from jaxprop.rules._util import convert_like, unbroadcast as ub


def _highest(accuracy) -> bool:
    """True when a transcendental op asked for its most accurate evaluation."""
    return accuracy is not None and getattr(accuracy, "name", "") == "HIGHEST"


# -- the seeds' gates -----------------------------------------------------------------------
defvjp("add", lambda ct, out, x, y: ub(ct, x),          # add gate: pass ct through
              lambda ct, out, x, y: ub(ct, y))
defvjp("add_any", lambda ct, out, x, y: ub(ct, x),
                  lambda ct, out, x, y: ub(ct, y))
defvjp("sub", lambda ct, out, x, y: ub(ct, x),          # x - y: (ct, -ct)
              lambda ct, out, x, y: -ub(ct, y))       # negate after reducing: less memory
defvjp("mul", lambda ct, out, x, y: ub(ct * y, x),      # mul gate: inputs swap
              lambda ct, out, x, y: ub(ct * x, y))
defvjp("div", lambda ct, out, x, y: ub(ct / y, x),      # x / y: (ct/y, -ct·x/y²)
              lambda ct, out, x, y: -ub(ct * x * lax.integer_pow(y, -2), y))
defvjp("neg", lambda ct, out, x: -ct)                   # -x: -1
defvjp("rem",                                           # x - y·trunc(x/y): (ct, -ct·trunc(x/y))
       lambda ct, out, x, y: ub(ct, x),
       lambda ct, out, x, y: ub(-ct * jnp.sign(x / y) * jnp.floor(jnp.abs(x / y)), y))


def _max_share(x, y):
    """1 where x wins, ½ on ties (JAX's choice), 0 where y wins or either is nan."""
    return jnp.where(x > y, 1.0, jnp.where(x == y, 0.5, 0.0)).astype(jnp.result_type(x, y))


defvjp("max", lambda ct, out, x, y: ub(ct * _max_share(x, y), x),   # max gate: route to winner
              lambda ct, out, x, y: ub(ct * _max_share(y, x), y))
defvjp("min", lambda ct, out, x, y: ub(ct * _max_share(y, x), x),
              lambda ct, out, x, y: ub(ct * _max_share(x, y), y))

# -- exponentials, logs, powers ------------------------------------------------------------
defvjp("exp", lambda ct, out, x: ct * out)                          # eˣ
defvjp("exp2", lambda ct, out, x: ct * out * float(np.log(2.0)))    # 2ˣ log 2
defvjp("log", lambda ct, out, x: ct / x)                            # 1/x
defvjp("log1p", lambda ct, out, x: ct / (x + 1))                    # 1/(1 + x)
defvjp("expm1",                                                     # eˣ = y + 1
       lambda ct, out, x, accuracy=None:
       ct * (lax.exp(x, accuracy=accuracy) if _highest(accuracy) else out + 1))
defvjp("logistic",                                                  # sigmoid: y(1 − y)
       lambda ct, out, x, accuracy=None:
       ct * (out * lax.logistic(-x, accuracy=accuracy) if _highest(accuracy)
             else out * (1 - out)))
defvjp("tanh",                                                      # 1 − y²
       lambda ct, out, x, accuracy=None:
       ct * (4 * lax.logistic(2 * x, accuracy=accuracy) * lax.logistic(-2 * x, accuracy=accuracy)
             if _highest(accuracy) else (1 + out) * (1 - out)))
defvjp("sqrt", lambda ct, out, x: ct * (0.5 / out))                 # 1 / (2√x)
defvjp("rsqrt", lambda ct, out, x: ct * (-0.5 * (out / x)))         # −½ x^(−3/2) = −½ y/x
defvjp("cbrt", lambda ct, out, x: ct * ((1 / 3) * lax.integer_pow(out, -2)))  # ⅓ y⁻²
defvjp("square", lambda ct, out, x: ct * (2 * x))                   # 2x


def _integer_pow(ct, out, x, y):
    """xⁿ (n a static int, negative too): n xⁿ⁻¹."""
    if y == 0:
        return None
    if y == 1:
        return ct
    return ct * (y * (x if y == 2 else lax.integer_pow(x, y - 1)))


defvjp("integer_pow", _integer_pow)


def _pow_dx(ct, out, x, y):
    """∂xʸ/∂x = y xʸ⁻¹; for an integer y, exactly 0 where y = 0 (as JAX: 0⁰ is flat)."""
    yx = lax.convert_element_type(y, x.dtype)
    if jnp.issubdtype(y.dtype, jnp.integer):
        shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y))
        xb, yb = jnp.broadcast_to(x, shape), jnp.broadcast_to(yx, shape)
        one = jnp.ones_like(yb)
        safe_y = jnp.where(yb == 0, one, yb)
        dx = jnp.where(yb == 0, jnp.zeros_like(xb), safe_y * lax.pow(xb, yb - one))
    else:
        dx = yx * lax.pow(x, yx - jnp.ones_like(yx))
    return ub(ct * dx, x)


def _pow_dy(ct, out, x, y):
    """∂xʸ/∂y = log(x) xʸ, with log(0) read as log(1) = 0 (so 0ʸ is flat in y)."""
    safe_x = jnp.where(x == 0, jnp.ones_like(x), x)
    return ub(ct * (jnp.log(safe_x) * out), y)


defvjp("pow", _pow_dx, _pow_dy)

# -- trigonometric and hyperbolic --------------------------------------------------------------
defvjp("sin", lambda ct, out, x, accuracy=None: ct * lax.cos(x, accuracy=accuracy))   # cos x
defvjp("cos", lambda ct, out, x, accuracy=None: -(ct * lax.sin(x, accuracy=accuracy)))  # −sin
defvjp("tan", lambda ct, out, x: ct * (1 + out * out))              # 1 + tan²
defvjp("asin", lambda ct, out, x: ct * lax.rsqrt(1 - x * x))        # 1/√(1 − x²)
defvjp("acos", lambda ct, out, x: ct * -lax.rsqrt(1 - x * x))       # −1/√(1 − x²)
defvjp("atan", lambda ct, out, x: ct / (1 + x * x))                 # 1/(1 + x²)
defvjp("atan2",                                                     # atan(x/y): (y, −x)/(x² + y²)
       lambda ct, out, x, y: ub(ct * (y / (x * x + y * y)), x),
       lambda ct, out, x, y: ub(ct * (-x / (x * x + y * y)), y))
defvjp("sinh", lambda ct, out, x: ct * lax.cosh(x))                 # cosh
defvjp("cosh", lambda ct, out, x: ct * lax.sinh(x))                 # sinh
defvjp("asinh", lambda ct, out, x: ct * lax.rsqrt(x * x + 1))       # 1/√(x² + 1)
defvjp("acosh", lambda ct, out, x: ct * lax.rsqrt(x * x - 1))       # 1/√(x² − 1)
defvjp("atanh", lambda ct, out, x: (1 / (1 + x)) * (ct / (1 - x)))  # 1/(1 − x²)

# -- piecewise ------------------------------------------------------------------------------


def _abs(ct, out, x):
    """|x|: sign(x), with +1 at 0 (JAX's choice); complex x: conj(x)/|x| (0 at 0)."""
    if jnp.iscomplexobj(x):
        r = convert_like(out, x.dtype)
        return convert_like(ct, x.dtype) * (jnp.conj(x) / jnp.where(r == 0, jnp.ones_like(r), r))
    return jnp.where(x >= 0, ct, -ct)


defvjp("abs", _abs)
defzero("sign", "floor", "ceil", "round", "stop_gradient", "is_finite")
# nextafter(x, y) is x moved by one ulp towards y: on the reals it is x itself, so jaxprop
# gives (ct, 0), what finite differences give. JAX has no rule for it (it raises).
defvjp("nextafter", lambda ct, out, x, y: ub(ct, x), None)


def _select_case(i):
    """select_n(p, c0, c1, …) routes ct to case p: ct where p == i, else 0 — the same
    selector applied to (0, …, ct, …, 0)."""
    def rule(ct, out, pred, *cases):
        k = i - 1
        zeros = lax.full_like(ct, 0)
        return ub(lax.select_n(pred, *(ct if j == k else zeros for j in range(len(cases)))),
                  cases[k])
    return rule


@noderule("select_n")
def _select_n(node, cts):
    """select_n(p, c0, c1, …): case i gets ct where p == i, else 0."""
    ct, pred, cases = cts[0], node.inputs[0], node.inputs[1:]
    return [None] + [_select_case(i + 1)(ct, None, pred, *cases) if s is not None else None
                     for i, s in enumerate(node.in_slots[1:])]


# clamp(lo, x, hi), JAX's convention: at x == lo or x == hi nobody gets the gradient.
def _clamp_lo(ct, out, lo, x, hi):
    """lo gets ct where lo > x (and lo < hi)."""
    return ub(jnp.where((lo > x) & (lo < hi), ct, jnp.zeros_like(ct)), lo)


def _clamp_x(ct, out, lo, x, hi):
    """x gets ct where lo < x < hi."""
    return ub(jnp.where((x > lo) & (x < hi), ct, jnp.zeros_like(ct)), x)


def _clamp_hi(ct, out, lo, x, hi):
    """hi gets ct where hi < x."""
    return ub(jnp.where(hi < x, ct, jnp.zeros_like(ct)), hi)


defvjp("clamp", _clamp_lo, _clamp_x, _clamp_hi)

# -- dtype ----------------------------------------------------------------------------------
defvjp("convert_element_type",                                      # cast back
       lambda ct, out, x, **_: convert_like(ct, x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact)
       else None)
defvjp("reduce_precision", lambda ct, out, x, **params: lax.reduce_precision(ct, **params))
defvjp("copy", lambda ct, out, x: ct)
defvjp("copy_p", lambda ct, out, x: ct)
