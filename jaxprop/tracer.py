"""jaxprop's tracer: runs a function define-by-run and records one node per primitive.

Each :class:`JaxpropTracer` wraps a value of the *parent* trace (a concrete array eagerly, a
jit tracer under ``jax.jit``, another jaxprop tracer for higher order) and a *slot*, the
integer the reverse sweep keys cotangents by. ``JaxpropTrace.process_primitive`` unwraps its
own tracers, binds the primitive on the parent trace, appends a :class:`~jaxprop.registry.Node`
to the tape and wraps the floating-point outputs. Values of other traces are constants here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop import _jax, scopes
from jaxprop.registry import Node, NodeRule, lookup, missing_rule_error, zero_rule


def is_differentiable(aval: Any) -> bool:
    """Floating and complex values carry gradients; integers, booleans, keys do not."""
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return False
    known = _INEXACT.get(dtype)
    if known is None:
        known = _INEXACT[dtype] = bool(jnp.issubdtype(dtype, jnp.inexact))
    return known


_INEXACT: dict[Any, bool] = {}


class JaxpropTracer(_jax.Tracer):
    """A value being differentiated: the parent-level ``value`` and its tape ``slot``."""

    __slots__ = ("value", "slot")
    perturbed = True  # jax.closure_convert hoists it into an argument (see _jax)

    def __init__(self, trace: JaxpropTrace, value: Any, slot: int, aval: Any = None) -> None:
        super().__init__(trace, _jax.aval_of(value) if aval is None else aval)
        self.value = value
        self.slot = slot

    def to_concrete_value(self) -> Any:
        return _jax.to_concrete_value(self.value)

    def full_lower(self) -> Any:
        return self

    def cur_qdd(self) -> Any:  # pragma: no cover - only for mutable-array avals
        return self.value.cur_qdd() if hasattr(self.value, "cur_qdd") else None

    def get_referent(self) -> Any:
        return self


# Primitives whose handling is not "bind and record one node" (jit, custom rules, loops).
Handler = Callable[["JaxpropTrace", Any, Sequence[Any], dict], Any]
HANDLERS: dict[str, Handler] = {}


def handler(*names: str) -> Callable[[Handler], Handler]:
    """Register a tracer-level handler for primitives that carry sub-programs."""

    def register(fn: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = fn
        return fn

    return register


# The traces whose loop bodies / branches are being recorded right now (innermost last).
_BODY_OF: list[Any] = []


@contextlib.contextmanager
def pushed(stack: list[Any], item: Any) -> Iterator[Any]:
    """``item`` on top of ``stack`` for the block (removed after it, even on error)."""
    stack.append(item)
    try:
        yield item
    finally:
        del stack[max(i for i, x in enumerate(stack) if x is item)]  # its innermost entry


def recording_body_of(trace: Any) -> Any:
    """Traces made inside the block record a sub-program (loop body, branch) of ``trace``."""
    return pushed(_BODY_OF, trace)


def outermost(trace: Any) -> Any:
    """The trace whose tape holds ``trace``'s, following loop bodies and branches outwards."""
    while getattr(trace, "body_of", None) is not None:
        trace = trace.body_of
    return trace


# Contexts acting on values that leave a named scope (``scope_hook``, ``scope_tag``), innermost
# last. Each has ``scope`` (a pattern), ``apply(value, index) -> value`` (binds a marker on the
# current trace) and ``acted(key, trace)``.
WATCHES: list[Any] = []


class JaxpropTrace(_jax.Trace):
    """A tape-recording trace over ``parent``; see the module docstring."""

    def __init__(self, parent: Any) -> None:
        super().__init__()
        self.parent = parent
        self.nodes: list[Node] = []
        self._slots = 0
        self.requires_low = True
        self.body_of = _BODY_OF[-1] if _BODY_OF else None  # a loop body's tape: its owner
        self.inside: dict[int, list[Any]] = {}  # slot -> watches whose scope computed it
        self.crossed: dict[tuple[int, int], Any] = {}  # (slot, watch) -> value outside

    # -- values ---------------------------------------------------------------------------
    def new_input(self, value: Any, aval: Any = None) -> JaxpropTracer:
        """A fresh differentiated input holding ``value`` (of type ``aval``, if known)."""
        self._slots += 1
        return JaxpropTracer(self, value, self._slots, aval)

    def unwrap(self, x: Any) -> tuple[Any, int | None]:
        """(parent-level value, slot) of ``x``; slot None for constants of this trace."""
        if isinstance(x, JaxpropTracer) and x._trace is self:
            return x.value, x.slot
        return x, None

    def wrap(self, value: Any) -> tuple[Any, int | None]:
        """Wrap a parent-level output: a tracer if it is floating point, else the value."""
        aval = _jax.aval_of(value)
        if is_differentiable(aval):
            tracer = self.new_input(value, aval)
            return tracer, tracer.slot
        return value, None

    def stage_value(self, val: Any) -> Any:  # pragma: no cover - used by JAX's staging
        return self.parent.stage_value(self.unwrap(val)[0])

    def release(self) -> list[Node]:
        """End the trace: invalidate it, forget the parent and hand over the nodes."""
        self.invalidate()
        nodes, self.nodes, self.parent = self.nodes, [], None
        return nodes

    # -- recording ------------------------------------------------------------------------
    def record(self, primitive: Any, params: dict, inputs: Sequence[Any],
               in_slots: Sequence[int | None], outputs: Any, rule: NodeRule,
               residuals: Any = (), multiple_results: bool | None = None) -> Any:
        """Append a node for ``outputs = primitive(*inputs)`` and return wrapped outputs."""
        multiple = primitive.multiple_results if multiple_results is None else multiple_results
        outs = tuple(outputs) if multiple else (outputs,)
        wrapped, out_slots = zip(*map(self.wrap, outs)) if outs else ((), ())
        if any(s is not None for s in out_slots):
            self.nodes.append(Node(primitive, params, tuple(inputs), outs, tuple(in_slots),
                                   tuple(out_slots), rule, residuals, _jax.current_source()))
            if WATCHES:
                self._note_scope(out_slots)
        return list(wrapped) if multiple else wrapped[0]

    # -- values leaving a watched scope ----------------------------------------------------
    def _note_scope(self, out_slots: Sequence[int | None]) -> None:
        """Remember which watches' scopes the new values were computed in."""
        scope = scopes.current_scope()
        watches = [w for w in WATCHES if scopes.scope_matches(w.scope, scope)]
        if watches:
            for slot in out_slots:
                if slot is not None:
                    self.inside[slot] = watches

    def leaving(self, tracers: Sequence[Any]) -> list[Any]:
        """``tracers``, where one computed inside a watched scope is used outside it replaced
        by the watch's marker of it (one per value and watch: all outside uses share it)."""
        scope, out = None, []
        for t in tracers:
            watches = self.inside.get(self.unwrap(t)[1]) if isinstance(t, JaxpropTracer) else None
            if watches and not self.inside.get(-1):
                scope = scopes.current_scope() if scope is None else scope
                for w in watches:
                    if w in WATCHES and not scopes.scope_matches(w.scope, scope):
                        t = self._cross(t, w)
            out.append(t)
        return out

    def _cross(self, tracer: JaxpropTracer, watch: Any) -> Any:
        key = (tracer.slot, id(watch))
        if key not in self.crossed:
            index = sum(1 for k in self.crossed if k[1] == id(watch))
            self.inside[-1] = [watch]  # re-entry guard: binding the marker records a node
            try:
                with _jax.set_current_trace(self):
                    self.crossed[key] = watch.apply(tracer, index)
            finally:
                del self.inside[-1]
            watch.acted(watch.describe(), self)
        return self.crossed[key]

    def process_primitive(self, primitive: Any, tracers: Sequence[Any], params: dict) -> Any:
        if WATCHES and self.inside:
            tracers = self.leaving(tracers)
        values, slots = zip(*map(self.unwrap, tracers)) if tracers else ((), ())
        if all(s is None for s in slots):
            return _jax.bind_on(self.parent, primitive, values, params)
        special = HANDLERS.get(primitive.name)
        if special is not None:
            return special(self, primitive, tracers, params)
        outputs = _jax.bind_on(self.parent, primitive, values, params)
        return self.record_applied(primitive, params, values, slots, outputs)

    def record_applied(self, primitive: Any, params: dict, values: Sequence[Any],
                       slots: Sequence[int | None], outputs: Any) -> Any:
        """Record ``outputs = primitive(*values)``, already computed, with its VJP rule."""
        outs = outputs if primitive.multiple_results else (outputs,)
        if not any(is_differentiable(_jax.aval_of(o)) for o in outs):
            return outputs  # comparisons, argmax, iota …: nothing to differentiate
        rule = lookup(primitive.name, self)
        if rule is None:
            raise missing_rule_error(primitive)
        if rule is zero_rule:
            return outputs  # stop_gradient, sign, floor …: constants from here on
        return self.record(primitive, params, values, slots, outputs, rule)

    def process_custom_jvp_call(self, primitive: Any, fun: Any, jvp: Any,
                                tracers: Sequence[Any], *, symbolic_zeros: bool) -> Any:
        from jaxprop.rules.custom import custom_jvp_call
        if WATCHES and self.inside:
            tracers = self.leaving(tracers)
        return custom_jvp_call(self, primitive, fun, jvp, tracers, symbolic_zeros)

    def process_custom_vjp_call(self, primitive: Any, fun: Any, fwd: Any, bwd: Any,
                                tracers: Sequence[Any], *, out_trees: Any,
                                symbolic_zeros: bool) -> Any:
        from jaxprop.rules.custom import custom_vjp_call
        if WATCHES and self.inside:
            tracers = self.leaving(tracers)
        return custom_vjp_call(self, primitive, fun, fwd, bwd, tracers, out_trees,
                               symbolic_zeros)

    def process_shard_map(self, primitive: Any, fun: Any, args: Sequence[Any],
                          **params: Any) -> Any:
        from jaxprop.rules.shard_map import shard_map_call
        return shard_map_call(self, primitive, fun, args, params)


class LinearTrace(JaxpropTrace):
    """Records a *linear* map without evaluating it: its inputs are :class:`_jax.Symbolic`.

    Used to capture a custom JVP rule's tangent map ``t ↦ J t``: the primal computations in
    the rule run on the parent as usual, while each primitive applied to a tangent is only
    recorded (its output type from abstract evaluation). The reverse sweep of the tape is
    ``ct ↦ Jᵀ ct``; rules never read a tangent's value, because the map is linear in it.
    """

    def __init__(self, parent: Any, rule_name: str = "custom_jvp") -> None:
        super().__init__(parent)
        self.rule_name = rule_name

    def new_symbolic_input(self, aval: Any) -> JaxpropTracer:
        """A fresh tangent input of type ``aval``."""
        return self.new_input(_jax.Symbolic(aval))

    def process_primitive(self, primitive: Any, tracers: Sequence[Any], params: dict) -> Any:
        values, slots = zip(*map(self.unwrap, tracers)) if tracers else ((), ())
        if all(s is None for s in slots):
            return _jax.bind_on(self.parent, primitive, values, params)
        if not _linear_use(primitive.name, slots):
            raise self.nonlinear_error(primitive.name)
        special = HANDLERS.get(primitive.name)
        if special is not None:
            return special(self, primitive, tracers, params)
        rule = lookup(primitive.name, self)
        if rule is None:
            raise missing_rule_error(primitive)
        out_avals = _jax.abstract_eval(primitive, [_jax.aval_of(v) for v in values], params)
        outputs = ([_jax.Symbolic(a) for a in out_avals] if primitive.multiple_results
                   else _jax.Symbolic(out_avals))
        return self.record(primitive, params, values, slots, outputs, rule)

    def process_custom_jvp_call(self, primitive: Any, fun: Any, jvp: Any,
                                tracers: Sequence[Any], *, symbolic_zeros: bool) -> Any:
        if self._touches_tangents(tracers):  # a linear use: record the function itself
            with _jax.set_current_trace(self):
                return fun.call_wrapped(*tracers)
        return _jax.bind_on(self.parent, primitive, tracers,
                            dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros))

    def process_custom_vjp_call(self, primitive: Any, fun: Any, fwd: Any, bwd: Any,
                                tracers: Sequence[Any], *, out_trees: Any,
                                symbolic_zeros: bool) -> Any:
        if self._touches_tangents(tracers):
            with _jax.set_current_trace(self):
                return fun.call_wrapped(*tracers)
        return _jax.bind_on(self.parent, primitive, tracers,
                            dict(subfuns=(fun, fwd, bwd), out_trees=out_trees,
                                 symbolic_zeros=symbolic_zeros))

    def _touches_tangents(self, tracers: Sequence[Any]) -> bool:
        return any(self.unwrap(t)[1] is not None for t in tracers)

    def nonlinear_error(self, name: str) -> NotImplementedError:
        """What JAX says (no transpose rule for ``name``), which rule, where, and why."""
        where = _jax.source_summary(_jax.current_source())
        return NotImplementedError(
            f"Transpose rule (for reverse-mode differentiation) for '{name}' not implemented: "
            f"the custom_jvp rule of {self.rule_name} applies '{name}' to a tangent"
            + (f" at {where}" if where else "") + ", so its tangent output is not linear in "
            "the tangent inputs and has no transpose. A JVP rule must be linear in its "
            "tangents (apply non-linear functions to the primals only), or define the "
            "derivative with jax.custom_vjp instead.")


# Primitives that are not linear in any operand; and those linear in each operand separately
# (bilinear: not linear when two operands are tangents), or only in the first (div).
_NONLINEAR = frozenset({
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "cos", "cosh",
    "cummax", "cummin", "cumlogsumexp", "cumprod", "digamma", "erf", "erf_inv", "erfc", "exp",
    "exp2", "expm1", "integer_pow", "lgamma", "log", "log1p", "logistic", "max", "min", "pow",
    "reduce_max", "reduce_min", "reduce_prod", "rem", "rsqrt", "sin", "sinh", "sqrt",
    "square", "tan", "tanh"})
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated", "ragged_dot_general"})


def _linear_use(name: str, slots: Sequence[int | None]) -> bool:
    """Whether applying ``name`` with tangents at the non-None ``slots`` is linear in them."""
    if name in _NONLINEAR:
        return False
    if name in _BILINEAR:
        return sum(s is not None for s in slots) <= 1
    if name == "div":
        return slots[1] is None
    return True


_FORCE_INLINE = [0]


@contextlib.contextmanager
def inlining() -> Iterator[None]:
    """Record the primitives inside ``jax.jit``-ed calls one by one, even eagerly.

    Eagerly, jaxprop otherwise keeps a jitted call as one node with a compiled VJP (one
    dispatch each way); ``explain`` and the NaN search want to see inside it.
    """
    _FORCE_INLINE[0] += 1
    try:
        yield
    finally:
        _FORCE_INLINE[0] -= 1


def inlining_forced() -> bool:
    """Whether an :func:`inlining` block is active."""
    return _FORCE_INLINE[0] > 0


def run_traced(fun: Callable[..., Any], values: Sequence[Any], *,
               parent: Any = None) -> tuple[Recording, list[JaxpropTracer], Any]:
    """Run ``fun(*tracers)`` under a new trace whose inputs hold ``values``.

    Returns the recording (the trace's nodes, and ``unwrap``), the input tracers and ``fun``'s
    raw output. The trace is invalidated and released afterwards: leaked tracers raise JAX's
    escaped-tracer error, and a trace JAX keeps alive (jaxprs it caches, e.g. for
    ``jax.checkpoint``, remember the trace they were traced under) holds no values.
    """
    if parent is None:
        with _jax.take_current_trace() as parent:
            return run_traced(fun, values, parent=parent)
    trace = JaxpropTrace(parent)
    tracers = [trace.new_input(v) for v in values]
    try:
        with _jax.set_current_trace(trace):
            out = fun(*tracers)
    finally:
        nodes = trace.release()
    return Recording(trace, nodes), tracers, out


class Recording:
    """What a finished trace recorded: its ``nodes``, and ``unwrap`` for its tracers."""

    __slots__ = ("nodes", "_trace")

    def __init__(self, trace: JaxpropTrace, nodes: list[Node]) -> None:
        self.nodes, self._trace = nodes, trace

    def unwrap(self, x: Any) -> tuple[Any, int | None]:
        """(parent-level value, slot) of ``x``; slot None for values of other traces."""
        return self._trace.unwrap(x)


def zeros_like_value(value: Any) -> Any:
    """Zeros with ``value``'s shape and tangent dtype (float0 for integers and booleans)."""
    return zeros_of(_jax.aval_of(value))


def zeros_of(typ: Any) -> Any:
    """The zero cotangent of a value of type ``typ`` (an aval or ``jax.ShapeDtypeStruct``):
    zeros of its dtype (and of its sharding under an Explicit mesh), float0 for integers and
    booleans."""
    if is_differentiable(typ):
        return jnp.zeros(typ.shape, typ.dtype, out_sharding=sharding_of(typ))
    return np.zeros(typ.shape, _jax.float0)


def sharding_of(x: Any) -> Any:
    """The sharding in ``x``'s type (``jax.typeof(x).sharding``; ``x`` may be an aval), or
    None when it says nothing: no mesh, or a mesh without Explicit axes. A rule that makes a
    new array passes it on as ``out_sharding``, so the cotangent is sharded like its primal,
    as JAX's own rules do."""
    typ = x if isinstance(x, (_jax.AbstractValue, jax.ShapeDtypeStruct)) else _jax.aval_of(x)
    sharding = getattr(typ, "sharding", None)
    if sharding is None or not getattr(sharding, "mesh", None) or \
            not sharding.mesh.explicit_axes:
        return None
    return sharding


@jax.tree_util.register_pytree_node_class
class Tape:
    """The recorded nodes plus the slots of the traced function's inputs and outputs.

    A pytree: its leaves are every array the nodes hold, so a pullback built on a tape can be
    returned from or passed through ``jax.jit`` like ``jax.vjp``'s.
    """

    def __init__(self, nodes: Sequence[Node], in_slots: Sequence[int | None],
                 out_slots: Sequence[int | None]) -> None:
        self.nodes = list(nodes)
        self.in_slots = tuple(in_slots)
        self.out_slots = tuple(out_slots)
        self._skeleton: _Skeleton | None = None

    def tree_flatten(self) -> tuple[list, Any]:
        data = [(n.inputs, n.outputs, n.residuals) for n in self.nodes]
        return [data], self.skeleton()

    def skeleton(self) -> _Skeleton:
        """The tape's static structure (cached): everything but the arrays."""
        if self._skeleton is None:
            nodes = [(n.primitive, n.params, n.in_slots, n.out_slots, n.rule, n.source)
                     for n in self.nodes]
            self._skeleton = _Skeleton((nodes, self.in_slots, self.out_slots))
        return self._skeleton

    @classmethod
    def tree_unflatten(cls, aux: _Skeleton, children: list) -> Tape:
        skeleton, in_slots, out_slots = aux.value
        nodes = [Node(p, params, ins, outs, isl, osl, rule, res, src)
                 for (p, params, isl, osl, rule, src), (ins, outs, res)
                 in zip(skeleton, children[0])]
        tape = cls(nodes, in_slots, out_slots)
        tape._skeleton = aux
        return tape


class _Skeleton:
    """Static part of a tape. Two skeletons are equal when their tapes have the same structure
    (primitives, params, wiring, rules), so ``jax.jit`` reuses one compiled program for every
    pullback of that structure. A skeleton with unhashable params compares by identity, like
    a fresh ``jax.vjp`` pullback."""

    __slots__ = ("value", "_key", "_hash")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._key: Any = _UNSET
        self._hash = 0

    @property
    def key(self) -> Any:
        """A hashable description of the structure, or None when a param is not hashable."""
        if self._key is _UNSET:
            self._key = _structure_key(self.value)
            self._hash = hash(self._key) if self._key is not None else id(self)
        return self._key

    def __hash__(self) -> int:
        self.key  # noqa: B018 - computes the hash
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, _Skeleton) or self.key is None or other.key is None:
            return False
        return self._hash == other._hash and self._key == other._key


_UNSET = object()


def _structure_key(value: Any) -> Any:
    skeleton, in_slots, out_slots = value
    try:
        key = (tuple((p, _Frozen(params), isl, osl, rule) for p, params, isl, osl, rule, _
                     in skeleton), in_slots, out_slots)
        hash(key)
    except TypeError:
        return None
    return key


class _Frozen:
    """A node's params, hashable: hashed once, compared by hash first. Items keep the dict's
    order (a primitive's params are always built in one order; another order only misses a
    cache). TypeError if a value is not hashable (arrays, lists)."""

    __slots__ = ("items", "_hash")

    def __init__(self, params: dict) -> None:
        self.items = tuple(params.items())
        for _, v in self.items:
            if isinstance(v, (np.ndarray, jax.Array)):
                raise TypeError("array-valued param")
        self._hash = hash(self.items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Frozen) and self._hash == other._hash
                                 and self.items == other.items)
