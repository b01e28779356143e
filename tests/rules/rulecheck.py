"""Helpers shared by the rule-family tests: random inputs and check_vjp of sin∘f."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.testing import check_vjp


def rand(shape, dtype=jnp.float32, seed=0):
    """Standard-normal array of ``shape`` and ``dtype`` (fixed seed)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def check(f, *args, order=2, **kw):
    """check_vjp of sin∘f: the sin makes the cotangent that reaches f's rule depend on the
    inputs, so order 2 also differentiates the rule's own output (for a linear f it would
    otherwise be a constant)."""
    check_vjp(lambda *a: jax.tree.map(jnp.sin, f(*a)), *args, order=order, **kw)
