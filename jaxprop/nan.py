"""Where did the NaN come from? The first node of the reverse sweep whose gradient turns bad.

A NaN (or inf) in a gradient is born at one node — ``sqrt`` at 0 sends ``ct / (2·0)``, ``log``
at 0 behind a ``jnp.where`` sends ``0 / 0`` — and then spreads to everything below it. The
sweep visits nodes from the loss down, so the first node whose *downstream* cotangent is not
finite, while its upstream one was, is the origin. :func:`find_nan_origin` reports it with
the forward values it saw and the user's ``file:line``; it also names the first node whose
*forward* output went non-finite, since a NaN loss starts there.

Works eagerly and under ``jax.jit``: the report is a pytree of flags and small summaries,
so ``jax.jit(lambda p: jaxprop.find_nan_origin(loss, p, batch))(params)`` returns it and
``print(report)`` reads it outside.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop import _jax
from jaxprop.explain import format_value, record_and_sweep, short_source
from jaxprop.registry import Node

__all__ = ["NanReport", "find_nan_origin"]

# Arrays up to this size travel whole into the report; larger ones as a summary vector.
_FULL = 16
_SUMMARY = ("min", "max", "norm", "nan", "inf", "zeros")


def _nonfinite(values: Sequence[Any]) -> Any:
    """True if any floating array among ``values`` (None = zero) has a NaN or inf."""
    flags = [jnp.logical_not(jnp.all(jnp.isfinite(v))) for v in values
             if v is not None and jnp.issubdtype(_jax.aval_of(v).dtype, jnp.inexact)]
    return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


def _compact(x: Any) -> Any:
    """A whole small array, or (min, max, norm, #nan, #inf, #zeros) of a large one."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.size <= _FULL or not jnp.issubdtype(x.dtype, jnp.inexact):
        return x if x.size <= _FULL else None
    a = jnp.abs(x) if jnp.iscomplexobj(x) else x
    finite = jnp.isfinite(a)
    big = jnp.finfo(a.dtype).max
    return jnp.stack([jnp.min(jnp.where(finite, a, big)), jnp.max(jnp.where(finite, a, -big)),
                      jnp.sqrt(jnp.sum(jnp.where(finite, a, 0) ** 2)),
                      jnp.sum(jnp.isnan(a)).astype(a.dtype), jnp.sum(jnp.isinf(a)).astype(a.dtype),
                      jnp.sum(a == 0).astype(a.dtype)]).astype(jnp.float32)


@jax.tree_util.register_pytree_node_class
class NanReport:
    """Per-node flags and value summaries of one sweep; ``str()`` names the origin.

    ``found``: whether some gradient went non-finite. ``primitive``, ``source``
    ('path/file.py:line (fn)'), ``file`` (the full path), ``line``: the origin node (None if
    not found). Printed, sources show the file name only, as in ``explain``'s tables.
    ``forward_origin``: the same for the first node whose forward output is non-finite.
    """

    def __init__(self, static: list[dict], bad_in: Any, bad_out: Any, bad_fwd: Any,
                 payload: list) -> None:
        self.static = static
        self.bad_in, self.bad_out, self.bad_fwd = bad_in, bad_out, bad_fwd
        self.payload = payload

    def tree_flatten(self) -> tuple[list, Any]:
        return [self.bad_in, self.bad_out, self.bad_fwd, self.payload], _Static(self.static)

    @classmethod
    def tree_unflatten(cls, aux: _Static, children: list) -> NanReport:
        return cls(aux.value, *children)

    # -- the answer ----------------------------------------------------------------------
    def _first(self, flags: Any, order: Sequence[int]) -> int | None:
        flags = np.asarray(flags)
        for i in order:
            if flags[i]:
                return i
        return None

    @property
    def origin(self) -> int | None:
        """Index (in sweep order) of the first node whose downstream cotangent is not finite."""
        return self._first(self.bad_in, range(len(self.static)))

    @property
    def found(self) -> bool:
        return self.origin is not None

    def _field(self, key: str) -> Any:
        i = self.origin
        return None if i is None else self.static[i][key]

    primitive = property(lambda self: self._field("primitive"))
    source = property(lambda self: self._field("source"))
    file = property(lambda self: self._field("file"))
    line = property(lambda self: self._field("line"))

    @property
    def forward_origin(self) -> dict | None:
        """The first node in forward order whose output is NaN/inf (None if all finite)."""
        order = sorted(range(len(self.static)), key=lambda i: self.static[i]["index"])
        i = self._first(self.bad_fwd, order)
        return None if i is None else self.static[i]

    def __bool__(self) -> bool:
        return self.found

    def __str__(self) -> str:
        try:
            i = self.origin
        except (TypeError, jax.errors.ConcretizationTypeError):
            return f"<NanReport of {len(self.static)} nodes: return it from jax.jit to read it>"
        fwd = self.forward_origin
        lines = []
        if i is None:
            lines.append(f"No NaN/inf in the gradient ({len(self.static)} nodes checked).")
        else:
            s = self.static[i]
            lines.append(f"The gradient first becomes NaN/inf at {s['primitive']} "
                         f"(node {s['index']}), {_where(s)}")
            if np.asarray(self.bad_out)[i]:
                lines.append("  (its upstream gradient was already non-finite: the output "
                             "cotangent you passed in is)")
            lines += node_lines(s["in_names"], s["out_names"], s["descs"], self.payload[i])
            lines.append(f"  {int(np.sum(np.asarray(self.bad_in)))} of {len(self.static)} "
                         "nodes send non-finite gradients below.")
        if fwd is not None:
            lines.append(f"The forward pass first produces NaN/inf at {fwd['primitive']} "
                         f"(node {fwd['index']}), {_where(fwd)}.")
        return "\n".join(lines)

    __repr__ = __str__


class _Static:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def pack_node(node: Node, cts_out: Sequence[Any], cts_in: Sequence[Any]
              ) -> tuple[list[Any], tuple, tuple]:
    """(the cotangents of the inputs that want one, static descriptions, arrays) of a swept
    node's inputs, outputs, upstream and downstream cotangents, as :func:`_pack` keeps them."""
    wanted = [ct if s is not None else None for ct, s in zip(cts_in, node.in_slots)]
    packed = [[_pack(v) for v in group] for group in (node.inputs, node.outputs, cts_out, wanted)]
    return (wanted, tuple(tuple(d for d, _ in group) for group in packed),
            tuple(tuple(a for _, a in group) for group in packed))


def node_lines(in_names: Sequence[Any], out_names: Sequence[Any], descs: tuple,
               payload: tuple) -> list[str]:
    """A node's forward inputs and outputs and its cotangents, one line each (packed by
    :func:`_pack`: ``descs`` and ``payload`` hold inputs, outputs, upstream, downstream)."""
    (d_ins, d_outs, d_up, d_down), (ins, outs, up, down) = descs, payload
    return ([f"  input  {n or 'const'} = {_show(d, v)}" for n, d, v in zip(in_names, d_ins, ins)]
            + [f"  output {n} = {_show(d, v)}" for n, d, v in zip(out_names, d_outs, outs)]
            + [f"  upstream ∂L/∂out = {', '.join(map(_show, d_up, up))}",
               f"  downstream ∂L/∂in = {', '.join(map(_show, d_down, down))}"])
def _where(node: dict) -> str:
    """'file.py:12 (fn)', as explain prints it."""
    return short_source(node["source"]) or "source unknown"


def _show(desc: Any, v: Any) -> str:
    """Text for a packed value: ``desc`` is (kind, shape) from :func:`_pack`."""
    if desc is None:
        return "0"
    kind, shape = desc
    if kind == "omitted":
        return f"[{','.join(map(str, shape))}] (not kept)"
    if kind == "full":
        return format_value(v, max_full=_FULL)
    vals = dict(zip(_SUMMARY, np.asarray(v).tolist()))
    extra = "".join(f" {k}={int(vals[k])}" for k in ("nan", "inf", "zeros") if vals[k])
    finite = vals["nan"] + vals["inf"] < np.prod(shape)
    span = f" min={vals['min']:.4g} max={vals['max']:.4g}" if finite else ""
    return f"[{','.join(map(str, shape))}]{span} ‖finite‖={vals['norm']:.4g}{extra}"


def find_nan_origin(f: Callable, *args: Any, argnums: int | Sequence[int] | None = None,
                    cotangent: Any = None) -> NanReport:
    """Sweep ``f``'s gradient at ``args`` and report where it first becomes NaN or inf.

    Differentiates every floating input (or those of ``argnums``); a non-scalar output is
    seeded with ones unless ``cotangent`` is given. The report names the primitive, its forward
    inputs and outputs, its upstream and downstream gradients, and the user's file:line.

    >>> def loss(x):
    ...     y = jnp.sqrt(x)          # ∂/∂x = 1/(2√x) = inf at 0
    ...     return jnp.sum(y)
    >>> report = jaxprop.find_nan_origin(loss, jnp.array([0.0, 1.0]))
    >>> report.primitive, report.line   # ('sqrt', <the line of jnp.sqrt>)
    >>> print(report)
    """
    seen: list[tuple[Node, Any, Any, tuple]] = []

    def observe(node: Node, cts_out: Sequence, cts_in: Sequence) -> None:
        wanted, descs, payload = pack_node(node, cts_out, cts_in)
        seen.append((node, _nonfinite(wanted), _nonfinite(cts_out), (descs, payload)))

    rec = record_and_sweep(f, args, argnums, cotangent, observe)
    index = {id(n): i for i, n in enumerate(rec["nodes"])}
    names = rec["names"]
    static = []
    for node, _, _, (descs, _) in seen:
        frame = _jax.source_frame(node.source)
        static.append(dict(descs=descs,
            index=index[id(node)], primitive=node.name, source=_jax.source_summary(node.source),
            file=frame[0] if frame else None, line=frame[1] if frame else None,
            in_names=tuple(names.get(s) if s is not None else None for s in node.in_slots),
            out_names=tuple(names.get(s, "_") for s in node.out_slots)))
    stack = lambda xs: jnp.stack(xs) if xs else jnp.zeros((0,), bool)  # noqa: E731
    bad_fwd = stack([_nonfinite(n.outputs) & ~_nonfinite(n.inputs) for n, *_ in seen])
    return NanReport(static, stack([b for _, b, _, _ in seen]),
                     stack([b for _, _, b, _ in seen]), bad_fwd, [p for *_, (_, p) in seen])


def _pack(v: Any) -> tuple[Any, Any]:
    """What the report keeps of a value: (("full", shape), array) if small,
    (("summary", shape), summary vector) if large and floating; (None, None) for a zero."""
    if v is None:
        return None, None
    shape = tuple(jnp.shape(v))
    c = _compact(v)
    if c is None:
        return ("omitted", shape), None
    return ("full" if c.shape == shape and jnp.size(v) <= _FULL else "summary", shape), c
