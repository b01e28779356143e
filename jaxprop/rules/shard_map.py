"""``jax.shard_map`` (and ``jax.pmap``, which is ``jit(shard_map(check_vma=False))``).

A shard_map differentiated from outside is **one node** of the tape:

- forward: a shard_map whose per-device body runs the user's body on a jaxprop tape and also
  returns the tape's residuals — each per-device array with a leading axis of size 1, sharded
  over the mesh axes it varies over (all manual axes when ``check_vma=False``);
- backward: a shard_map over (the outputs' non-zero cotangents, with the outputs' specs; the
  residuals, with theirs; the inputs the rules read, with their in_specs) whose body rebuilds
  the tape and sweeps it; its out_specs are the wanted inputs' in_specs.

As in JAX's own transpose (``shard_map.py``, ``_shard_map_transpose``): with
``check_vma=False`` each output cotangent is first divided by the size of the manual mesh
axes its out_spec does not mention, and each input cotangent is ``psum``-med over the axes
its in_spec does not mention. With ``check_vma=True`` neither: the body's own ``pvary`` and
``psum_invariant`` equations carry those sums (see :mod:`jaxprop.rules.collectives`).

A gradient taken *inside* the body needs nothing here: the body's collectives have rules.

Eagerly the forward and backward shard_maps each run as one compiled program (JAX's eager
shard_map dispatches op by op), cached per body structure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Literal

from jaxprop import _jax
from jaxprop.registry import Cotangent, Node
from jaxprop.rules.control import _Layout, _traced_vjp
from jaxprop.rules.custom import eval_on
from jaxprop.sweep import backward
from jaxprop.tracer import JaxpropTrace, LinearTrace, is_differentiable

__all__ = ["shard_map_call"]


def shard_map_call(trace: JaxpropTrace, primitive: Any, fun: Callable, args: Sequence[Any],
                   params: dict) -> Any:
    """``trace.process_shard_map``: trace the call to its equation (closed-over values become
    inputs, as in a jaxpr), then record it as one node if anything it reads is differentiated.
    Returns what ``shard_map_p.bind`` returns (a FlatTree of the global outputs)."""
    closed, pack = _jax.shard_map_call_jaxpr(fun, args, params)
    (eqn,) = closed.jaxpr.eqns
    env = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    env.update(zip(eqn.outvars, shard_map_node(trace, [read(v) for v in eqn.invars],
                                               eqn.params)))
    return pack([read(v) for v in closed.jaxpr.outvars])


def shard_map_node(trace: JaxpropTrace, tracers: Sequence[Any], p: dict) -> list[Any]:
    """Apply the shard_map equation with params ``p`` to ``tracers``: bound on the parent as
    is when nothing differentiated flows in, else one node (see the module docstring)."""
    values, slots = zip(*map(trace.unwrap, tracers)) if tracers else ((), ())
    body = p["jaxpr"]
    diff = tuple(s is not None and is_differentiable(v.aval)
                 for s, v in zip(slots, body.invars))
    if not any(diff):
        return _bind_plain(trace.parent, values, p)
    if isinstance(trace, LinearTrace):
        raise NotImplementedError(
            "jaxprop cannot record a shard_map applied to the tangents of a custom_jvp rule; "
            "use jax.custom_vjp for a rule that contains a shard_map.")
    key = _structure_key(values, diff, p) if _jax.is_eager(trace.parent) else None
    if key is None:
        outs, residuals, static = _forward(trace.parent, values, diff, p)
    else:  # eagerly: one compiled program (JAX's eager shard_map runs op by op)
        outs, residuals, static = _compiled(key, lambda: _CompiledForward(diff, p))(values)
    info = dict(p, diff=diff, key=key, layout=static["layout"], res_specs=static["res_specs"])
    return trace.record(_jax.SHARD_MAP, info, values, slots, outs, _shard_map_rule,
                        residuals=(residuals, static["fixed"]), multiple_results=True)


def _bind_plain(trace: Any, values: Sequence[Any], p: dict) -> list[Any]:
    """The shard_map equation itself, on ``trace``."""
    body = p["jaxpr"]

    def run(*xs: Any) -> tuple:
        return eval_on(_jax.get_current_trace(), body, xs), p["out_specs"]

    return _jax.bind_shard_map(trace, values, run, **_map_params(p, p["in_specs"]))


def _map_params(p: dict, in_specs: Sequence[Any]) -> dict:
    return dict(mesh=p["mesh"], in_specs=tuple(in_specs), check_vma=p["check_vma"],
                newly_manual_axes=p["newly_manual_axes"])


# -- forward ------------------------------------------------------------------------------
def _forward(trace: Any, values: Sequence[Any], diff: tuple, p: dict) -> tuple:
    """The forward shard_map on ``trace``: (outputs, residuals, static), where static holds
    the tape's layout, its fixed arrays and the residuals' PartitionSpecs."""
    static: dict = {}

    def per_device(*xs: Any) -> tuple:
        body_trace = _jax.get_current_trace()
        outs, tape = _traced_vjp(p["jaxpr"], xs, diff)
        layout, residuals, fixed = _Layout.of(tape, body_trace, xs)
        specs = [_jax.residual_spec(r, p["mesh"], p["check_vma"], p["newly_manual_axes"])
                 for r in residuals]
        static.update(layout=layout, fixed=fixed, res_specs=tuple(specs))
        return ([*outs, *(lax.expand_dims(r, (0,)) for r in residuals)],
                [*p["out_specs"], *specs])

    flat = _jax.bind_shard_map(trace, values, per_device, **_map_params(p, p["in_specs"]))
    n = len(p["out_specs"])
    return flat[:n], flat[n:], static


class _CompiledForward:
    """:func:`_forward` as one jitted program; ``static`` is filled when it is traced."""

    def __init__(self, diff: tuple, p: dict) -> None:
        self.static: dict = {}

        def run(values: list) -> tuple:
            outs, residuals, self.static = _forward(_jax.get_current_trace(), values, diff, p)
            return outs, residuals

        self._fn = jax.jit(run)

    def __call__(self, values: Sequence[Any]) -> tuple:
        outs, residuals = self._fn(list(values))
        return outs, residuals, self.static


_COMPILED: dict = {}


def _compiled(key: Any, make: Callable[[], Any]) -> Any:
    """The compiled program cached under ``key`` (made by ``make()`` the first time)."""
    fn = _COMPILED.get(key)
    if fn is None:
        if len(_COMPILED) > 256:
            _COMPILED.clear()
        fn = _COMPILED[key] = make()
    return fn


def _structure_key(values: Sequence[Any], diff: tuple, p: dict) -> Any:
    """A hashable key for this call's programs (body, params, types), or None."""
    body = _jax.jaxpr_key(p["jaxpr"])
    if body is None:
        return None
    static = tuple((k, v) for k, v in p.items() if k != "jaxpr")
    try:
        key = (body, static, diff, tuple(_jax.aval_of(v) for v in values))
        hash(key)
    except TypeError:
        return None
    return key


# -- backward -----------------------------------------------------------------------------
def _shard_map_rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """shard_map(f): ct_in = shard_map(sweep of f's tape)(ct_out, residuals, inputs read)."""
    p = node.params
    residuals, fixed = node.residuals
    layout: _Layout = p["layout"]
    mesh, check_vma, manual = p["mesh"], p["check_vma"], p["newly_manual_axes"]
    present = [j for j, ct in enumerate(cts) if ct is not None and layout.out_slots[j] is not None]
    wants = [i for i, s in enumerate(node.in_slots) if s is not None and p["diff"][i]]
    read = sorted({k for kind, k in layout.where if kind == "in"})
    diff_positions = [i for i, d in enumerate(p["diff"]) if d]
    body_avals = [v.aval for v in p["jaxpr"].invars]
    out_ct_specs = [_jax.ct_spec(p["out_specs"][j]) for j in present]
    in_ct_specs = [_jax.ct_spec(p["in_specs"][i]) for i in wants]

    def per_device(*xs: Any) -> tuple:
        ct_out, res, ins = (xs[:len(present)], xs[len(present):len(present) + len(residuals)],
                            xs[len(present) + len(residuals):])
        full_ins: list = [None] * len(body_avals)
        for i, x in zip(read, ins):
            full_ins[i] = x
        tape = layout.rebuild(full_ins, [lax.squeeze(r, (0,)) for r in res], fixed)
        out_cts: list = [None] * len(cts)
        for j, ct in zip(present, ct_out):
            out_cts[j] = ct
        in_cts = dict(zip(diff_positions,
                          backward(tape.nodes, tape.out_slots, out_cts, tape.in_slots)))
        return [_input_ct(in_cts[i], body_avals[i], spec, p)
                for i, spec in zip(wants, in_ct_specs)], in_ct_specs

    def run(given: list, residuals: list, inputs: list) -> list:
        if not check_vma:  # JAX: an out ct is split among the devices its spec replicates over
            given = [_divide(ct, _unmentioned_size(mesh, spec, manual))
                     for ct, spec in zip(given, out_ct_specs)]
        specs = [*out_ct_specs, *p["res_specs"], *(p["in_specs"][i] for i in read)]
        return _jax.bind_shard_map(_jax.get_current_trace(), [*given, *residuals, *inputs],
                                   per_device, **_map_params(p, specs))

    args = ([cts[j] for j in present], list(residuals), [node.inputs[i] for i in read])
    if p["key"] is not None and _jax.is_eager(_jax.get_current_trace()):
        run = _compiled((p["key"], tuple(present), tuple(wants)), lambda: jax.jit(run))
    in_cts = run(*args)
    out: list[Cotangent] = [None] * len(node.inputs)
    for i, ct in zip(wants, in_cts):
        out[i] = ct
    return out


def _input_ct(ct: Cotangent, aval: Any, spec: Any, p: dict) -> Any:
    """A body input's cotangent as the backward shard_map returns it: zeros for a symbolic
    zero; varying over the axes its spec shards over (check_vma=True), or, as JAX does,
    summed over the manual axes its spec does not mention (check_vma=False)."""
    ct = jnp.zeros(aval.shape, aval.dtype) if ct is None else ct.astype(aval.dtype)
    if p["check_vma"]:
        return _jax.pvary(ct, tuple(_jax.spec_axes(spec)))
    axes = _unmentioned(p["mesh"], spec, p["newly_manual_axes"])
    return lax.psum(ct, axes) if axes else ct


def _divide(ct: Any, n: int) -> Any:
    return ct / n if n != 1 else ct


def _unmentioned(mesh: Any, spec: Any, manual: Any) -> tuple:
    """The manual mesh axes a PartitionSpec does not shard over (mesh order)."""
    named = _jax.spec_axes(spec)
    return tuple(n for n in mesh.axis_names if n in manual and n not in named)


def _unmentioned_size(mesh: Any, spec: Any, manual: Any) -> int:
    return math.prod(mesh.shape[n] for n in _unmentioned(mesh, spec, manual))
