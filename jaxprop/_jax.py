"""Every touch of JAX internals lives here, so a JAX upgrade is one file.

The rest of jaxprop imports JAX's public API (``jax``, ``jax.numpy``, ``lax``) plus the few
names re-exported below: the trace machinery (``Trace``, ``Tracer``, current-trace context
managers), the evaluator for jaxprs, symbolic-zero classes used by custom derivative rules,
and source-location helpers.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.core as _jcore
import jax.extend.core as _xcore
from jax._src import core as _core
from jax._src import source_info_util as _source_info
from jax._src.ad_util import SymbolicZero, Zero
from jax.dtypes import float0

Trace = _jcore.Trace
Tracer = _jcore.Tracer
ClosedJaxpr = _xcore.ClosedJaxpr
Jaxpr = _xcore.Jaxpr
Primitive = _xcore.Primitive
TraceTag = _xcore.TraceTag
set_current_trace = _xcore.set_current_trace
take_current_trace = _xcore.take_current_trace
eval_jaxpr = _jcore.eval_jaxpr
SourceInfo = Any

# jaxprop's own frames are not the user's: error messages point past them.
_source_info.register_exclusion(os.path.dirname(os.path.abspath(__file__)) + os.sep)

__all__ = [
    "ClosedJaxpr", "Jaxpr", "Primitive", "SourceInfo", "SymbolicZero", "Trace", "TraceTag",
    "Tracer", "Zero", "aval_of", "bind_on", "current_source", "escaped_tracer_check",
    "eval_jaxpr", "float0", "get_current_trace", "set_current_trace", "source_summary",
    "take_current_trace", "to_concrete_value",
]


def aval_of(x: Any) -> Any:
    """The abstract value (shape, dtype, weak type) of an array, scalar or tracer."""
    return jax.typeof(x)


def to_concrete_value(x: Any) -> Any:
    """The concrete value under ``x`` if there is one (so Python ``if`` works), else None."""
    return _core.to_concrete_value(x)


def bind_on(trace: Any, primitive: Any, args: Any, params: dict) -> Any:
    """Apply ``primitive`` to ``args`` on ``trace`` (the parent of a jaxprop trace)."""
    avals = tuple(map(_core.typeof, args))
    return primitive.bind_with_trace(trace, args, avals, params)


def get_current_trace() -> Any:
    """The trace that ``jax.numpy`` operations bind on right now."""
    return _core.trace_ctx.trace


def current_source() -> Any:
    """A cheap handle on the current Python traceback, summarised only when shown."""
    return _source_info.current()


def source_summary(source: Any) -> str:
    """``file:line (function)`` of the first user frame of ``source``; '' if unknown."""
    if source is None:
        return ""
    try:
        return _source_info.summarize(source)
    except Exception:  # pragma: no cover - a traceback JAX cannot summarise
        return ""


def escaped_tracer_check(value: Any) -> None:
    """Raise JAX's own escaped-tracer error when ``value`` belongs to a dead trace."""
    if isinstance(value, Tracer) and not value._trace.is_valid():
        raise _core.escaped_tracer_error(value)

