"""Sub-programs: nested ``jit`` calls and user-defined derivative rules.

- ``jit`` / ``closed_call`` / ``core_call``: the inner jaxpr is evaluated under the jaxprop
  trace, so its primitives are recorded like any others (under an outer ``jax.jit`` XLA sees
  one program either way). Eagerly a ``jit`` call stays one node: one dispatch forward, and a
  VJP compiled once per inner program (it recomputes the forward it needs, fused by XLA).
- ``custom_jvp_call``: honour the user's JVP. Its tangent output ``t_out = J t_in`` is linear
  in ``t_in``; jaxprop records that linear map on an inner tape without evaluating it (a
  :class:`~jaxprop.tracer.LinearTrace`) and its VJP is the reverse sweep of that tape:
  ``ct_in = Jᵀ ct_out``. (Differentiating ``call_jaxpr`` instead would be
  wrong at relu(0), softplus, xlogy(0, 0) …) Eagerly the forward runs only the function and
  the JVP is linearised when the sweep reaches the node.
- ``custom_vjp_call``: call the user's ``fwd`` (keeping its residuals) and, in the sweep, the
  user's ``bwd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Literal, jaxprs_in_params

from jaxprop import _jax
from jaxprop.registry import OVERRIDES, Cotangent, Node
from jaxprop.rules._util import inputs_reaching
from jaxprop.sweep import SWEEP_CHECKS, backward
from jaxprop.tracer import (WATCHES, JaxpropTrace, LinearTrace, Tape, handler,
                            inlining_forced, run_traced, sharding_of, zeros_like_value)


@handler("jit", "closed_call", "core_call")
def inline_call(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any],
                params: dict) -> list[Any]:
    """jit(f)(x) -> f(x): record the callee's primitives on this tape (or, eagerly, one node
    with a compiled VJP)."""
    closed = params.get("jaxpr", params.get("call_jaxpr"))
    if primitive.name == "jit" and _compile_as_one_node(trace, closed):
        return _compiled_call(trace, primitive, tracers, params)
    return eval_call(trace, closed, tracers, params)


def eval_call(trace: Any, closed: Any, args: Sequence[Any], params: dict) -> list[Any]:
    """A call's body evaluated on ``args``, keeping the call's placement: inputs and outputs
    constrained to its ``in_shardings`` / ``out_shardings`` (``jax.jit(f, in_shardings=…)``).
    The constraints are recorded, so each cotangent gets its value's sharding — as in
    ``jax.grad``, whose transposed call has the primal's shardings the other way round."""
    args = _constrain(trace, args, params.get("in_shardings", ()))
    return _constrain(trace, eval_on(trace, closed, args), params.get("out_shardings", ()))


def _constrain(trace: Any, values: Sequence[Any], shardings: Sequence[Any]) -> list[Any]:
    """``values`` with a sharding constraint where ``shardings`` names one (a value whose
    type already carries an Explicit sharding needs none: JAX checks it at the call)."""
    if not any(isinstance(s, jax.sharding.Sharding) for s in shardings):
        return list(values)
    with _jax.set_current_trace(trace):
        return [jax.lax.with_sharding_constraint(x, s)
                if isinstance(s, jax.sharding.Sharding) and sharding_of(x) is None else x
                for x, s in zip(values, shardings)]


def _compile_as_one_node(trace: JaxpropTrace, closed: Any) -> bool:
    """Eagerly, a jitted call runs as one dispatch and its VJP as one compiled program —
    unless something must be seen per primitive (explain, overrides, tags, hooks, effects)."""
    return (_eager_fast_path(trace) and hasattr(closed, "consts")
            and not _jax.has_effects(closed) and not has_marker(closed.jaxpr))


def _eager_fast_path(trace: JaxpropTrace) -> bool:
    """Recording eagerly, with nothing asking to see every primitive."""
    return (type(trace) is JaxpropTrace and _jax.is_dispatching(trace.parent)
            and not inlining_forced() and not OVERRIDES and not SWEEP_CHECKS
            and not WATCHES)


@functools.lru_cache(maxsize=4096)
def has_marker(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or a sub-program in it) holds a tag or hook."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _jax.MARKERS or any(
                has_marker(sub) for sub in jaxprs_in_params(eqn.params)):
            return True
    return False


def _compiled_call(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any],
                   params: dict) -> list[Any]:
    """Bind the whole call on the parent; the node's rule is a cached, jitted VJP of it."""
    values, slots = zip(*map(trace.unwrap, tracers))
    if _jax.plain_jit_params(params):  # JAX's C++ dispatch: no per-call Python bookkeeping
        with _jax.set_current_trace(trace.parent):
            outputs = _dispatcher(params["jaxpr"])(*values)
    else:  # the tape keeps the inputs for the sweep: none may be donated
        kept = dict(params, donated_invars=(False,) * len(params["donated_invars"]))
        outputs = _jax.bind_on(trace.parent, primitive, values, kept)
    return trace.record(primitive, params, values, slots, outputs, _compiled_call_rule)


@functools.lru_cache(maxsize=4096)
def _dispatcher(closed: Any) -> Any:
    """``jax.jit`` of a jitted call's body: called on arrays, it runs on JAX's C++ path."""
    return jax.jit(_jax.jaxpr_as_fun(closed))


def _compiled_call_rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """jit(f): ct_in = vjp(f)(inputs)(ct_out), as one compiled program (forward recomputed)."""
    given = tuple(ct is not None for ct in cts)
    closed = node.params["jaxpr"]  # inputs no nonzero cotangent reaches keep a symbolic zero
    wants = tuple(w and r for w, r in zip(node.wants, inputs_reaching(closed.jaxpr, given)))
    if not any(wants):
        return [None] * len(wants)
    vjp = _compiled_vjp(closed, wants, given, _Placement(node.params))
    in_cts = iter(vjp(list(node.inputs), [ct for ct in cts if ct is not None]))
    return [next(in_cts) if w else None for w in wants]


class _Placement:
    """A jitted call's in/out shardings, as a cache key (shardings are hashable)."""

    __slots__ = ("params",)

    def __init__(self, params: dict) -> None:
        self.params = {k: params[k] for k in ("in_shardings", "out_shardings") if k in params}

    def __hash__(self) -> int:
        return hash(tuple(self.params.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Placement) and self.params == other.params


@functools.lru_cache(maxsize=1024)
def _compiled_vjp(closed: Any, wants: tuple, given: tuple, placement: _Placement) -> Any:
    params = placement.params

    def vjp(inputs: list, cts: list) -> list:
        diff = [inputs[i] for i, w in enumerate(wants) if w]

        def body(*tracers: Any) -> list:
            it = iter(tracers)
            return eval_call(_jax.get_current_trace(), closed,
                             [next(it) if w else x for x, w in zip(inputs, wants)], params)

        inner, in_tracers, outs = run_traced(body, diff)
        it = iter(cts)
        full = [next(it) if g else None for g in given]
        out_slots = [inner.unwrap(o)[1] for o in outs]
        in_cts = backward(inner.nodes, out_slots, full, [t.slot for t in in_tracers])
        return [zeros_like_value(x) if ct is None else ct for ct, x in zip(in_cts, diff)]

    return jax.jit(vjp)


def eval_on(trace: Any, closed: Any, args: Sequence[Any]) -> list[Any]:
    """Evaluate a (Closed)Jaxpr on ``args`` with ``trace`` current. A literal output comes back
    as an array of its declared dtype (``eval_jaxpr`` alone returns the bare Python scalar)."""
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
    with _jax.set_current_trace(trace):
        outs = _jax.eval_jaxpr(jaxpr, consts, *args)
    return typed_outputs(jaxpr, outs)


def typed_outputs(jaxpr: Any, outs: Sequence[Any]) -> list[Any]:
    """``jaxpr``'s output values, a literal output as an array of its declared dtype."""
    return [jnp.asarray(o, v.aval.dtype) if isinstance(v, Literal) else o
            for o, v in zip(outs, jaxpr.outvars)]


# -- custom_jvp ----------------------------------------------------------------------------
def custom_jvp_call(trace: JaxpropTrace, primitive: Any, fun: Any, jvp: Any,
                    tracers: Sequence[Any], symbolic_zeros: bool) -> list[Any]:
    """Primal outputs plus a node that transposes the user's tangent map: recorded now under
    a transform (primals from the JVP rule), deferred to the sweep when eager (primals from
    the function itself, one dispatch)."""
    values, in_slots = zip(*map(trace.unwrap, tracers))
    params = dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros)
    if all(s is None for s in in_slots):
        return _jax.bind_on(trace.parent, primitive, values, params)
    if _eager_fast_path(trace):
        return _deferred_custom_jvp(trace, primitive, fun, jvp, values, in_slots, params)
    tape, primals_out = _linearize(trace.parent, jvp, values, in_slots, symbolic_zeros,
                                   _name_of(fun))
    return trace.record(primitive, {"name": _name_of(fun)}, values, in_slots,
                        list(primals_out), _transpose_linear_tape, residuals=tape,
                        multiple_results=True)


def _name_of(fun: Any) -> str:
    return getattr(getattr(fun, "debug_info", None), "func_name", None) or "custom_jvp"


def _linearize(parent: Any, jvp: Any, values: Sequence[Any], in_slots: Sequence[Any],
               symbolic_zeros: bool, name: str = "custom_jvp") -> tuple[Tape, list[Any]]:
    """Run the user's JVP on ``values``: (tape of its tangent map, primal outputs). ``name``:
    the function's, for errors."""
    linear = LinearTrace(parent, name)
    with _jax.set_current_trace(parent):
        tangents = [linear.new_symbolic_input(_jax.aval_of(v).to_tangent_aval())
                    if s is not None else _zero_tangent(v, symbolic_zeros)
                    for v, s in zip(values, in_slots)]
    try:
        with _jax.set_current_trace(linear):
            outs = jvp.call_wrapped(*values, *tangents)
    finally:
        nodes = linear.release()
    n = len(outs) // 2
    primals_out, tangents_out = outs[:n], outs[n:]
    tape = Tape(nodes, [t.slot if s is not None else None
                               for t, s in zip(tangents, in_slots)],
                [linear.unwrap(t)[1] for t in tangents_out])
    return tape, list(primals_out)


def _deferred_custom_jvp(trace: JaxpropTrace, primitive: Any, fun: Any, jvp: Any,
                         values: Sequence[Any], in_slots: Sequence[Any], params: dict
                         ) -> list[Any]:
    """Eagerly: run only the primal function now (as JAX's eager evaluation does); the user's
    JVP runs when the sweep reaches the node, so an eager forward pays nothing for it, and a
    compiled sweep (:mod:`jaxprop.eager`) traces it once."""
    outputs = _jax.bind_on(trace.parent, primitive, values, params)
    rule_params = {"name": _name_of(fun), "jvp": _JvpRule(fun, jvp, params["symbolic_zeros"])}
    return trace.record(primitive, rule_params, values, in_slots, outputs,
                        _linearize_then_transpose, multiple_results=True)


class _JvpRule:
    """A custom JVP rule held in a node's params. Equal for calls of one ``custom_jvp``
    function with the same static arguments (``fun`` compares its function and static
    arguments, ``jvp.f`` is the rule), so tapes through it share a compiled sweep.

    Only JAX's own rules (``jax.nn.relu``, ``jnp.logaddexp`` …: functions of their arguments
    alone) are hashable. A user's rule may read Python state that a compiled sweep would
    freeze (JAX's eager grad runs the rule on every call), so tapes through it are swept
    per node: its hash raises TypeError, which makes the tape's structure uncacheable."""

    __slots__ = ("fun", "jvp", "symbolic_zeros", "_key", "_hash")

    def __init__(self, fun: Any, jvp: Any, symbolic_zeros: bool) -> None:
        self.fun, self.jvp, self.symbolic_zeros = fun, jvp, symbolic_zeros
        self._key = (fun, jvp.f, symbolic_zeros)
        self._hash: int | None = None

    def __hash__(self) -> int:  # TypeError: not cacheable (user rule, unhashable statics)
        if self._hash is None:
            if not _is_jax_function(self.jvp.f):
                raise TypeError("a user's custom_jvp rule may read Python state")
            self._hash = hash(self._key)
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _JvpRule) and hash(self) == hash(other)
                                 and self._key == other._key)

    def __repr__(self) -> str:
        return f"jvp={getattr(self.jvp.f, '__qualname__', self.jvp.f)}"


def _is_jax_function(fn: Any, seen: frozenset = frozenset()) -> bool:
    """Whether ``fn`` (a custom rule) is defined inside JAX itself, and so are the functions it
    wraps (``defjvps`` wraps one rule per argument; those may be the user's)."""
    fn = getattr(fn, "func", fn)
    if id(fn) in seen:
        return True
    if (getattr(fn, "__module__", None) or "").split(".")[0] != "jax":
        return False
    wrapped = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()
               if callable(c.cell_contents) or isinstance(c.cell_contents, (tuple, list))]
    inner = [f for w in wrapped for f in (w if isinstance(w, (tuple, list)) else (w,))
             if f is not None]
    return all(_is_jax_function(f, seen | {id(fn)}) for f in inner if callable(f))


def _linearize_then_transpose(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """custom_jvp (deferred): record the JVP's tangent map now, then ct_in = Jᵀ ct_out."""
    rule: _JvpRule = node.params["jvp"]
    tape, _ = _linearize(_jax.get_current_trace(), rule.jvp, node.inputs, node.in_slots,
                         rule.symbolic_zeros, node.params["name"])
    return backward(tape.nodes, tape.out_slots, cts, tape.in_slots)


def _zero_tangent(value: Any, symbolic_zeros: bool) -> Any:
    if symbolic_zeros:
        return _jax.SymbolicZero(_jax.aval_of(value).to_tangent_aval())
    return zeros_like_value(value)


def _transpose_linear_tape(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """custom_jvp: ct_in = Jᵀ ct_out, by the reverse sweep of the recorded tangent map."""
    tape: Tape = node.residuals
    return backward(tape.nodes, tape.out_slots, cts, tape.in_slots)


# -- custom_vjp ----------------------------------------------------------------------------
def custom_vjp_call(trace: JaxpropTrace, primitive: Any, fun: Any, fwd: Any, bwd: Any,
                    tracers: Sequence[Any], out_trees: Any, symbolic_zeros: bool) -> list[Any]:
    """Run the user's ``fwd``; the node's rule runs the user's ``bwd`` on its residuals."""
    values, in_slots = zip(*map(trace.unwrap, tracers))
    if all(s is None for s in in_slots):
        return _jax.bind_on(trace.parent, primitive, values,
                            dict(subfuns=(fun, fwd, bwd), out_trees=out_trees,
                                 symbolic_zeros=symbolic_zeros))
    fwd_args = [x for v, s in zip(values, in_slots) for x in (v, s is not None)]
    with _jax.set_current_trace(trace.parent):
        res_and_out = fwd.call_wrapped(*fwd_args)
    _, res_tree, input_forwards = out_trees()
    n_res = res_tree.num_leaves - sum(f is not None for f in input_forwards)
    fresh = iter(res_and_out[:n_res])
    residuals = [next(fresh) if f is None else values[f] for f in input_forwards]
    params = {"bwd": bwd, "symbolic_zeros": symbolic_zeros}
    return trace.record(primitive, params, values, in_slots, list(res_and_out[n_res:]),
                        _call_user_bwd, residuals=residuals, multiple_results=True)


def _call_user_bwd(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """custom_vjp: ct_in = bwd(residuals, ct_out), the user's own rule."""
    filled = [ct if ct is not None else _zero_cotangent(out, node.params["symbolic_zeros"])
              for ct, out in zip(cts, node.outputs)]
    in_cts = node.params["bwd"].call_wrapped(*node.residuals, *filled)
    return [None if isinstance(ct, (_jax.Zero, _jax.SymbolicZero)) or not want else ct
            for ct, want in zip(in_cts, node.wants)]


def _zero_cotangent(value: Any, symbolic_zeros: bool) -> Any:
    if symbolic_zeros:
        return _jax.SymbolicZero(_jax.aval_of(value).to_ct_aval())
    return zeros_like_value(value)


__all__ = ["custom_jvp_call", "custom_vjp_call", "eval_call", "eval_on", "inline_call",
           "typed_outputs"]
