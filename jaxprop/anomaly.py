"""Anomaly mode: stop at the first backward node that turns a finite gradient non-finite.

PyTorch's ``detect_anomaly`` names the *forward* operation whose backward produced a NaN.
jaxprop's sweep knows each node's upstream and downstream cotangents, so inside
:class:`detect_anomaly` every sweep checks, node by node, whether a rule received finite
cotangents and sent a NaN or inf below — the node where the NaN is born — and raises
:class:`NonFiniteGradientError` naming its primitive, the user's ``file:line``, the forward
inputs and outputs and both cotangents (the report of :func:`jaxprop.find_nan_origin`).

- Eagerly the error is raised in the sweep, at that node.
- Under ``jax.jit`` the checks are compiled into the step: flags and small summaries of each
  node's values travel to one ``jax.debug.callback`` at the end of the sweep (loop bodies:
  at the end of each step's sweep), which raises. JAX reports a callback's exception as a
  ``JaxRuntimeError`` carrying the message; inside the ``with`` block it is re-raised as
  :class:`NonFiniteGradientError`.
- The mode is read while a function is traced: a step compiled *inside* the block keeps its
  checks on later calls, and one compiled before it has none (the block then warns, as it
  saw no sweep: call ``jax.clear_caches()`` or build the jitted step inside the block).
- Only jaxprop's sweep is checked (``jaxprop.grad``, ``value_and_grad``, ``vjp`` …), not
  ``jax.grad``'s. The checks cost a reduction per value and keep the values' summaries:
  a debugging mode, not for every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxprop import _jax
from jaxprop.explain import short_source
from jaxprop.nan import _nonfinite, node_lines, pack_node
from jaxprop.registry import Node
from jaxprop.scopes import ScopedContext
from jaxprop.sweep import SWEEP_CHECKS

__all__ = ["NonFiniteGradientError", "detect_anomaly"]


class NonFiniteGradientError(FloatingPointError):
    """A backward node received finite cotangents and produced NaN or inf."""

    def __init__(self, message: str, primitive: str, source: str) -> None:
        super().__init__(message)
        self.primitive, self.source = primitive, source


class detect_anomaly(ScopedContext):
    """Raise at the first node of a jaxprop backward pass that makes a gradient NaN or inf.

    A context manager or decorator; see the module docstring for jit, loops and cost::

        with jaxprop.detect_anomaly():
            params, opt_state = train_step(params, opt_state, batch)   # jitted: checked

    ``error`` holds the last :class:`NonFiniteGradientError` raised by a check.
    """

    active = SWEEP_CHECKS
    kind = "detect_anomaly"

    def __init__(self, warn: bool = True) -> None:
        super().__init__(None, warn)
        self.error: NonFiniteGradientError | None = None

    def start(self) -> _SweepCheck:
        """Checks for one sweep."""
        self.acted("sweep")
        return _SweepCheck(self)

    def describe(self) -> str:
        return "jaxprop.detect_anomaly()"

    def unused_reasons(self) -> list[str]:
        return super().unused_reasons()[:2]  # (a jitted block's sweeps are still checked)

    def __enter__(self) -> detect_anomaly:
        self.error = None
        return super().__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        error = self.error
        super().__exit__(exc_type, exc, tb)
        if (exc is not None and error is not None and not isinstance(exc, type(error))
                and str(error) in str(exc)):  # a jitted check's error, wrapped by JAX
            raise error from exc


class _SweepCheck:
    """One sweep's checks: raise at once on concrete values, else one callback at the end."""

    def __init__(self, mode: detect_anomaly) -> None:
        self.mode = mode
        self.static: list[tuple] = []
        self.flags: list[Any] = []
        self.payload: list[Any] = []

    def observe(self, node: Node, cts_out: Sequence[Any], cts_in: Sequence[Any]) -> None:
        wanted, descs, arrays = pack_node(node, cts_out, cts_in)
        born = _nonfinite(wanted) & ~_nonfinite(cts_out)
        info = (node.name, _jax.source_summary(node.source), descs,
                tuple(f"v{s}" if s is not None else None for s in node.in_slots),
                tuple(f"v{s}" if s is not None else "_" for s in node.out_slots))
        if _jax.to_concrete_value(born) is not None:
            if bool(born):
                self.raise_at(info, arrays)
            return
        self.static.append(info)
        self.flags.append(born)
        self.payload.append(arrays)

    def finish(self) -> None:
        if not self.flags:
            return
        static = list(self.static)
        jax.debug.callback(lambda flags, payload: self.first(static, flags, payload),
                           self.flags, self.payload)

    def first(self, static: list[tuple], flags: Sequence[Any], payload: list) -> None:
        for info, flag, arrays in zip(static, flags, payload):
            if np.any(np.asarray(flag)):
                self.raise_at(info, arrays)

    def raise_at(self, info: tuple, arrays: tuple) -> None:
        name, source, descs, in_names, out_names = info
        lines = [f"jaxprop.detect_anomaly: the gradient becomes NaN/inf at {name}, "
                 f"{short_source(source) or 'source unknown'} — its upstream cotangent is finite, the "
                 "cotangent it sends to its inputs is not."]
        lines += node_lines(in_names, out_names, descs, arrays)
        self.mode.error = NonFiniteGradientError("\n".join(lines), name, source)
        raise self.mode.error
