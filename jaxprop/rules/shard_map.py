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
    inputs = [v.val if isinstance(v, _jax_literal()) else env[v] for v in eqn.invars]
    outs = shard_map_node(trace, inputs, eqn.params)
    env.update(zip(eqn.outvars, outs))
    flat = [v.val if isinstance(v, _jax_literal()) else env[v] for v in closed.jaxpr.outvars]
    return pack(flat)


def _jax_literal() -> type:
    from jax.extend.core import Literal
    return Literal


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
    forward = _forward(values, diff, p)
    outs, residuals, static = forward(trace.parent, values)
    info = dict(p, diff=diff, layout=static["layout"], res_specs=static["res_specs"])
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
def _forward(values: Sequence[Any], diff: tuple, p: dict) -> Callable:
    """``forward(trace, values) -> (outputs, residuals, static)``, compiled and cached when
    ``trace`` is eager."""
    def run(trace: Any, values: Sequence[Any]) -> tuple:
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

    return run


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

    given = []
    for j, spec in zip(present, out_ct_specs):
        ct = cts[j]
        if not check_vma:  # JAX: an out ct is split among the devices its spec replicates over
            n = _unmentioned_size(mesh, spec, manual)
            ct = ct / n if n != 1 else ct
        given.append(ct)

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
        in_cts = backward(tape.nodes, tape.out_slots, out_cts, tape.in_slots)
        by_input = dict(zip(diff_positions, in_cts))
        result = []
        for i, spec in zip(wants, in_ct_specs):
            ct = by_input[i]
            aval = body_avals[i]
            ct = jnp.zeros(aval.shape, aval.dtype) if ct is None else ct.astype(aval.dtype)
            if check_vma:
                ct = _jax.pvary(ct, tuple(_jax.spec_axes(spec)))
            else:  # JAX: sum over the devices the input's spec replicates over
                axes = _unmentioned(mesh, spec, manual)
                ct = lax.psum(ct, axes) if axes else ct
            result.append(ct)
        return result, in_ct_specs

    args = [*given, *residuals, *(node.inputs[i] for i in read)]
    specs = [*out_ct_specs, *p["res_specs"], *(p["in_specs"][i] for i in read)]
    in_cts = _jax.bind_shard_map(_jax.get_current_trace(), args, per_device,
                                 **_map_params(p, specs))
    out: list[Cotangent] = [None] * len(node.inputs)
    for i, ct in zip(wants, in_cts):
        out[i] = ct
    return out


def _unmentioned(mesh: Any, spec: Any, manual: Any) -> tuple:
    """The manual mesh axes a PartitionSpec does not shard over (mesh order)."""
    named = _jax.spec_axes(spec)
    return tuple(n for n in mesh.axis_names if n in manual and n not in named)


def _unmentioned_size(mesh: Any, spec: Any, manual: Any) -> int:
    return math.prod(mesh.shape[n] for n in _unmentioned(mesh, spec, manual))
