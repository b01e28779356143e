"""The reverse sweep: walk a tape backwards, turning upstream into downstream cotangents.

Seed the outputs' cotangents, then for each node from last to first::

    downstream = rule(node, upstream)

A value read by several nodes receives the **sum** of their downstream cotangents (the copy
gate). A slot with no entry is a symbolic zero: nodes whose outputs all have zero cotangent
are skipped, and nothing is ever materialised for them. Rules bind on the current trace, so
the sweep itself is traceable: under ``jax.jit`` it becomes part of the compiled program, and
under an outer jaxprop trace it is differentiated again (higher order). Each rule's ops carry
the forward op's name scope, ``transpose(<scope>)/<primitive>``, in jaxprs, HLO and profiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

from jaxprop import _jax
from jaxprop.registry import Cotangent, Node

# Hooks that observe each node's cotangents during a sweep (explain / NaN search use them).
SweepObserver = Any

# Active sweep checks (``jaxprop.detect_anomaly``), innermost last. Each has ``start()``,
# giving an object with ``observe(node, cts_out, cts_in)`` and ``finish()``.
SWEEP_CHECKS: list[Any] = []


def add_cotangents(a: Cotangent, b: Cotangent) -> Cotangent:
    """The copy gate: cotangents of one value from several uses add up (None is zero)."""
    if a is None:
        return b
    if b is None:
        return a
    return lax.add(a, b)


def _apply_rule(node: Node, cts: list[Cotangent], mesh: Any) -> Any:
    """``node.rule(node, cts)``, under the abstract mesh current when the node was recorded
    if that differs from the sweep's (a node recorded inside ``jax.sharding.auto_axes``)."""
    recorded = getattr(node.source, "mesh", None)
    if recorded is None or recorded is mesh or recorded == mesh:
        return node.rule(node, cts)
    with jax.sharding.use_abstract_mesh(recorded):
        return node.rule(node, cts)


def backward(nodes: Sequence[Node], out_slots: Sequence[int | None],
             out_cts: Sequence[Cotangent], in_slots: Sequence[int | None],
             observer: SweepObserver = None) -> list[Cotangent]:
    """Cotangents of the ``in_slots`` values, given cotangents ``out_cts`` of ``out_slots``.

    ``observer(node, cts_out, cts_in)``, if given, is called after each rule runs.
    """
    if observer is None and SWEEP_CHECKS:
        check = SWEEP_CHECKS[-1].start()
        try:
            return backward(nodes, out_slots, out_cts, in_slots, check.observe)
        finally:
            check.finish()
    cts: dict[int, Cotangent] = {}
    mesh = jax.sharding.get_abstract_mesh()
    for slot, ct in zip(out_slots, out_cts):
        if slot is not None and ct is not None:
            cts[slot] = add_cotangents(cts.get(slot), ct)
    for node in reversed(nodes):
        node_cts = [cts.pop(s, None) if s is not None else None for s in node.out_slots]
        if all(ct is None for ct in node_cts):
            continue
        with _jax.backward_scope(node.source, node.name):
            in_cts = _apply_rule(node, node_cts, mesh)
        if observer is not None:
            observer(node, node_cts, in_cts)
        for slot, ct in zip(node.in_slots, in_cts):
            if slot is not None and ct is not None:
                cts[slot] = add_cotangents(cts.get(slot), ct)
    return [cts.get(s) if s is not None else None for s in in_slots]
