"""Eager speed: the reverse sweep of a tape as one compiled program.

Without ``jax.jit`` every primitive is one dispatch. The forward pass has to run op by op —
it is the user's Python — but the sweep is jaxprop's own code, a pure function of the tape's
arrays and cotangents. So once a tape of one *structure* (the same primitives, params, wiring
and rules; see :class:`~jaxprop.tracer.Tape`) has been swept :data:`WARMUP` time(s), further
sweeps of that structure run as one XLA program: one dispatch instead of one or more per
rule, with the rules' elementwise work fused. The result is the same sweep, traced once.

The same holds under ``jax.vmap`` of eager code (the compiled sweep is batched). The sweep
stays per node, as written, when user Python runs inside it or must see it: tapes holding
hooks or tags, ``custom_vjp`` backward functions (their nodes never compare equal), the
user's own ``custom_jvp`` rules (they may read Python state; JAX's eager grad re-runs them on
every call, and so does this sweep — JAX's own rules, ``jax.nn.relu`` …, are compiled), sweeps
inside :func:`~jaxprop.inlining` (explain, the NaN search) or an ``override`` block, and
sweeps under ``jax.jit`` or another jaxprop trace (there they are compiled with the rest).
A rule that needs concrete values makes its structure fall back to per node, once. Tapes of
more than :data:`MAX_NODES` nodes (an eagerly unrolled loop of thousands of steps) stay per node
too: XLA would spend minutes compiling a sweep that runs a handful of times.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax

from jaxprop import _jax
from jaxprop.registry import OVERRIDES, Cotangent
from jaxprop.sweep import SWEEP_CHECKS, backward
from jaxprop.tracer import Tape, inlining_forced, zeros_of

__all__ = ["STATS", "WARMUP", "sweep"]

WARMUP = 2  # sweeps of one structure run per node before it is compiled
_SEEN: collections.OrderedDict[Any, int] = collections.OrderedDict()  # structure -> sweeps
_SEEN_MAX = 1024
MAX_NODES = 1000  # larger tapes (long unrolled loops) stay per node: XLA compile time grows
_FAILED: set[Any] = set()  # structures whose sweep cannot be traced (a rule needs values)
STATS: collections.Counter[str] = collections.Counter()  # sweeps run "compiled" / "per_node"


def sweep(tape: Tape, out_cts: Sequence[Cotangent], in_specs: Sequence[Any]) -> list[Any]:
    """Cotangents of the tape's inputs (zeros where none arrives), given ``out_cts``.

    Compiled per tape structure when eager; see the module docstring.
    """
    key, in_specs = _compile_key(tape), tuple(in_specs)
    if key is not None:
        try:
            result = list(_compiled(tape, list(out_cts), in_specs))
        except Exception:  # noqa: BLE001 - a rule that reads values: sweep per node instead
            _FAILED.add(key)
        else:
            STATS["compiled"] += 1
            return result
    STATS["per_node"] += 1
    return _sweep_filled(tape, out_cts, in_specs)


def _sweep_filled(tape: Tape, out_cts: Sequence[Cotangent], in_specs: tuple) -> list[Any]:
    in_cts = backward(tape.nodes, tape.out_slots, out_cts, tape.in_slots)
    return [zeros_of(spec) if ct is None else ct for ct, spec in zip(in_cts, in_specs)]


_compiled = jax.jit(_sweep_filled, static_argnums=2)


def _compile_key(tape: Tape) -> Any:
    """The tape's structure key if its sweep should run compiled now, else None."""
    if (not _jax.is_dispatching(_jax.get_current_trace()) or inlining_forced() or OVERRIDES
            or SWEEP_CHECKS or not tape.nodes or len(tape.nodes) > MAX_NODES):
        return None
    key = tape.skeleton().key
    if key is None or key in _FAILED or _has_marker(tape):
        return None
    count = _SEEN.pop(key, 0) + 1
    _SEEN[key] = count
    if len(_SEEN) > _SEEN_MAX:
        _SEEN.popitem(last=False)
    return key if count > WARMUP else None


def _has_marker(tape: Tape) -> bool:
    """Whether a hook or tag (user Python in the sweep) is on the tape or an inner tape."""
    return any(n.name in _jax.MARKERS
               or (isinstance(n.residuals, Tape) and _has_marker(n.residuals))
               for n in tape.nodes)
