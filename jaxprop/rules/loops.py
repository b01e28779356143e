"""Loops reversed in bounded memory: a while loop with a traced trip count, long scans.

A loop ``x_{t+1} = step(x_t)`` (with per-step inputs ``xs[t]`` and outputs ``ys[t]`` for a
scan) is one node. Its forward is a ``lax.while_loop`` that keeps at most ``C`` carries
(:func:`jaxprop.checkpoints`), chosen online since the trip count ``T`` is not known:

- keep every ``s``-th carry, ``s = 2^k``; when the ``max(C − ⌈k/2⌉, 1)`` slots the forward may
  use are full, forget every other checkpoint and double ``s``. At the end about
  ``½ log₂(T/C)`` slots are still free and consecutive checkpoints are at most ``2T/C``
  steps apart (the last interval, reversed first, gets the free slots).

Its backward is another ``lax.while_loop`` with an explicit stack — the slots, tagged with
the step each holds (−1: free) — and ``e``, the number of steps not yet reversed. Each
iteration looks at the nearest checkpoint ``p < e``, ``d = e − p`` steps back, and ``f`` free
slots:

- ``d = 1``: reverse step ``p`` — evaluate it on a fresh tape from the checkpoint and sweep
  that tape with the cotangent of ``x_e`` — then free the slot; ``e ← e − 1``.
- ``d > 1``, ``f ≥ 1``: advance ``m`` steps from ``x_p`` and store ``x_{p+m}`` (binomial split,
  :func:`jaxprop.checkpointing.split`: with ``r`` the least such that ``binom(f+r, f) ≥ d``,
  each step is re-evaluated at most ``r`` times, as in revolve).
- ``d > 1``, ``f = 0``: advance ``d − 1`` steps and reverse step ``e − 1``.

A loop of ``T ≤ C`` steps keeps every carry and re-evaluates nothing. Memory: ``C`` carries
(plus, for a scan, its inputs and outputs). The recomputed steps are counted
(:func:`jaxprop.checkpointing.recomputed_steps` is the same schedule in Python).

Both passes are plain ``lax`` loops, so they run under ``jax.vmap`` (a batched while loop
steps ``x ← select(pred(x), body(x), x)`` while any element runs, each element stopping at
its own step) and are differentiated again by these same handlers (grad of grad). Loops
nested in the body meet this handler again when the step is reversed on its tape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxprop import _jax, checkpointing
from jaxprop.registry import Cotangent, Node
from jaxprop.rules.control import _ct_for, _scan_diff, _traced_vjp
from jaxprop.rules.custom import eval_on
from jaxprop.sweep import backward
from jaxprop.tracer import JaxpropTrace

__all__ = ["checkpointed_scan", "checkpointed_while"]


class _Loop:
    """The static description of a loop: ``body`` (a ClosedJaxpr: consts ‖ carry ‖ x_t ->
    carry ‖ y_t), counts, which body inputs are differentiated, the budget ``n``, and for a
    scan its ``length`` and direction."""

    def __init__(self, body: Any, n_consts: int, n_carry: int, diff: tuple, n: int,
                 length: int | None = None, reverse: bool = False) -> None:
        self.body, self.n_consts, self.n_carry, self.diff = body, n_consts, n_carry, diff
        self.n, self.length, self.reverse = n, length, reverse

    def step(self, consts: Sequence[Any], carry: Sequence[Any], x_t: Sequence[Any]) -> list:
        """carry ‖ y_t, evaluated on the current trace (no tape)."""
        return eval_on(_jax.get_current_trace(), self.body, [*consts, *carry, *x_t])


# -- the two loops, as nodes ------------------------------------------------------------------
def checkpointed_while(trace: JaxpropTrace, primitive: Any, values: Sequence[Any],
                       slots: Sequence[Any], params: dict) -> list[Any]:
    """while(cond_consts ‖ body_consts ‖ carry) with a traced trip count: one node whose
    forward keeps at most ``C`` carries and whose backward recomputes from them."""
    n_cc, n_bc = params["cond_nconsts"], params["body_nconsts"]
    body, n_k = params["body_jaxpr"], len(values) - n_cc - params["body_nconsts"]
    offset = n_cc
    if params["cond_jaxpr"].out_avals[0].shape:  # batched: run while any element runs
        body, offset, n_bc = _masked_body(params, values), 0, n_cc + n_bc
    diff = tuple(_scan_diff(body.jaxpr, slots[offset:], n_bc, n_k))
    loop = _Loop(body, n_bc, n_k, diff, checkpointing.budget().loops)
    cond_consts, consts = values[:n_cc], values[offset:offset + n_bc]

    def pred(carry: Sequence[Any]) -> Any:
        p = eval_on(_jax.get_current_trace(), params["cond_jaxpr"], [*cond_consts, *carry])[0]
        return jnp.any(p)

    with _jax.set_current_trace(trace.parent):
        carry, _, saved = _forward(loop, consts, values[n_cc + params["body_nconsts"]:], [],
                                   pred, None)
    info = dict(loop=loop, offset=offset)
    return trace.record(primitive, info, values, slots, carry, _loop_rule,
                        residuals=saved, multiple_results=True)


def _masked_body(params: dict, values: Sequence[Any]) -> Any:
    """A while loop batched by ``jax.vmap`` has one predicate per element: its step is
    ``x ← select(pred(x), body(x), x)`` elementwise (the loop runs while any element does).
    That step as a ClosedJaxpr: cond_consts ‖ body_consts ‖ carry -> carry."""
    n_cc, n_bc = params["cond_nconsts"], params["body_nconsts"]

    def masked(*args: Any) -> list:
        trace = _jax.get_current_trace()
        p = eval_on(trace, params["cond_jaxpr"], [*args[:n_cc], *args[n_cc + n_bc:]])[0]
        new = eval_on(trace, params["body_jaxpr"], args[n_cc:])
        return [lax.select(lax.broadcast_in_dim(p, jnp.shape(x), range(p.ndim)), x, old)
                for x, old in zip(new, args[n_cc + n_bc:])]

    avals = [_jax.aval_of(v) for v in values]
    return jax.make_jaxpr(masked)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])


def checkpointed_scan(trace: JaxpropTrace, primitive: Any, values: Sequence[Any],
                      slots: Sequence[Any], params: dict, n: int) -> list[Any]:
    """scan(consts ‖ carry ‖ xs) -> carry ‖ ys keeping ``n`` carries instead of every
    step's residuals."""
    n_c, n_k, length = params["num_consts"], params["num_carry"], params["length"]
    body = params["jaxpr"]
    diff = tuple(_scan_diff(body.jaxpr, slots, n_c, n_k))
    loop = _Loop(body, n_c, n_k, diff, n, length, params["reverse"])
    with _jax.set_current_trace(trace.parent):
        carry, ys, saved = _forward(loop, values[:n_c], values[n_c:n_c + n_k],
                                    values[n_c + n_k:], None, length)
    info = dict(loop=loop, offset=0)
    return trace.record(primitive, info, values, slots, [*carry, *ys], _loop_rule,
                        residuals=saved, multiple_results=True)


# -- forward: keep at most C carries, chosen online -------------------------------------------
def _index(loop: _Loop, t: Any, length: Any) -> Any:
    """Which element of xs / ys step ``t`` reads and writes."""
    return length - 1 - t if loop.reverse else t


def _forward(loop: _Loop, consts: Sequence[Any], init: Sequence[Any], xs: Sequence[Any],
             pred: Any, length: int | None) -> tuple[list, list, tuple]:
    """Run the loop (``pred`` for a while loop, else ``length`` steps): (carry, ys, saved),
    saved = (checkpoint buffers, their steps, trip count)."""
    n = loop.n
    buffers = [jnp.zeros((n, *jnp.shape(x)), _jax.aval_of(x).dtype) for x in init]
    y_avals = loop.body.out_avals[loop.n_carry:]
    ys = [jnp.zeros((length, *a.shape), a.dtype) for a in y_avals]
    slots = jnp.full((n,), -1, jnp.int32)

    def keep_going(state: tuple) -> Any:
        carry, t = state[0], state[1]
        return pred(carry) if pred is not None else t < length

    def step(state: tuple) -> tuple:
        carry, t, level, buffers, slots, ys = state
        at = lambda level: t % (1 << level) == 0  # noqa: E731
        cap = lambda level: jnp.maximum(n - (level + 1) // 2, 1)  # noqa: E731
        thin = at(level) & (jnp.sum(slots >= 0) >= cap(level))
        slots = jnp.where(thin & (slots % (2 << level) != 0), -1, slots)
        level = level + thin.astype(jnp.int32)
        store = at(level) & (jnp.sum(slots >= 0) < cap(level))
        slot = jnp.where(store, jnp.argmax(slots < 0), n)  # n: out of range, dropped
        buffers = [b.at[slot].set(x, mode="drop") for b, x in zip(buffers, carry)]
        slots = slots.at[slot].set(t, mode="drop")
        i = _index(loop, t, length) if length is not None else 0
        x_t = [lax.dynamic_index_in_dim(x, i, keepdims=False) for x in xs]
        outs = loop.step(consts, carry, x_t)
        ys = [lax.dynamic_update_index_in_dim(y, o, i, 0) for y, o in
              zip(ys, outs[loop.n_carry:])]
        return outs[:loop.n_carry], t + 1, level, buffers, slots, ys

    state = (list(init), jnp.int32(0), jnp.int32(0), buffers, slots, ys)
    carry, trip_count, _, buffers, slots, ys = lax.while_loop(keep_going, step, state)
    return list(carry), list(ys), (buffers, slots, trip_count)


# -- backward: binomial reversal from the checkpoints, with an explicit stack -----------------
def _split(d: Any, f: Any) -> Any:
    """:func:`jaxprop.checkpointing.split`, traced: steps to advance before storing."""
    df, ff = d.astype(jnp.float32), f.astype(jnp.float32)

    def grow(state: tuple) -> tuple:
        r, b = state
        r = r + 1.0
        return r, jnp.round(b * (ff + r) / r)

    r, b = lax.while_loop(lambda s: s[1] < df, grow, (jnp.float32(0), jnp.float32(1)))
    right = jnp.round(b * ff / (ff + r)).astype(jnp.int32)
    return jnp.clip(d - right, 1, d - 1)


def _loop_rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """Reverse the loop step by step, last first: ct_x_t = (∂step/∂x_t)ᵀ ct_x_{t+1},
    ct_consts = Σ_t (∂step/∂consts)ᵀ ct_x_{t+1}, ct_xs[t] = (∂step/∂xs[t])ᵀ ct_x_{t+1};
    each x_t is recomputed from the nearest checkpoint."""
    sweep, offset = _Reversal(node, cts), node.params["offset"]
    ct_consts, ct_init, ct_xs = sweep.run()
    out: list[Cotangent] = [None] * len(node.inputs)
    for j, ct in [*zip(sweep.const_d, ct_consts), *zip(sweep.carry_d, ct_init),
                  *zip(sweep.xs_d, ct_xs)]:
        if node.in_slots[offset + j] is not None:
            out[offset + j] = ct
    return out


class _Reversal:
    """The backward loop of one loop node: what it reads (consts, xs, the cotangents of the
    outputs, the checkpoints) and its three parts — advance, reverse one step, iterate."""

    def __init__(self, node: Node, cts: Sequence[Cotangent]) -> None:
        self.loop = loop = node.params["loop"]
        self.values = values = list(node.inputs[node.params["offset"]:])
        self.saved, n_c, n_k = node.residuals, loop.n_consts, loop.n_carry
        self.consts, self.xs = values[:n_c], values[n_c + n_k:]
        self.length = loop.length
        self.carry_d = [i for i in range(n_c, n_c + n_k) if loop.diff[i]]
        self.const_d = [i for i in range(n_c) if loop.diff[i]]
        self.xs_d = [i for i in range(n_c + n_k, len(values)) if loop.diff[i]]
        self.cts, self.ys_ct = cts, list(cts[n_k:])
        self.position = {i: k for k, i in enumerate(i for i in range(len(values))
                                                    if loop.diff[i])}

    def x_at(self, t: Any) -> list:
        """The per-step inputs step ``t`` reads (none for a while loop)."""
        return [lax.dynamic_index_in_dim(x, _index(self.loop, t, self.length), keepdims=False)
                for x in self.xs]

    def advance(self, carry: list, start: Any, k: Any) -> list:
        """The carry ``k`` steps after step ``start``'s."""
        def one(state: tuple) -> tuple:
            j, carry = state
            return j + 1, self.loop.step(self.consts, carry, self.x_at(start + j))[
                :self.loop.n_carry]
        return lax.while_loop(lambda s: s[0] < k, one, (jnp.int32(0), carry))[1]

    def reverse_step(self, operands: tuple) -> tuple:
        """Step ``t`` on a tape, swept with the cotangents of its outputs:
        (ct of its carry, consts' cotangents so far, ct of its xs)."""
        carry, t, ct_carry, acc = operands
        loop, n_k, values, at = self.loop, self.loop.n_carry, self.values, self.position
        _, tape = _traced_vjp(loop.body, [*self.consts, *carry, *self.x_at(t)], loop.diff)
        out_cts: list = [None] * (n_k + len(self.ys_ct))
        for j, ct in zip(self.carry_d, ct_carry):
            out_cts[j - loop.n_consts] = ct
        for j, ct in enumerate(self.ys_ct):
            if ct is not None:
                out_cts[n_k + j] = lax.dynamic_index_in_dim(
                    ct, _index(loop, t, self.length), keepdims=False)
        in_cts = backward(tape.nodes, tape.out_slots, out_cts, tape.in_slots)
        return ([_ct_for(in_cts[at[j]], values[j]) for j in self.carry_d],
                [a + _ct_for(in_cts[at[j]], values[j]) for a, j in zip(acc, self.const_d)],
                [_ct_for(in_cts[at[j]], values[j], step=True) for j in self.xs_d])

    def skip(self, operands: tuple) -> tuple:
        """No step reversed this iteration (a checkpoint was stored instead)."""
        _, _, ct_carry, acc = operands
        return ct_carry, acc, [_ct_for(None, self.values[j], step=True) for j in self.xs_d]

    def iteration(self, state: tuple) -> tuple:
        """From the nearest checkpoint before ``end``: store a new one (``push``) or
        reverse step ``end − 1``."""
        end, buffers, slots, ct_carry, acc, ct_xs, advanced = state
        start = jnp.max(jnp.where(slots < end, slots, -1))
        d, free = end - start, jnp.sum(slots < 0)
        push = (d > 1) & (free >= 1)
        carry = [lax.dynamic_index_in_dim(b, jnp.argmax(slots == start), keepdims=False)
                 for b in buffers]

        def climb(carry: list) -> tuple:
            k = jnp.where(push, _split(d, jnp.maximum(free, 1)), d - 1)
            return k, self.advance(carry, start, k)

        k, carry = lax.cond(d > 1, climb, lambda carry: (jnp.int32(0), carry), carry)
        new = jnp.where(push, jnp.argmax(slots < 0), self.loop.n)  # n: out of range, dropped
        buffers = [b.at[new].set(x, mode="drop") for b, x in zip(buffers, carry)]
        slots = slots.at[new].set(start + k, mode="drop")
        ct_carry, acc, ct_x = lax.cond(push, self.skip, self.reverse_step,
                                       (carry, start + k, ct_carry, acc))
        if self.xs_d:
            i = jnp.where(push, self.length, _index(self.loop, start + k, self.length))
            ct_xs = [c.at[i].set(x, mode="drop") for c, x in zip(ct_xs, ct_x)]
        end = jnp.where(push, end, end - 1)
        slots = jnp.where(slots >= end, -1, slots)
        return end, buffers, slots, ct_carry, acc, ct_xs, advanced + k

    def run(self) -> tuple[list, list, list]:
        """(ct_consts, ct_init, ct_xs), reporting the recomputed steps if asked to."""
        buffers, slots, trip_count = self.saved
        n_c, values = self.loop.n_consts, self.values
        state = (trip_count, buffers, slots,
                 [_ct_for(self.cts[j - n_c], values[j]) for j in self.carry_d],
                 [_ct_for(None, values[j]) for j in self.const_d],
                 [_ct_for(None, values[j]) for j in self.xs_d], jnp.int32(0))
        _, _, _, ct_init, ct_consts, ct_xs, advanced = lax.while_loop(
            lambda s: s[0] > 0, self.iteration, state)
        records = checkpointing.counting()
        if records is not None:
            jax.debug.callback(lambda t, r: records.append(
                {"trip_count": int(t), "recomputed": int(r)}), trip_count, advanced)
        return ct_consts, ct_init, ct_xs
