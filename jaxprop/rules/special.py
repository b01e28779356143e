"""Special functions: error functions, gamma family, Bessel, incomplete beta, zeta.

Each rule is ``ct`` times the closed-form derivative. Where no closed form exists JAX raises,
and so does jaxprop, with the same message: ∂polygamma/∂m, ∂betainc/∂a and ∂/∂b,
igamma_grad_a (no rule registered), and ∂zeta/∂x (jax.scipy.special.zeta is a custom_jvp
with a series for it: use that). ∂zeta/∂q = −x·ζ(x + 1, q) is closed-form, so jaxprop gives it where JAX raises.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop.registry import defvjp
from jaxprop.rules._util import unbroadcast as ub

_TWO_OVER_SQRT_PI = float(2 / np.sqrt(np.pi))


def unsupported(message: str):
    """A per-input rule for a derivative JAX does not define either: raise its message."""
    def rule(ct, out, *inputs):
        raise ValueError(message)
    rule.__doc__ = message
    return rule


# -- error functions ------------------------------------------------------------------------
defvjp("erf", lambda ct, out, x: ct * (_TWO_OVER_SQRT_PI * jnp.exp(-x * x)))    # 2/√π e^(−x²)
defvjp("erfc", lambda ct, out, x: ct * (-_TWO_OVER_SQRT_PI * jnp.exp(-x * x)))  # −2/√π e^(−x²)
defvjp("erf_inv", lambda ct, out, x: ct * (1 / _TWO_OVER_SQRT_PI * jnp.exp(out * out)))

# -- gamma family -----------------------------------------------------------------------------
defvjp("lgamma", lambda ct, out, x: ct * lax.digamma(x))                      # ψ(x)
defvjp("digamma", lambda ct, out, x: ct * lax.polygamma(jnp.ones_like(x), x))  # ψ⁽¹⁾(x)
defvjp("polygamma",                                                           # ψ⁽ᵐ⁺¹⁾(x)
       unsupported("polygamma gradient with respect to m is not supported"),
       lambda ct, out, m, x: ub(ct * lax.polygamma(m + 1, x), x))


def _igamma_dx(a, x):
    """∂P(a, x)/∂x = xᵃ⁻¹ e⁻ˣ / Γ(a)."""
    return jnp.exp(-x + (a - 1) * jnp.log(x) - lax.lgamma(a))


defvjp("igamma",                                                              # P(a, x)
       lambda ct, out, a, x: ub(ct * lax.igamma_grad_a(a, x), a),
       lambda ct, out, a, x: ub(ct * _igamma_dx(a, x), x))
defvjp("igammac",                                                             # Q = 1 − P
       lambda ct, out, a, x: ub(-(ct * lax.igamma_grad_a(a, x)), a),
       lambda ct, out, a, x: ub(-(ct * _igamma_dx(a, x)), x))
# igamma_grad_a (∂P/∂a, a series) has no rule in JAX or here: differentiating it raises
# jaxprop's missing-rule error (a NotImplementedError, like JAX's).


def _random_gamma(ct, out, key, a, log_space):
    """sample ~ Gamma(a): ∂sample/∂a by implicit differentiation of the CDF
    (``lax.random_gamma_grad``); in log space divide by the sample (never 0)."""
    if not log_space:
        return ct * lax.random_gamma_grad(a, out)
    sample = jnp.exp(out)
    sample = jnp.where(sample == 0, jnp.finfo(sample.dtype).tiny, sample)
    return ct * (lax.random_gamma_grad(a, sample) / sample)


defvjp("random_gamma", None, _random_gamma)

# -- Bessel, beta, zeta -------------------------------------------------------------------------
defvjp("bessel_i0e", lambda ct, out, x: ct * (lax.bessel_i1e(x) - jnp.sign(x) * out))


def _bessel_i1e(ct, out, x):
    """i1e' = i0e(x) − y (sign x + 1/x), → ½ at x = 0 (|x| ≤ eps)."""
    eps = float(jnp.finfo(x.dtype).eps)
    big = jnp.abs(x) > eps
    safe = jnp.where(big, x, jnp.full_like(x, eps))
    d = lax.bessel_i0e(safe) - out * (jnp.sign(safe) + 1 / safe)
    return ct * jnp.where(big, d, jnp.full_like(x, 0.5))


defvjp("bessel_i1e", _bessel_i1e)


def _betainc_dx(ct, out, a, b, x):
    """∂I_x(a, b)/∂x = x^(a−1) (1 − x)^(b−1) / B(a, b)."""
    log_beta = lax.lgamma(a) + lax.lgamma(b) - lax.lgamma(a + b)
    return ub(ct * jnp.exp((b - 1) * jnp.log1p(-x) + (a - 1) * jnp.log(x) - log_beta), x)


_NO_BETAINC = "Betainc gradient with respect to a and b not supported."
defvjp("regularized_incomplete_beta", unsupported(_NO_BETAINC), unsupported(_NO_BETAINC),
       _betainc_dx)
defvjp("zeta",                                                                # ζ(x, q)
       unsupported("zeta gradient with respect to x has no closed form; use "
                   "jax.scipy.special.zeta, whose custom JVP jaxprop follows"),
       lambda ct, out, x, q: ub(ct * (-x * lax.zeta(x + 1, q)), q))           # −x ζ(x + 1, q)
