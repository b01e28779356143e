"""Complex gates. JAX's convention: a VJP is the plain transpose of the (ℝ-linear) JVP with no
conjugation, so ``real`` transposes to embedding ct as ``ct + 0i`` and ``imag`` to ``−i·ct``.

The holomorphic elementwise ops (exp, log, mul, div, sqrt, sin, …) need no rules of their own:
their rules in :mod:`elementwise` are ``ct · f'(x)``, right for complex values as they are;
``abs`` of a complex value and ``convert_element_type`` real ↔ complex live there too.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxprop.registry import defvjp
from jaxprop.rules._util import unbroadcast as ub


defvjp("real", lambda ct, out, x: lax.complex(ct, jnp.zeros_like(ct)))     # re z: ct + 0i
defvjp("imag", lambda ct, out, x: lax.complex(jnp.zeros_like(ct), -ct))    # im z: −i·ct
defvjp("complex", lambda ct, out, x, y: ub(jnp.real(ct), x),               # x + iy:
                  lambda ct, out, x, y: ub(-jnp.imag(ct), y))              # (re ct, −im ct)


def _conj(ct, out, x, input_dtype=None):
    """conj z: conj(ct); a real input (conj makes it complex) gets re ct."""
    if jnp.iscomplexobj(x):
        return jnp.conj(ct)
    return ub(jnp.real(ct), x)


defvjp("conj", _conj)
