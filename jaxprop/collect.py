"""Where the cotangents of tagged values go while :func:`jaxprop.grad_and_tags` runs.

A :class:`TagCollector` learns, while the function is recorded, which tags exist (their
pytree structure and types, so an unused tag gets zeros) and, while the tape is swept,
receives each tag's cotangent. Loop and branch rules (``jaxprop/rules/control.py``) open a
:func:`sub_collector` around one step's forward or backward: the tags of a ``scan`` body
come out as per-step stacks (leading axis = the scan's length), a traced ``cond``'s as the
taken branch's cotangent (zeros if another branch ran). A ``while_loop`` run eagerly is
unrolled on the tape; :func:`loop_step` numbers its iterations, so its tags are stacked too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
from jax.tree_util import tree_unflatten

from jaxprop.tracer import pushed

__all__ = ["COLLECTORS", "STEPS", "TagCollector", "loop_step", "sub_collector"]

Key = tuple[str, int]  # (tag name, leaf index)

# The iteration numbers of the eagerly unrolled while loops being recorded (innermost last):
# a tag recorded in one of them gets one cotangent per iteration, stacked.
STEPS: list[int] = []


def loop_step(k: int) -> Any:
    """Tags recorded inside the block belong to iteration ``k`` of an unrolled loop."""
    return pushed(STEPS, k)


class TagCollector:
    """Tags noted while recording (key -> (treedef, count, aval)) and cotangents swept."""

    def __init__(self, parent: Any, root: TagCollector | None = None) -> None:
        self.parent = parent  # the trace grad_and_tags was called on (root collectors)
        self.root = root or self
        self.notes: dict[Key, tuple[Any, Any, Any]] = {}
        self.cts: dict[Key, Any] = {}
        self.steps: dict[Key, set[tuple]] = {}  # tags in unrolled loops: their iterations
        self.inner: set[str] = set()  # tags on tapes grad_and_tags cannot reach (nested grads)

    def note(self, key: Key, treedef: Any, count: int | None, aval: Any,
             step: tuple = ()) -> None:
        self.notes[key] = (treedef, count, aval)
        if step:
            self.steps.setdefault(key, set()).add(step)

    def add(self, key: Key, ct: Any, step: tuple = ()) -> None:
        if step:
            key = (*key, step)  # type: ignore[assignment]
        if key in self.cts:
            raise ValueError(f"jaxprop.tag name '{key[0]}' was given to more than one value; "
                             "use a distinct name for each tagged value.")
        self.cts[key] = ct

    def result(self) -> dict[str, Any]:
        """``{name: ∂L/∂value}``: a tag's pytree, or a list for a scope tag (count None)."""
        for name in sorted(self.inner - {k[0] for k in self.notes}):
            raise ValueError(
                f"jaxprop.tag '{name}' is inside a gradient taken within the function "
                "grad_and_tags differentiates, whose cotangents it cannot return; tag a value "
                "of the outer function instead.")
        by_name: dict[str, dict[int, tuple]] = {}
        for (name, index), note in self.notes.items():
            by_name.setdefault(name, {})[index] = note
        out = {}
        for name, notes in by_name.items():
            treedef, count, _ = next(iter(notes.values()))
            n = max(notes) + 1 if count is None else count
            leaves = [self._ct((name, i), notes.get(i)) for i in range(n)]
            out[name] = leaves if count is None else tree_unflatten(treedef, leaves)
        return out

    def _ct(self, key: Key, note: tuple | None) -> Any:
        if key in self.steps:  # one per iteration of an unrolled loop, stacked
            return jnp.stack([self._ct((*key, s), note)  # type: ignore[arg-type]
                              for s in sorted(self.steps[key])])
        ct = self.cts.get(key)
        if ct is not None or note is None:
            return ct
        aval = note[2]
        return None if aval is None else jnp.zeros(aval.shape, aval.dtype)


COLLECTORS: list[TagCollector] = []


@contextlib.contextmanager
def sub_collector() -> Iterator[TagCollector | None]:
    """A fresh collector for one loop step or branch (None when grad_and_tags is not
    running): the caller hands what it gathered to the enclosing collector."""
    if not COLLECTORS:
        yield None
        return
    with pushed(COLLECTORS, TagCollector(None, root=COLLECTORS[-1].root)) as sub:
        yield sub
