"""How many carries a differentiated loop may keep: the checkpoint budget, and its cost.

Reverse mode through a ``lax.while_loop`` whose trip count is traced (under ``jax.jit``)
keeps at most ``C`` copies of the loop's carry (*checkpoints*) and recomputes the steps in
between during the backward pass (:mod:`jaxprop.rules.loops`). ``C`` is set like a JAX config
option, for the code traced inside the block::

    with jaxprop.checkpoints(8):
        g = jax.jit(jaxprop.grad(loss))(params)

``checkpoints(C, scans=True)`` also gives every ``lax.scan`` longer than ``C`` steps the same
budget: ``C`` saved carries instead of one step's residuals per step. The value is read when
a function is traced (like ``jax.config``): a program already compiled by ``jax.jit`` keeps
the budget it was traced with.

The schedule (derived in :mod:`jaxprop.rules.loops`): the forward stores every ``s``-th
carry, ``s = 2^k``, and doubles ``s`` — forgetting every other checkpoint — when the
``max(C − ⌈k/2⌉, 1)`` slots it may use are full; the backward reverses the last unreversed step
with a binomial split of the distance ``d`` to the nearest checkpoint, given ``f`` free slots:
advance ``m = d − binom(f−1+r, f−1)`` steps and store, ``r`` the least with
``binom(f+r, f) ≥ d``. :func:`recomputed_steps` replays that schedule in Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = ["Budget", "DEFAULT_CHECKPOINTS", "budget", "checkpoints", "recomputed_steps",
           "step_counts"]

DEFAULT_CHECKPOINTS = 32


class Budget(NamedTuple):
    """``loops``: carries kept by a traced while loop; ``scans``: carries kept by a long
    ``lax.scan`` (None: a scan keeps every step's residuals, as ``jax.grad`` does)."""
    loops: int
    scans: int | None


_BUDGETS = [Budget(DEFAULT_CHECKPOINTS, None)]


@contextlib.contextmanager
def checkpoints(n: int = DEFAULT_CHECKPOINTS, *, scans: bool = False) -> Iterator[Budget]:
    """Differentiated while loops traced inside the block keep at most ``n`` carries (n ≥ 1);
    with ``scans=True``, scans longer than ``n`` steps keep ``n`` carries too, recomputing the
    rest in the backward pass. Memory O(n × carry); recomputation grows like T·log T / log n.

    Example::

        with jaxprop.checkpoints(16, scans=True):
            grads = jax.jit(jaxprop.grad(rnn_loss))(params, long_sequence)
    """
    if int(n) < 1:
        raise ValueError(f"jaxprop.checkpoints needs at least one checkpoint, got {n}.")
    _BUDGETS.append(Budget(int(n), int(n) if scans else None))
    try:
        yield _BUDGETS[-1]
    finally:
        _BUDGETS.pop()


def budget() -> Budget:
    """The budget in force (innermost :func:`checkpoints` block, else the default)."""
    return _BUDGETS[-1]


# -- the schedule, replayed in Python (the compiled loops run the same arithmetic) -----------
def split(d: int, f: int) -> int:
    """Steps to advance from a checkpoint ``d`` steps before the next step to reverse, with
    ``f ≥ 1`` free slots: ``d − binom(f−1+r, f−1)`` for the least ``r`` with
    ``binom(f+r, f) ≥ d`` (then the part after the new checkpoint is reversible with ``f−1``
    slots and the part before with ``f``, each step advanced at most ``r`` times), clipped to
    ``[1, d−1]``. In float32, as the compiled schedule computes it."""
    df, ff = np.float32(d), np.float32(f)
    r, b = np.float32(0), np.float32(1)
    while b < df:
        r = r + np.float32(1)
        b = np.round(b * (ff + r) / r)
    right = np.round(b * ff / (ff + r))
    return int(min(max(d - int(right), 1), d - 1))


def forward_positions(trip_count: int, n: int) -> list[int]:
    """The steps whose carries the forward keeps (online: the trip count is not used)."""
    kept: list[int] = []
    level = 0
    for t in range(trip_count):
        if t % (1 << level) == 0 and len(kept) >= _room(n, level):
            kept = [p for p in kept if p % (2 << level) == 0]
            level += 1
        if t % (1 << level) == 0 and len(kept) < _room(n, level):
            kept.append(t)
    return kept


def _room(n: int, level: int) -> int:
    """Slots the forward may fill at stride ``2^level``: the rest stay free for the backward,
    whose binomial reversal of the last ``≤ 2^level`` steps wants about ``level/2`` of them."""
    return max(n - (level + 1) // 2, 1)


def recomputed_steps(trip_count: int, n: int) -> int:
    """Loop steps the backward pass re-evaluates to reach the steps it reverses, for a loop of
    ``trip_count`` steps and ``n`` checkpoints (0 when ``trip_count ≤ n``). Every step is
    also evaluated once by the forward and once on the tape its reverse sweep reads, so the
    body runs ``2·trip_count + recomputed_steps(trip_count, n)`` times in all."""
    kept, end, advanced = forward_positions(trip_count, n), trip_count, 0
    while end > 0:
        start = max(p for p in kept if p < end)
        d, free = end - start, n - len(kept)
        if d > 1 and free >= 1:
            m = split(d, free)
            kept.append(start + m)
            advanced += m
        else:
            advanced += d - 1
            end -= 1
            kept = [p for p in kept if p < end]
    return advanced


_COUNTS: list[list[dict]] = []


@contextlib.contextmanager
def step_counts() -> Iterator[list[dict]]:
    """Loops traced inside the block report, each time their backward pass runs, a dict
    ``{"trip_count": T, "recomputed": R}`` (appended to the yielded list, through
    ``jax.debug.callback``), so a compiled program's work can be checked against
    :func:`recomputed_steps`."""
    records: list[dict] = []
    _COUNTS.append(records)
    try:
        yield records
    finally:
        _COUNTS.remove(records)


def counting() -> list[dict] | None:
    """The list a loop traced now reports to, or None."""
    return _COUNTS[-1] if _COUNTS else None
