"""Helpers every rule family shares: unbroadcasting, dtype matching, zero filling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop import _jax
from jaxprop.tracer import sharding_of  # noqa: F401 - rules import it from here


def unbroadcast(ct: Any, x: Any) -> Any:
    """Sum ``ct`` down to ``x``'s shape and cast it to ``x``'s dtype.

    lax's n-ary ops broadcast rank-0 operands (``add x 1.0``); the cotangent of a broadcast
    value is the sum of the cotangents of its copies (the copy gate).
    """
    aval = _jax.aval_of(x)
    shape = aval.shape
    if ct.shape != shape:
        lead = ct.ndim - len(shape)
        axes = tuple(range(lead)) + tuple(
            lead + i for i, d in enumerate(shape) if d == 1 and ct.shape[lead + i] != 1)
        ct = lax.reduce_sum(ct, axes) if axes else ct
        ct = lax.reshape(ct, shape) if ct.shape != shape else ct
    return convert_like(ct, aval.dtype)


def convert_like(ct: Any, dtype: Any) -> Any:
    """Cast a cotangent to ``dtype`` (complex cotangents of real values keep the real part)."""
    if ct.dtype == dtype:
        return ct
    if jnp.iscomplexobj(ct) and not jnp.issubdtype(dtype, jnp.complexfloating):
        ct = jnp.real(ct)
    return lax.convert_element_type(ct, dtype)


def instantiate(ct: Any, like: Any) -> Any:
    """A cotangent that may be None (symbolic zero) as an array shaped like ``like``."""
    if ct is not None:
        return ct
    aval = _jax.aval_of(like)
    return jnp.zeros(aval.shape, aval.dtype)


def inputs_reaching(jaxpr: Any, wanted: Any, effects: bool = False) -> list[bool]:
    """Which inputs of ``jaxpr`` may reach an output flagged in ``wanted`` (reverse liveness;
    ``effects``: also inputs of effectful equations). An input reaching none of the outputs
    whose cotangent is nonzero gets a symbolic-zero cotangent."""
    from jax.extend.core import Literal
    live = {v for v, w in zip(jaxpr.outvars, wanted) if w and not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if (effects and eqn.effects) or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, Literal))
    return [v in live for v in jaxpr.invars]


def shape_of(x: Any) -> tuple[int, ...]:
    """Static shape of an array, tracer or Python scalar."""
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def respec(sharding: Any, spec: Sequence[Any]) -> Any:
    """``sharding`` with its partition spec replaced by ``spec`` (None stays None)."""
    return None if sharding is None else sharding.update(spec=jax.P(*spec))
