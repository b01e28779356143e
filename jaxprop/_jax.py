"""Every touch of JAX internals lives here, so a JAX upgrade is one file.

The rest of jaxprop imports JAX's public API (``jax``, ``jax.numpy``, ``lax``) plus the few
names re-exported below: the trace machinery (``Trace``, ``Tracer``, current-trace context
managers), the evaluator for jaxprs, symbolic-zero classes used by custom derivative rules,
and source-location helpers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
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
AbstractValue = _core.AbstractValue
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
    "AbstractValue", "ClosedJaxpr", "Jaxpr", "Primitive", "Source", "SourceInfo", "Symbolic", "SymbolicZero",
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
    reaches the user's line when the equation's own traceback stops at a jitted jnp function,
    and the abstract mesh current then (``jax.sharding.auto_axes`` / ``explicit_axes`` change
    it for part of a program; the node's rule must run under the same one).
    """

    info: Any
    live: Any
    mesh: Any = None


def current_source() -> Source:
    """A cheap handle on the current tracebacks, summarised only when shown."""
    return Source(_source_info._source_info_context.context, _xla_traceback(),
                  jax.sharding.get_abstract_mesh())


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


# -- shard_map and collectives ------------------------------------------------------------
# ``jax.shard_map`` reaches a trace through ``trace.process_shard_map(prim, fun, args,
# **params)`` (not ``process_primitive``); ``fun`` returns a FlatTree tagged with the output
# PartitionSpecs. The helpers below are the only places that know that protocol.
from jax._src import api_util as _api_util  # noqa: E402
from jax._src import config as _config  # noqa: E402
from jax._src import shard_map as _shard_map  # noqa: E402
from jax._src.lax import parallel as _parallel  # noqa: E402
from jax._src.tree_util import FlatTree as _FlatTree  # noqa: E402
from jax.sharding import PartitionSpec as _P  # noqa: E402

SHARD_MAP = _shard_map.shard_map_p
PSUM = _parallel.psum_p
PSUM_INVARIANT = _parallel.psum_invariant_p
ALL_TO_ALL = _parallel.all_to_all_p


def shard_map_call_jaxpr(fun: Any, args: Sequence[Any], params: dict) -> tuple[Any, Any]:
    """One ``shard_map`` call as ``process_shard_map`` receives it, traced: (its ClosedJaxpr —
    a ``shard_map`` equation whose leading inputs are the values the body closes over, the
    ClosedJaxpr's consts, possibly tracers of outer traces, then ``args`` — and a function
    that packs flat output values the way ``shard_map_p.bind`` returns them)."""
    bound: list = []

    def call(*xs: Any) -> list:
        bound.append(SHARD_MAP.bind(*xs, subfuns=(fun,), **params))
        return list(bound[-1].vals)

    closed = jax.make_jaxpr(call)(*args)
    return closed, bound[-1].update


def bind_shard_map(trace: Any, args: Sequence[Any], body: Any, *, mesh: Any, in_specs: Any,
                   check_vma: bool, newly_manual_axes: Any) -> list[Any]:
    """``shard_map`` of ``body`` on ``trace``: ``body(*per_device_args)`` returns (its flat
    outputs, their PartitionSpecs); the result is the flat list of global outputs."""
    def fun(*xs: Any) -> Any:
        outs, specs = body(*xs)
        return _FlatTree.flatten(list(outs)).with_aux(tuple(specs))

    debug = _api_util.debug_info("shard_map", body, tuple(args), {}).with_unknown_names()
    params = dict(subfuns=(fun,), mesh=mesh, in_specs=tuple(in_specs), check_vma=check_vma,
                  newly_manual_axes=newly_manual_axes, debug_info=debug)
    out = SHARD_MAP.bind_with_trace(trace, tuple(args), [_core.typeof(x) for x in args],
                                    params)
    return list(out.vals)


def varying_axes(x: Any) -> frozenset:
    """The mesh axes ``x`` varies over inside ``shard_map(check_vma=True)`` (its ``vma``)."""
    mat = getattr(aval_of(x), "mat", None)
    return mat.varying if mat is not None else frozenset()


def checking_vma() -> bool:
    """Whether the code being traced is a ``shard_map(check_vma=True)`` body."""
    return bool(_config._check_vma.value)


def pvary(x: Any, axes: Sequence[Any]) -> Any:
    """Cast ``x`` to varying over those of ``axes`` it is not yet varying over (JAX's
    ``pvary``: a no-op on values; nothing outside a check_vma body)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return _core.pvary(x, missing) if missing and checking_vma() else x


def spec_axes(spec: Any) -> frozenset:
    """The mesh axes a PartitionSpec shards over."""
    return _shard_map._spec_to_vma(spec)


def residual_spec(x: Any, mesh: Any, check_vma: bool, manual_axes: Any) -> Any:
    """The PartitionSpec that carries a per-device value ``x`` (with a new leading axis of
    size 1) out of a shard_map and back into another: sharded on that axis over the manual
    axes it varies over (all of them when ``check_vma=False``: nothing is known)."""
    names = tuple(n for n in mesh.axis_names if n in manual_axes
                  and (not check_vma or n in varying_axes(x)))
    return _P(names) if names else _P()


@contextlib.contextmanager
def outside_traces() -> Any:
    """Evaluate concretely on no mesh, even inside an eager ``shard_map`` body (where
    ``jax.ensure_compile_time_eval`` still yields per-device tracers): for constants that are
    made once and cached."""
    with set_current_trace(_core.EvalTrace()), jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((), ())):
        yield


def ct_spec(spec: Any) -> Any:
    """The PartitionSpec of a cotangent of a value with PartitionSpec ``spec``."""
    return spec.to_ct_spec()

# -- where code runs: trace nesting, jit boundaries, known primitives -------------------------
def jit_between(inner: Any, outer: Any) -> str | None:
    """The function name of a ``jax.jit`` being traced between ``inner`` (the current trace)
    and ``outer`` (a trace current earlier), or None if ``outer`` is reached first (or neither
    is found). A context entered at ``outer`` is then outside that jit's cached program."""
    trace, seen = inner, 0
    while trace is not None and seen < 256:
        if trace is outer:
            return None
        info = getattr(getattr(trace, "frame", None), "debug_info", None)
        if getattr(info, "traced_for", None) == "jit":
            return str(getattr(info, "func_src_info", "") or "a jitted function").split(" ")[0]
        trace = getattr(trace, "parent_trace", None) or getattr(trace, "parent", None)
        seen += 1
    return None


def primitive_names(everywhere: bool = False) -> frozenset[str]:
    """Names of the primitives defined in JAX's modules (``everywhere``: in every loaded
    module, so users' own primitives count too)."""
    import sys

    names = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (everywhere or name.startswith("jax")):
            continue
        try:
            values = list(vars(module).values())
        except TypeError:  # pragma: no cover - a module without __dict__
            continue
        names.update(v.name for v in values if isinstance(v, _core.Primitive))
    return frozenset(names)
# -- user-written derivative rules inside a program (jaxprop.testing) ----------------------
_JAX_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                  for m in (jax, __import__("jaxlib")))


def custom_rules_outside_jax(closed: Any) -> list[str]:
    """``'fn at file:line'`` for each ``custom_jvp`` / ``custom_vjp`` function in ``closed``
    (a ClosedJaxpr, nested jaxprs included) that was defined outside JAX's own source."""
    found: list[str] = []

    def walk(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("custom_jvp_call", "custom_vjp_call"):
                info = getattr(eqn.params["call_jaxpr"].jaxpr, "debug_info", None)
                where = getattr(info, "func_src_info", None) or "?"
                path = where.rpartition(" at ")[2]
                if not os.path.abspath(path.rpartition(":")[0] or path).startswith(_JAX_DIRS):
                    found.append(where)
            for sub in _core.subjaxprs(jaxpr):
                walk(sub)

    walk(closed.jaxpr)
    return list(dict.fromkeys(found))
