"""Every touch of JAX internals lives here, so a JAX upgrade is one file.

The rest of jaxprop imports JAX's public API (``jax``, ``jax.numpy``, ``lax``) plus the few
names re-exported below: the trace machinery (``Trace``, ``Tracer``, current-trace context
managers), the evaluator for jaxprs, symbolic-zero classes used by custom derivative rules,
and source-location helpers.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import jax.core as _jcore
import jax.extend.core as _xcore
from jax._src import core as _core
from jax._src import source_info_util as _source_info
from jax._src.interpreters.batching import BatchTrace as _BatchTrace
from jax._src.ad_util import SymbolicZero, Zero
from jax._src.lib import xla_client as _xla_client
from jax._src.sharding_impls import UnspecifiedValue as _UnspecifiedValue
from jax.dtypes import float0

Trace = _jcore.Trace
Tracer = _jcore.Tracer
ClosedJaxpr = _xcore.ClosedJaxpr
Jaxpr = _xcore.Jaxpr
Primitive = _xcore.Primitive
TraceTag = _xcore.TraceTag
set_current_trace = _xcore.set_current_trace
take_current_trace = _xcore.take_current_trace
eval_jaxpr = _jcore.eval_jaxpr
SourceInfo = Any
ConcretizationError = jax.errors.ConcretizationTypeError
_xla_traceback = _xla_client.Traceback.get_traceback

# jaxprop's own frames are not the user's: error messages point past them.
_source_info.register_exclusion(os.path.dirname(os.path.abspath(__file__)) + os.sep)

__all__ = [
    "ClosedJaxpr", "Jaxpr", "Primitive", "Source", "SourceInfo", "Symbolic", "SymbolicZero",
    "Trace", "TraceTag", "Tracer", "Zero", "abstract_eval", "aval_of", "bind_on",
    "current_source", "escaped_tracer_check",
    "eval_jaxpr", "float0", "get_current_trace", "identity_primitive", "set_current_trace",
    "source_frame", "source_scope", "source_summary", "take_current_trace",
    "to_concrete_value",
]


def aval_of(x: Any) -> Any:
    """The abstract value (shape, dtype, weak type) of an array, scalar or tracer."""
    if type(x) is Symbolic:
        return x.aval
    return jax.typeof(x)


def abstract_eval(primitive: Any, avals: Any, params: dict) -> Any:
    """Output aval(s) of ``primitive`` applied to inputs of types ``avals``, computing nothing."""
    out, _effects = primitive.abstract_eval(*avals, **params)
    return out


@jax.tree_util.register_pytree_node_class
class Symbolic:
    """A value known only by its type: the tangents of a linear map being recorded."""

    __slots__ = ("aval",)

    def __init__(self, aval: Any) -> None:
        self.aval = aval

    shape = property(lambda self: self.aval.shape)
    dtype = property(lambda self: self.aval.dtype)
    ndim = property(lambda self: len(self.aval.shape))

    def tree_flatten(self) -> tuple[tuple, Any]:
        return (), self.aval

    @classmethod
    def tree_unflatten(cls, aval: Any, _: Any) -> Symbolic:
        return cls(aval)

    def __repr__(self) -> str:
        return f"Symbolic({self.aval.str_short()})"


def is_valid_jaxtype(x: Any) -> bool:
    """Whether ``x`` can be a JAX value (object-dtype arrays, strings … cannot)."""
    return _core.valid_jaxtype(x)


def cotangent_type_error(ct: Any, out_aval: Any) -> str | None:
    """JAX's message if ``ct`` cannot be the cotangent of an output of type ``out_aval``
    (shape or dtype differ; weak types and float0 outputs are lenient, as in ``jax.vjp``)."""
    got, expected = _core.typeof(ct), out_aval.to_ct_aval()
    if _core.typecompat(got, expected) or (
            getattr(got, "shape", None) == expected.shape and expected.dtype == float0):
        return None
    return ("unexpected JAX type (e.g. shape/dtype) for argument to VJP function: "
            f"got {got.str_short()}, but expected {expected.str_short()} because the "
            f"corresponding output of the differentiated function had JAX type "
            f"{out_aval.str_short()}")


def eval_without_dead_code(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on the current trace with only the work its outputs need: ``fn`` is
    staged to a jaxpr, dead equations are dropped (as JAX's partial evaluation drops
    them), and the rest is evaluated. Returns ``fn``'s output pytree."""
    from jax._src.interpreters import partial_eval as pe
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, True, instantiate=True)
    outs = _jcore.eval_jaxpr(jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)


def to_concrete_value(x: Any) -> Any:
    """The concrete value under ``x`` if there is one (so Python ``if`` works), else None."""
    return _core.to_concrete_value(x)


def bind_on(trace: Any, primitive: Any, args: Any, params: dict) -> Any:
    """Apply ``primitive`` to ``args`` on ``trace`` (the parent of a jaxprop trace)."""
    avals = tuple(map(_core.typeof, args))
    return primitive.bind_with_trace(trace, args, avals, params)


def jaxpr_as_fun(closed: Any) -> Any:
    """A ClosedJaxpr as a Python function of its inputs, returning the list of outputs."""
    return _core.jaxpr_as_fun(closed)


def plain_jit_params(params: dict) -> bool:
    """Whether a ``jit`` equation's params ask for nothing beyond running its jaxpr (and
    donating inputs): no shardings, layouts or compiler options (a plain ``jax.jit``)."""
    return (not params["compiler_options_kvs"]
            and all(isinstance(s, _UnspecifiedValue)
                    for s in (*params["in_shardings"], *params["out_shardings"]))
            and all(x is None for x in (*params["in_layouts"], *params["out_layouts"])))


def jaxpr_key(closed: Any) -> Any:
    """A hashable key equal for structurally identical (Closed)Jaxprs — the same equations,
    params, wiring and types — so a program retraced from a fresh closure each call (a scan
    body defined inside the loss) maps to one cache entry. Constants compare by identity.
    None if a param is not hashable."""
    try:
        key = _jaxpr_key(closed)
        hash(key)
    except TypeError:
        return None
    return key


def _jaxpr_key(closed: Any) -> tuple:
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
    names: dict[Any, int] = {}

    def bind(v: Any) -> tuple:
        names[v] = len(names)
        return v.aval

    def atom(v: Any) -> Any:
        if isinstance(v, _xcore.Literal):
            val = v.val
            return ("lit", str(v.aval), val if isinstance(val, (int, float, bool, complex))
                    else np.asarray(val).tobytes())
        return names[v]

    head = (tuple(bind(v) for v in jaxpr.constvars), tuple(bind(v) for v in jaxpr.invars),
            tuple(_ById(c) for c in consts))
    eqns = tuple((eqn.primitive, tuple((k, _param_key(p)) for k, p in eqn.params.items()),
                  tuple(atom(v) for v in eqn.invars), tuple(bind(v) for v in eqn.outvars))
                 for eqn in jaxpr.eqns)
    return head, eqns, tuple(atom(v) for v in jaxpr.outvars)


def _param_key(p: Any) -> Any:
    if isinstance(p, (_xcore.ClosedJaxpr, _xcore.Jaxpr)):
        return _jaxpr_key(p)
    if isinstance(p, tuple):
        return tuple(_param_key(x) for x in p)
    return p


class _ById:
    """Compares (and hashes) by identity: a constant array inside a jaxpr key."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ById) and other.obj is self.obj


def get_current_trace() -> Any:
    """The trace that ``jax.numpy`` operations bind on right now."""
    return _core.trace_ctx.trace


class Source(NamedTuple):
    """Where a node was recorded: JAX's source info (the equation's traceback inside inlined
    ``jit`` bodies, and the ``named_scope`` stack) plus the live Python traceback, which still
    reaches the user's line when the equation's own traceback stops at a jitted jnp function.
    """

    info: Any
    live: Any


def current_source() -> Source:
    """A cheap handle on the current tracebacks, summarised only when shown."""
    return Source(_source_info._source_info_context.context, _xla_traceback())


def _user_frame(source: Any) -> Any:
    if isinstance(source, Source):
        return (_source_info.user_frame(getattr(source.info, "traceback", None))
                or _source_info.user_frame(source.live))
    return _source_info.user_frame(getattr(source, "traceback", None))


def source_summary(source: Any) -> str:
    """``file:line (function)`` of the first user frame of ``source``; '' if unknown."""
    if source is None:
        return ""
    try:
        frame = _user_frame(source)
    except Exception:  # pragma: no cover - a traceback JAX cannot summarise
        return ""
    if frame is None:
        return ""
    return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"


def source_frame(source: Any) -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the first user frame of ``source``; None if unknown."""
    frame = _user_frame(source) if source is not None else None
    return None if frame is None else (frame.file_name, frame.start_line, frame.function_name)


def source_scope(source: Any) -> str:
    """The ``jax.named_scope`` / Flax module path active where ``source`` was taken ('a/b')."""
    info = source.info if isinstance(source, Source) else source
    return str(getattr(info, "name_stack", "") or "")


def backward_scope(source: Any, name: str) -> Any:
    """A context in which a node's backward ops carry its forward op's name scope, as
    ``transpose(<forward scope>)/<primitive>`` (jax.grad's read ``transpose(jvp(<scope>))``):
    a profile or the HLO shows which forward op each backward op belongs to."""
    info = source.info if isinstance(source, Source) else source
    forward = getattr(info, "name_stack", None) or _source_info.NameStack()
    current = _source_info.current_name_stack()
    if forward.stack[:len(current.stack)] == current.stack:  # the scopes both are inside
        forward = forward[len(current.stack):]
    return _source_info.set_name_stack(current.transform("transpose") + forward.extend(name))


def identity_primitive(name: str, transpose: Any) -> Any:
    """A primitive ``p(x, **params) = x`` (eager, jit, vmap) for marking values.

    jaxprop records it like any primitive and gives it its own rule. For JAX's autodiff it is
    linear with transpose ``ct -> transpose(ct, **params)``, so ``jax.grad`` of a program
    containing it still works (jaxprop never uses these JAX rules).
    """
    from jax._src.interpreters import ad, batching, mlir

    prim = Primitive(name)
    MARKERS.add(name)
    prim.def_impl(lambda x, **params: x)
    prim.def_abstract_eval(lambda x, **params: x)
    mlir.register_lowering(prim, lambda ctx, x, **params: [x])
    ad.deflinear2(prim, lambda ct, x, **params: [transpose(ct, **params)])
    batching.primitive_batchers[prim] = (
        lambda args, dims, **params: (prim.bind(*args, **params), dims[0]))
    return prim


# Names of marker primitives (tags, hooks): a jitted call containing one is always inlined.
MARKERS: set[str] = set()


def is_eager(trace: Any) -> bool:
    """Whether ``trace`` evaluates eagerly (concrete values, one dispatch per primitive)."""
    return isinstance(trace, _core.EvalTrace)


def is_dispatching(trace: Any) -> bool:
    """Whether ``trace`` runs each primitive as it comes: eager evaluation, possibly under
    ``jax.vmap`` (batching traces over eager). Nothing compiles such code as a whole."""
    while isinstance(trace, _BatchTrace):
        trace = trace.parent_trace
    return isinstance(trace, _core.EvalTrace)


def has_effects(closed: Any) -> bool:
    """Whether a (Closed)Jaxpr has side effects (prints, callbacks) that must run once."""
    return bool(getattr(closed, "effects", ()))


def escaped_tracer_check(value: Any) -> None:
    """Raise JAX's own escaped-tracer error when ``value`` belongs to a dead trace."""
    if isinstance(value, Tracer) and not value._trace.is_valid():
        raise _core.escaped_tracer_error(value)



# jax.closure_convert hoists closed-over values that "may be perturbed" (being differentiated)
# into explicit arguments, but recognises only JAX's own JVP tracers; a tracer class with
# ``perturbed = True`` (jaxprop's) is hoisted too, so custom_vjp closures work as under JAX.
from jax._src import custom_derivatives as _custom_derivatives  # noqa: E402

_jax_maybe_perturbed = _custom_derivatives._maybe_perturbed
_custom_derivatives._maybe_perturbed = (
    lambda x: getattr(type(x), "perturbed", False) is True or _jax_maybe_perturbed(x))
