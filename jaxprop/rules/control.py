"""Control flow: primitives that carry sub-programs (loops, branches, checkpoints).

- ``scan``: a forward ``lax.scan`` that records each step on a small tape and stacks the tape's
  per-step arrays (its residuals); the backward is a reverse ``lax.scan`` that rebuilds one
  step's tape and sweeps it: carries the carry-cotangent, accumulates the consts' cotangents
  and emits the xs' cotangents as its ys. Memory: O(T × one step's residuals); under
  ``jaxprop.checkpoints(C, scans=True)`` a longer scan keeps C carries instead (loops.py).
- ``cond`` / ``switch``: eagerly (concrete index) the taken branch is recorded inline; traced,
  a ``lax.switch`` whose branches record their tapes and return their residuals (zeros for
  the branches not taken); the backward is a ``lax.switch`` over the branches' sweeps.
- ``while``: eagerly (concrete predicate) the loop is unrolled on the tape step by step; with
  a traced predicate (under ``jax.jit``) it is one node that keeps at most C carries and
  recomputes the rest in its backward pass (:mod:`jaxprop.rules.loops`).
- ``remat2`` (``jax.checkpoint``): one node that saves its inputs and, with a checkpoint
  ``policy``, the outputs of the equations the policy saves (inside scans and conds too); its
  backward recomputes the rest of the forward on a fresh tape — only what the rules read —
  and sweeps it.
- pass-through: ``optimization_barrier``, ``device_put`` and ``name`` hand ct through; debug
  callbacks have no outputs (nothing to differentiate); ``pure_callback`` has no derivative
  (clear error).

Every backward here is written with ``lax.scan`` / ``lax.switch`` and jaxprop's own sweep, so
it is traceable (``jax.jit``, ``jax.vmap``) and differentiable again by these same handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as _xcore
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import tree_flatten, tree_unflatten

from jaxprop import _jax
from jaxprop.checkpointing import budget
from jaxprop.registry import OVERRIDES, Cotangent, Node, defvjp, noderule
from jaxprop.rules._util import convert_like, inputs_reaching
from jaxprop.collect import COLLECTORS, TagCollector, loop_step, sub_collector
from jaxprop.rules.custom import eval_on, has_marker, inline_call, typed_outputs
from jaxprop.sweep import SWEEP_CHECKS, backward
from jaxprop.tracer import (HANDLERS, JaxpropTrace, LinearTrace, Tape, handler,
                            is_differentiable, recording_body_of, run_traced, sharding_of)

__all__ = ["WhileLoopError", "cond", "remat", "scan", "while_loop"]


# -- shared helpers ---------------------------------------------------------------------------
def _merge(values: Sequence[Any], diff: Sequence[bool], tracers: Sequence[Any]) -> list[Any]:
    """``values`` with the differentiated positions replaced, in order, by ``tracers``."""
    it = iter(tracers)
    return [next(it) if d else v for v, d in zip(values, diff)]


def _traced_vjp(closed: Any, values: Sequence[Any], diff: Sequence[bool],
                evaluate: Callable[[Any, list], list] | None = None
                ) -> tuple[list[Any], Tape]:
    """Evaluate a (Closed)Jaxpr on ``values`` under a fresh jaxprop trace whose inputs are the
    ``diff`` positions (``evaluate(closed, args)``, by default :func:`eval_on` the trace).
    Returns the parent-level outputs and the tape (in_slots: diff inputs)."""
    evaluate = evaluate or (lambda c, args: eval_on(_jax.get_current_trace(), c, args))
    trace, tracers, outs = run_traced(lambda *d: evaluate(closed, _merge(values, diff, d)),
                                      [v for v, d in zip(values, diff) if d])
    out_values, out_slots = zip(*map(trace.unwrap, outs)) if outs else ((), ())
    return list(out_values), Tape(trace.nodes, [t.slot for t in tracers], out_slots)


class _Layout:
    """Where each array of a sub-program's tape comes from when its sweep runs later: the
    sub-program's own inputs ("in"), values it computed (its residuals, "res": stacked per
    step by a scan), or constants from outside ("fixed"). Static, so it lives in params."""

    def __init__(self, treedef: Any, where: tuple, out_slots: tuple) -> None:
        self.treedef, self.where, self.out_slots = treedef, where, out_slots

    @classmethod
    def of(cls, tape: Tape, inner_trace: Any, inputs: Sequence[Any]
           ) -> tuple[_Layout, list, list]:
        """Split ``tape``'s arrays: (layout, residuals, fixed). Arrays of ``inner_trace`` (the
        sub-program's trace) are residuals, one copy each; ``inputs`` are referenced."""
        leaves, treedef = tree_flatten(tape)
        own = {id(x): j for j, x in enumerate(inputs)}
        residuals: list = []
        fixed: list = []
        where, seen = [], {}
        for leaf in leaves:
            if id(leaf) in own:
                where.append(("in", own[id(leaf)]))
            elif isinstance(leaf, _jax.Tracer) and leaf._trace is inner_trace:
                if id(leaf) not in seen:
                    seen[id(leaf)] = len(residuals)
                    residuals.append(leaf)
                where.append(("res", seen[id(leaf)]))
            else:
                where.append(("fixed", len(fixed)))
                fixed.append(leaf)
        return cls(treedef, tuple(where), tape.out_slots), residuals, fixed

    def rebuild(self, inputs: Sequence[Any], residuals: Sequence[Any], fixed: Sequence[Any]
                ) -> Tape:
        """The tape again, from the arrays available where its sweep runs."""
        source = {"in": inputs, "res": residuals, "fixed": fixed}
        return tree_unflatten(self.treedef, [source[kind][k] for kind, k in self.where])


def _ct_for(ct: Cotangent, like: Any, step: bool = False) -> Any:
    """A concrete, non-weak cotangent with ``like``'s dtype (zeros for a symbolic zero): loop
    carries and switch branches need one fixed type. ``step``: ``like`` is a stacked xs and
    the cotangent is for one step's slice. Inside a ``shard_map`` body it also varies over
    the mesh axes ``like`` varies over (a carry's type includes them)."""
    aval = _jax.aval_of(like)
    if step:
        aval = aval.update(shape=aval.shape[1:])
    if ct is None:
        ct = jnp.zeros(aval.shape, aval.dtype, out_sharding=sharding_of(aval))
    else:
        ct = lax.convert_element_type(convert_like(ct, aval.dtype), aval.dtype)
    return _jax.pvary(ct, tuple(_jax.varying_axes(like)))


def _depends(jaxpr: Any, flags: Sequence[bool]) -> list[bool]:
    """Which outputs of ``jaxpr`` (may) depend on the inputs flagged True; only floating-point
    values carry the dependence (conservative: any flagged input taints all eqn outputs)."""
    tainted = {v for v, f in zip(jaxpr.invars, flags) if f}
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, _xcore.Literal) and v in tainted for v in eqn.invars):
            tainted.update(v for v in eqn.outvars if is_differentiable(v.aval))
    return [not isinstance(v, _xcore.Literal) and v in tainted for v in jaxpr.outvars]


# -- scan -----------------------------------------------------------------------------------
@handler("scan")
def scan(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any], params: dict) -> Any:
    """scan(consts ‖ carry ‖ xs) -> carry ‖ ys: stack per-step tapes, sweep them in reverse."""
    closed, n_c, n_k = params["jaxpr"], params["num_consts"], params["num_carry"]
    if isinstance(trace, LinearTrace):  # a custom JVP rule scanning its tangents
        return _unrolled_scan(trace, closed, tracers, params)
    if _budgeted(params["length"]):  # jaxprop.checkpoints(C, scans=True): keep C carries
        from jaxprop.rules.loops import checkpointed_scan
        values, slots = zip(*map(trace.unwrap, tracers))
        return checkpointed_scan(trace, primitive, values, slots, params, budget().scans)
    hoisted = _hoist_invariants(trace, closed, tracers[:n_c])
    if hoisted is not None:  # loop-invariant work runs (and is recorded) once, outside
        body, invariants = hoisted
        return scan(trace, primitive, [*invariants, *tracers],
                    dict(params, jaxpr=body, num_consts=len(invariants) + n_c))
    values, slots = zip(*map(trace.unwrap, tracers))
    diff = tuple(_scan_diff(closed.jaxpr, slots, n_c, n_k))
    compiled = _compiled_forward(trace, values, diff, params)
    if compiled is not None:  # eagerly: one cached program per body structure
        try:
            carry, ys, stacked, fixed_arrays = compiled(values)
        except Exception:  # noqa: BLE001 - a body it cannot stage: run it uncompiled
            _FORWARDS[compiled.key] = compiled = None
    if compiled is not None:
        fixed, closed = compiled.static, compiled.closed
    else:
        with (_jax.set_current_trace(trace.parent), recording_body_of(trace),
              sub_collector() as tags):
            fixed, (carry, ys, stacked, fixed_arrays) = _scan_forward(
                closed, values, diff, params,
                prune=not any(isinstance(v, _jax.Tracer) for v in values))
        _note_stacked(tags, params["length"])
    info = dict(params, jaxpr=closed, diff=diff, layout=fixed["layout"], dead=fixed["dead"])
    return trace.record(primitive, info, values, slots, [*carry, *ys], _scan_rule,
                        residuals=(stacked, fixed_arrays))


def _budgeted(length: int) -> bool:
    """Whether a scan of ``length`` steps exceeds the carries a scan budget allows."""
    return budget().scans is not None and length > budget().scans
def _note_stacked(tags: TagCollector | None, length: int) -> None:
    """Tell the enclosing collector about the tags of a scan body: stacked per step."""
    for key, (treedef, count, aval) in (tags.notes.items() if tags is not None else ()):
        stacked = None if aval is None else aval.update(shape=(length, *aval.shape))
        COLLECTORS[-1].note(key, treedef, count, stacked)


def _scan_forward(closed: Any, values: Sequence[Any], diff: tuple, params: dict, prune: bool
                  ) -> tuple[dict, tuple]:
    """The forward scan, each step on its own tape: (static layout info, (carry, ys, stacked
    residuals, arrays the steps' tapes share)). ``prune``: do not stack residuals that no rule
    reads (under an outer jit, XLA's DCE removes them anyway)."""
    n_c, n_k = params["num_consts"], params["num_carry"]
    consts = values[:n_c]
    captured: dict = {}

    def step(carry: list, xs: list) -> tuple:
        """One step on its own tape; per-step arrays are stacked, the rest kept once."""
        step_trace = _jax.get_current_trace()
        outs, tape = _traced_vjp(closed, [*consts, *carry, *xs], diff)
        layout, residuals, fixed = _Layout.of(tape, step_trace, xs)  # xs: read, not stacked
        live = (_live_residuals(layout, residuals, xs, fixed, outs) if prune
                else [True] * len(residuals))
        captured.update(layout=layout, fixed=fixed, dead=tuple(
            None if keep else _jax.aval_of(r) for r, keep in zip(residuals, live)))
        return outs[:n_k], (outs[n_k:], [r for r, keep in zip(residuals, live) if keep])

    carry, (ys, stacked) = lax.scan(step, list(values[n_c:n_c + n_k]),
                                    list(values[n_c + n_k:]), length=params["length"],
                                    reverse=params["reverse"], unroll=params["unroll"])
    fixed = captured.pop("fixed")
    return captured, (carry, ys, stacked, fixed)


class _CompiledForward:
    """An eager scan's forward as one jitted program, traced once per body structure (JAX's
    eager scan retraces and recompiles a body defined inside the loss on every call)."""

    def __init__(self, key: Any, closed: Any, diff: tuple, params: dict) -> None:
        self.key, self.closed, self.static = key, closed, None

        def forward(values: list) -> tuple:
            self.static, arrays = _scan_forward(closed, values, diff, params, prune=True)
            return arrays

        self._fn = jax.jit(forward)

    def __call__(self, values: Sequence[Any]) -> tuple:
        return self._fn(list(values))


_FORWARDS: dict[Any, _CompiledForward | None] = {}


def _compiled_forward(trace: JaxpropTrace, values: Sequence[Any], diff: tuple, params: dict
                      ) -> _CompiledForward | None:
    """The cached compiled forward for this scan when recording eagerly, else None."""
    if (type(trace) is not JaxpropTrace or not _jax.is_eager(trace.parent) or OVERRIDES
            or SWEEP_CHECKS or has_marker(params["jaxpr"].jaxpr)
            or any(isinstance(v, _jax.Tracer) for v in values)):
        return None  # (the cached layout holds the rules: an override, a tag must not stick)
    body = _jax.jaxpr_key(params["jaxpr"])
    if body is None:
        return None
    static = tuple((k, v) for k, v in params.items() if k != "jaxpr")
    key = (body, diff, static, tuple(_jax.aval_of(v) for v in values))
    if key not in _FORWARDS:
        if len(_FORWARDS) > 256:
            _FORWARDS.clear()
        _FORWARDS[key] = _CompiledForward(key, params["jaxpr"], diff, params)
    return _FORWARDS[key]


def _unrolled_scan(trace: LinearTrace, closed: Any, tracers: Sequence[Any], params: dict
                   ) -> list[Any]:
    """A linear map given by a scan is recorded step by step (tangents have no values to
    stack): slice xs, run the body, stack ys."""
    n_c, n_k, length = params["num_consts"], params["num_carry"], params["length"]
    consts, carry, xs = tracers[:n_c], list(tracers[n_c:n_c + n_k]), tracers[n_c + n_k:]
    steps: list = [None] * length
    for t in (reversed(range(length)) if params["reverse"] else range(length)):
        with _jax.set_current_trace(trace):
            x_t = [lax.index_in_dim(x, t, keepdims=False) for x in xs]
        outs = eval_on(trace, closed, [*consts, *carry, *x_t])
        carry, steps[t] = outs[:n_k], outs[n_k:]
    with _jax.set_current_trace(trace):
        ys = [jnp.stack([s[j] for s in steps]) if length else jnp.zeros((0, *a.shape), a.dtype)
              for j, a in enumerate(closed.out_avals[n_k:])]
    return [*carry, *ys]


def _live_residuals(layout: _Layout, residuals: list, xs: list, fixed: list, outs: list
                    ) -> list[bool]:
    """Which of one step's residuals the step's backward sweep reads (all cotangents given)."""
    def sweep(residuals: list, xs: list, cts: list) -> list:
        tape = layout.rebuild(xs, residuals, fixed)
        return [ct for ct in backward(tape.nodes, tape.out_slots, cts, tape.in_slots)
                if ct is not None]

    spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), _jax.aval_of(x).dtype)
    cts = [spec(o) if s is not None else None for o, s in zip(outs, layout.out_slots)]
    jaxpr = jax.make_jaxpr(sweep)(list(map(spec, residuals)), list(map(spec, xs)), cts).jaxpr
    return inputs_reaching(jaxpr, [True] * len(jaxpr.outvars), effects=True)[:len(residuals)]


def _hoist_invariants(trace: JaxpropTrace, closed: Any, consts: Sequence[Any]
                      ) -> tuple[Any, list] | None:
    """Split off the body's equations that read only consts (``W.T``, casts of parameters):
    evaluate them once on ``trace`` and return (the rest of the body, taking their results as
    extra leading consts, those results). None if there is nothing to hoist."""
    jaxpr = closed.jaxpr
    invariant = set(jaxpr.constvars) | set(jaxpr.invars[:len(consts)])
    hoist, rest = [], []
    for eqn in jaxpr.eqns:
        if not eqn.effects and all(isinstance(v, _xcore.Literal) or v in invariant
                                   for v in eqn.invars):
            hoist.append(eqn)
            invariant.update(eqn.outvars)
        else:
            rest.append(eqn)
    if not hoist:
        return None
    produced = {v for eqn in hoist for v in eqn.outvars}
    read = [v for eqn in rest for v in eqn.invars] + list(jaxpr.outvars)
    needed = list(dict.fromkeys(v for v in read
                                if not isinstance(v, _xcore.Literal) and v in produced))
    pre = _jax.ClosedJaxpr(jaxpr.replace(invars=jaxpr.invars[:len(consts)], outvars=needed,
                                         eqns=hoist), closed.consts)
    body = _jax.ClosedJaxpr(jaxpr.replace(invars=[*needed, *jaxpr.invars], eqns=rest),
                            closed.consts)
    return body, eval_on(trace, pre, consts)


def _scan_diff(jaxpr: Any, slots: Sequence[Any], n_c: int, n_k: int) -> list[bool]:
    """Differentiated body inputs: given consts and xs, and carries by fixpoint (a carry that
    starts constant becomes differentiated once the body makes it depend on one)."""
    diff = [s is not None and is_differentiable(v.aval) for s, v in zip(slots, jaxpr.invars)]
    while True:
        carry_out = _depends(jaxpr, diff)[:n_k]
        new = [d or o for d, o in zip(diff[n_c:n_c + n_k], carry_out)]
        if new == diff[n_c:n_c + n_k]:
            return diff
        diff[n_c:n_c + n_k] = new


def _scan_reached(jaxpr: Any, carry_ct: list[bool], ys_ct: Sequence[int], n_c: int, n_k: int
                  ) -> list[bool]:
    """Which body inputs a nonzero cotangent can reach, over any number of steps: carries by
    fixpoint. The others keep a symbolic zero (as JAX's), so a zero never meets an infinite
    derivative (sqrt at 0) of whatever produced them."""
    ys = set(ys_ct)
    wanted = carry_ct + [j in ys for j in range(len(jaxpr.outvars) - n_k)]
    while True:
        reached = inputs_reaching(jaxpr, wanted)
        carry = [w or r for w, r in zip(wanted[:n_k], reached[n_c:n_c + n_k])]
        if carry == wanted[:n_k]:
            return reached
        wanted[:n_k] = carry


def _scan_rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """Reverse scan of the body's VJP: ct_carry flows back step by step, Σ_t ct_consts(t),
    ct_xs[t] as ys."""
    p = node.params
    n_c, n_k, diff = p["num_consts"], p["num_carry"], p["diff"]
    values = node.inputs
    stacked, fixed = node.residuals
    layout: _Layout = p["layout"]
    ys_ct = [j for j in range(len(cts) - n_k) if cts[n_k + j] is not None
             and layout.out_slots[n_k + j] is not None]
    reached = _scan_reached(p["jaxpr"].jaxpr, [ct is not None for ct in cts[:n_k]], ys_ct,
                            n_c, n_k)
    # carries whose cotangent the reverse loop carries: given from outside or passed back by
    # the body; only those the body reads (reached) send one on to the carry's initial value
    carry_d = [i for i in range(n_c, n_c + n_k)
               if diff[i] and (reached[i] or cts[i - n_c] is not None)]
    const_d = [i for i in range(n_c) if diff[i] and reached[i] and node.in_slots[i] is not None]
    xs_d = [i for i in range(n_c + n_k, len(values))
            if diff[i] and reached[i] and node.in_slots[i] is not None]
    position = {i: k for k, i in enumerate(i for i in range(len(values)) if diff[i])}

    def step(carry: tuple, x: tuple) -> tuple:
        ct_carry, acc = carry
        live_t, xs_t, ct_ys = x
        live = iter(live_t)  # arrays no rule reads were not stored: zeros stand in for them
        residuals_t = [next(live) if aval is None
                       else jnp.zeros(aval.shape, aval.dtype, out_sharding=sharding_of(aval))
                       for aval in p["dead"]]
        tape = layout.rebuild(xs_t, residuals_t, fixed)
        out_cts: list = [None] * len(cts)
        for i, ct in zip(carry_d, ct_carry):
            out_cts[i - n_c] = ct
        for j, ct in zip(ys_ct, ct_ys):
            out_cts[n_k + j] = ct
        with sub_collector() as tags:  # the body's tags: one cotangent per step
            in_cts = backward(tape.nodes, tape.out_slots, out_cts, tape.in_slots)
        new_carry = [_ct_for(in_cts[position[i]], values[i]) for i in carry_d]
        new_acc = [a + _ct_for(in_cts[position[i]], values[i]) for a, i in zip(acc, const_d)]
        ct_xs = [_ct_for(in_cts[position[i]], values[i], step=True) for i in xs_d]
        return (new_carry, new_acc), (ct_xs, dict(tags.cts) if tags is not None else {})

    init = ([_ct_for(cts[i - n_c], values[i]) for i in carry_d],
            [_ct_for(None, values[i]) for i in const_d])
    (ct_init, ct_consts), (ct_xs, tag_cts) = lax.scan(
        step, init, (list(stacked), list(values[n_c + n_k:]), [cts[n_k + j] for j in ys_ct]),
        length=p["length"],
        reverse=not p["reverse"], unroll=p["unroll"])
    for key, ct in tag_cts.items():  # stacked per step, aligned with the forward's steps
        COLLECTORS[-1].add(key, ct)
    out: list[Cotangent] = [None] * len(values)
    for i, ct in zip(const_d, ct_consts):
        out[i] = ct
    for i, ct in zip(carry_d, ct_init):
        out[i] = ct if reached[i] and node.in_slots[i] is not None else None
    for i, ct in zip(xs_d, ct_xs):
        out[i] = ct
    return out


# -- cond / switch ----------------------------------------------------------------------------
@handler("cond")
def cond(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any], params: dict) -> Any:
    """cond(index, *ops): record the taken branch inline when the index is concrete; else a
    switch that saves the taken branch's residuals, one node whose backward switches over
    the branches' sweeps."""
    branches = params["branches"]
    values, slots = zip(*map(trace.unwrap, tracers))
    index = _jax.to_concrete_value(values[0])
    if index is not None:
        taken = branches[min(max(int(index), 0), len(branches) - 1)]
        return eval_on(trace, taken, tracers[1:])
    if isinstance(trace, LinearTrace):  # a custom JVP rule branching on its tangents
        outs = [eval_on(trace, b, tracers[1:]) for b in branches]
        with _jax.set_current_trace(trace):
            which = lax.clamp(0, values[0], len(branches) - 1)
            return [lax.select_n(which, *cases) for cases in zip(*outs)]
    ops, diff = list(values[1:]), tuple(s is not None for s in slots[1:])

    def run(closed: Any, ops: Sequence[Any]) -> tuple:
        """The branch on its own tape: (outputs, layout, residuals, fixed)."""
        inner = _jax.get_current_trace()
        outs, tape = _traced_vjp(closed, ops, diff)
        return (outs, *_Layout.of(tape, inner, ops))

    # Every branch returns every branch's residuals (zeros for the others'), as switch needs
    # one output type: first their shapes, then the switch itself.
    with recording_body_of(trace):
        shapes = [jax.eval_shape(lambda *ops, b=b: run(b, ops)[2], *ops) for b in branches]
    starts = np.cumsum([0] + [len(r) for r in shapes]).tolist()
    layouts, fixed = [None] * len(branches), [None] * len(branches)

    def branch(i: int) -> Callable:
        def taken(ops: list) -> tuple:
            outs, layouts[i], residuals, fixed[i] = run(branches[i], ops)
            zeros = [[jnp.zeros(a.shape, a.dtype, out_sharding=sharding_of(a)) for a in rs]
                     for rs in shapes]
            return outs, [a for rs in zeros[:i] for a in rs] + residuals + \
                [a for rs in zeros[i + 1:] for a in rs]
        return taken

    with _jax.set_current_trace(trace.parent), recording_body_of(trace):
        outs, residuals = lax.switch(values[0], [branch(i) for i in range(len(branches))], ops)
    info = dict(params, diff=diff, layouts=tuple(layouts), starts=tuple(starts))
    return trace.record(primitive, info, values, slots, outs, _cond_rule,
                        residuals=(residuals, fixed))


def _cond_rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """ct_ops = switch(index, [sweep of branch i's saved tape, for each i])(ct)."""
    p, (index, *ops) = node.params, node.inputs
    residuals, fixed = node.residuals
    present = [j for j, ct in enumerate(cts) if ct is not None]
    wanted = [ct is not None for ct in cts]  # ops no branch passes a cotangent to get None
    reached = [any(r) for r in zip(*(inputs_reaching(b.jaxpr, wanted) for b in p["branches"]))]
    diff = [d and r for d, r in zip(p["diff"], reached)]

    def branch_vjp(i: int, tag_types: dict | None) -> Callable:
        def vjp(ops: list, residuals: list, cts_present: list) -> tuple:
            tape = p["layouts"][i].rebuild(ops, residuals[p["starts"][i]:p["starts"][i + 1]],
                                           fixed[i])
            out_cts: list = [None] * len(cts)
            for j, ct in zip(present, cts_present):
                out_cts[j] = ct
            with sub_collector() as tags:  # the branch's tags (zeros for other branches')
                in_cts = backward(tape.nodes, tape.out_slots, out_cts, tape.in_slots)
            got = tags.cts if tags is not None else {}
            if tag_types is not None:
                got = {k: jnp.zeros(t.shape, t.dtype) if got.get(k) is None
                       else lax.convert_element_type(got[k], t.dtype)
                       for k, t in tag_types.items()}
            diff_ops = [o for o, d in zip(ops, p["diff"]) if d]
            return [_ct_for(ct, o) for ct, o, r in zip(in_cts, diff_ops, reaching) if r], got
        return vjp

    reaching = [r for d, r in zip(p["diff"], reached) if d]
    args = (ops, list(residuals), [cts[j] for j in present])
    n = len(p["layouts"])
    tag_types: dict = {}
    if COLLECTORS:  # every branch must return every branch's tags: first their types
        for i in range(n):
            tag_types.update(jax.eval_shape(branch_vjp(i, None), *args)[1])
    in_cts, tag_cts = lax.switch(index, [branch_vjp(i, tag_types) for i in range(n)], *args)
    for key, ct in tag_cts.items():
        COLLECTORS[-1].add(key, ct)
    in_cts = iter(in_cts)
    return [None] + [next(in_cts) if d else None for d in diff]


# -- while ----------------------------------------------------------------------------------
class WhileLoopError(TypeError):
    """Reverse-mode differentiation through a while_loop whose trip count is not known."""


@handler("while")
def while_loop(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any], params: dict
               ) -> Any:
    """while(cond_consts ‖ body_consts ‖ carry): unrolled on the tape, step by step, while the
    predicate is concrete (the trip count is then known, as reverse mode requires)."""
    cj, bj = params["cond_jaxpr"], params["body_jaxpr"]
    n_cc, n_bc = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = tracers[:n_cc], tracers[n_cc:n_cc + n_bc]
    carry = list(tracers[n_cc + n_bc:])
    steps = 0
    while True:
        pred = eval_on(trace, cj, [*cond_consts, *carry])[0]
        pred = _jax.to_concrete_value(trace.unwrap(pred)[0])
        if pred is None:
            return _traced_while(trace, primitive, [*cond_consts, *body_consts, *carry],
                                 params, n_cc, steps)
        if not pred:
            return carry
        with loop_step(steps):  # tags in the body: one per iteration
            carry = eval_on(trace, bj, [*body_consts, *carry])
        steps += 1


def _traced_while(trace: JaxpropTrace, primitive: Any, tracers: list, params: dict,
                  n_cc: int, steps: int) -> Any:
    """A traced predicate: the loop runs as is if nothing differentiated flows through the
    body, else as one node that keeps at most C carries (:mod:`jaxprop.rules.loops`)."""
    from jaxprop.rules.loops import checkpointed_while
    values, slots = zip(*map(trace.unwrap, tracers))
    if steps == 0 and all(s is None for s in slots[n_cc:]):
        return _jax.bind_on(trace.parent, primitive, values, params)
    if isinstance(trace, LinearTrace):  # a custom JVP rule looping over its tangents
        where = _jax.source_summary(_jax.current_source())
        raise WhileLoopError(
            "jaxprop cannot transpose a lax.while_loop with a traced trip count inside a "
            "custom_jvp rule" + (f" (at {where})" if where else "") + ": give the function "
            "a custom_vjp instead, or bound the loop with lax.scan.")
    return checkpointed_while(trace, primitive, values, slots, params)


# -- remat2 (jax.checkpoint) ------------------------------------------------------------------
@handler("remat2", "checkpoint")
def remat(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any], params: dict) -> Any:
    """jax.checkpoint(f)(x): one node that keeps x, f's outputs and — with a ``policy`` — the
    outputs of the equations the policy calls saveable (``dots_saveable``,
    ``save_only_these_names`` …); the backward recomputes only the rest."""
    if isinstance(trace, LinearTrace):  # a tangent map keeps nothing anyway: inline it
        return eval_on(trace, params["jaxpr"], tracers)
    values, slots = zip(*map(trace.unwrap, tracers))
    if params.get("policy") is None:
        outs = _jax.bind_on(trace.parent, primitive, values, params)
        return trace.record(primitive, params, values, slots, outs, _remat_rule)
    saved: list = []
    with _jax.set_current_trace(trace.parent):
        outs = _eval_saving(params["jaxpr"], values, params["policy"], saved)
    return trace.record(primitive, params, values, slots, outs, _remat_rule,
                        residuals=saved, multiple_results=True)


def _remat_rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """ct_x = vjp(f)(x)(ct), with f's forward recomputed here from the saved inputs (and the
    saved outputs of the equations the policy kept, which are not recomputed)."""
    values = list(node.inputs)
    if node.params.get("prevent_cse", True) and values:
        values = list(lax.optimization_barrier(tuple(values)))  # XLA must not reuse the forward
    diff = [s is not None for s in node.in_slots]
    policy = node.params.get("policy")

    def recompute_and_sweep(values: list, saved: list, cts: list) -> list:
        replay = iter(saved)
        _, tape = _traced_vjp(node.params["jaxpr"], values, diff, None if policy is None else
                              lambda closed, args: _eval_saving(closed, args, policy, replay))
        return backward(tape.nodes, tape.out_slots, cts, tape.in_slots)

    args = (values, list(node.residuals), list(cts))
    try:  # recompute only what the rules read (what jax.grad recomputes)
        in_cts = _jax.eval_without_dead_code(recompute_and_sweep, *args)
    except (_jax.ConcretizationError, WhileLoopError):  # values needed: recompute it all
        in_cts = recompute_and_sweep(*args)
    in_cts = iter(in_cts)
    return [next(in_cts) if d else None for d in diff]


def _eval_saving(closed: Any, args: Sequence[Any], policy: Callable, saved: Any) -> list[Any]:
    """Evaluate ``closed`` equation by equation on the current trace (inlining nested jit
    calls). Forward (``saved`` a list): append the outputs of each equation ``policy`` saves.
    Backward (``saved`` an iterator over that list): those equations are not recomputed —
    their saved outputs are used, and recorded on the tape as the equations' outputs, so their
    rules still run."""
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
    env: dict = {}
    read = lambda v: v.val if isinstance(v, _xcore.Literal) else env[v]  # noqa: E731
    for v, x in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args]):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive.name in ("jit", "pjit", "closed_call"):
            outs = _eval_saving(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")), ins,
                                policy, saved)
        elif eqn.primitive.name in ("scan", "cond"):
            outs = _saved_loop_or_branch(eqn, ins, policy, saved)
        elif _saveable(policy, eqn):
            outs = _saved_outputs(eqn, ins, saved)
        else:
            outs = _bind_eqn(eqn, ins)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return typed_outputs(jaxpr, [read(v) for v in jaxpr.outvars])


def _bind_eqn(eqn: Any, ins: Sequence[Any]) -> list[Any]:
    """Apply one equation's primitive to ``ins`` on the current trace: its list of outputs."""
    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _saveable(policy: Callable, eqn: Any) -> bool:
    """Whether ``policy`` keeps this equation's outputs (JAX's answers: a bool, Saveable,
    Offloadable — kept on device here — or Recompute)."""
    if eqn.primitive.name in HANDLERS or eqn.primitive.name.startswith("custom_"):
        return False  # sub-programs (while, custom rules …) are recomputed
    decision = policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)
    if isinstance(decision, bool):
        return decision
    return type(decision).__name__ in ("SaveableType", "Offloadable")


def _saved_outputs(eqn: Any, ins: list, saved: Any) -> list[Any]:
    """Forward: compute and keep the outputs. Backward: take them from the forward, and record
    the equation on the current jaxprop trace with those outputs (so its rule runs)."""
    if isinstance(saved, list):
        outs = _bind_eqn(eqn, ins)
        saved.extend(outs)
        return outs
    kept = [next(saved) for _ in eqn.outvars]
    on = _differentiating(ins)
    if on is None:
        return kept
    trace, values, slots = on
    outs = trace.record_applied(eqn.primitive, eqn.params, values, slots,
                                kept if eqn.primitive.multiple_results else kept[0])
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _differentiating(ins: Sequence[Any]) -> tuple | None:
    """(trace, values, slots) when the current trace is a jaxprop trace to which some of
    ``ins`` belong (a backward replay records there); else None."""
    trace = _jax.get_current_trace()
    if not isinstance(trace, JaxpropTrace):
        return None
    values, slots = zip(*map(trace.unwrap, ins)) if ins else ((), ())
    return None if all(s is None for s in slots) else (trace, values, slots)


def _saved_loop_or_branch(eqn: Any, ins: list, policy: Callable, saved: Any) -> list[Any]:
    """A scan or cond under a checkpoint policy, as jax.grad treats it: the policy applies
    inside the body. Forward: the eqn with its body (branches) checkpointed by ``policy`` runs
    on a tape of its own; its outputs and that tape (holding per step only the body's inputs
    and what the policy saves) are kept. Backward: nothing is recomputed here; a node on the
    current trace sweeps the kept tape, whose steps recompute the rest."""
    if not isinstance(saved, list):
        kept = [next(saved) for _ in eqn.outvars]
        tape = next(saved)
        on = _differentiating(ins)
        if on is None:
            return kept
        trace, values, slots = on
        return trace.record(eqn.primitive, {}, values, slots, kept, _sweep_kept_tape,
                            residuals=tape, multiple_results=True)
    params = dict(eqn.params)
    if "branches" in params:
        params["branches"] = tuple(_checkpointed(b, policy) for b in params["branches"])
    else:
        params["jaxpr"] = _checkpointed(params["jaxpr"], policy)
    diff = [is_differentiable(_jax.aval_of(x)) for x in ins]
    bind = lambda _, args: _jax.bind_on(_jax.get_current_trace(), eqn.primitive, args, params)
    outs, tape = _traced_vjp(None, ins, diff, bind)
    in_slots = iter(tape.in_slots)
    tape = Tape(tape.nodes, [next(in_slots) if d else None for d in diff], tape.out_slots)
    saved.extend(outs)
    saved.append(tape)
    return outs


def _checkpointed(closed: Any, policy: Callable) -> Any:
    """``closed`` as one ``jax.checkpoint(·, policy=policy)`` call."""
    fun = jax.checkpoint(_jax.jaxpr_as_fun(closed), policy=policy)
    return jax.make_jaxpr(lambda *args: fun(*args))(*closed.in_avals)


def _sweep_kept_tape(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """ct_in = the kept tape swept back from ct_out."""
    tape: Tape = node.residuals
    return backward(tape.nodes, tape.out_slots, list(cts), tape.in_slots)


# -- pass-through ---------------------------------------------------------------------------
@noderule("optimization_barrier")
@noderule("device_put")
def _pass_through(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """optimization_barrier(*xs) = xs, device_put(*xs) = xs (moved): each ct passes through."""
    return [ct if s is not None else None for ct, s in zip(cts, node.in_slots)]


defvjp("name", lambda ct, out, x, **_: ct)            # checkpoint_name(x) = x: identity
handler("pjit")(inline_call)                            # older name of nested jit


@handler("pure_callback", "io_callback", "custom_lin")
def no_derivative(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any], params: dict
                  ) -> Any:
    """Host callbacks are opaque: there is no derivative to take."""
    where = _jax.source_summary(_jax.current_source())
    raise NotImplementedError(
        f"jaxprop cannot differentiate through '{primitive.name}'"
        + (f" (at {where})" if where else "") + ": the callback is opaque Python code with no "
        "derivative. Wrap the call in jax.custom_vjp (or jax.custom_jvp) with your own rule, "
        f"or register one: jaxprop.register('{primitive.name}', rule).")
