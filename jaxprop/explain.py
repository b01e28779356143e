"""Explain a gradient: the recorded graph with forward values and cotangents at every node.

``jaxprop.explain(f, *args)`` runs ``f`` on a tape, sweeps it backwards and keeps, for each
node, what the seeds' circuit diagrams show: the forward values on its inputs and outputs,
its *local* gradient (for elementwise gates), the *upstream* gradient ∂L/∂out arriving from
above and the *downstream* gradients ∂L/∂in it sends on. ``print(...)`` gives a table;
``.to_dot()`` a Graphviz graph with values (green) and gradients (red) on the edges;
``.render("graph.svg")`` draws it when Graphviz's ``dot`` is installed.

Large models: ``collapse="line"`` (one group per source line), ``"scope"`` (``jax.named_scope``;
Flax linen modules push their names there, so it is also the module path), or a function of
the row. Under ``jax.jit`` the values are tracers — printing shows shapes only — but the
explanation is a pytree: return it from the jitted function and print it outside.
"""

from __future__ import annotations

import html
import inspect
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr, tree_flatten_with_path, tree_unflatten

from jaxprop import _jax
from jaxprop.registry import Node
from jaxprop.sweep import backward
from jaxprop.tracer import inlining, is_differentiable, run_traced

__all__ = ["Explanation", "explain", "record_and_sweep"]

# Gates whose Jacobian is diagonal: local gradient = the rule applied to a cotangent of ones.
ELEMENTWISE = frozenset("""
    add add_any sub mul div neg rem max min exp exp2 log log1p expm1 logistic tanh sqrt rsqrt
    cbrt square integer_pow pow sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh
    abs select_n clamp convert_element_type reduce_precision copy copy_p erf erfc erf_inv
    lgamma digamma tag hook""".split())

NO_GRADIENT = "—"  # shown for constants: no gradient flows there (a zero one is "0")

SYMBOLS = {"add": "+", "add_any": "+", "sub": "−", "mul": "×", "div": "÷", "neg": "−x"}


# -- recording and sweeping with an observer ----------------------------------------------
def record_and_sweep(f: Callable, args: Sequence[Any], argnums: int | Sequence[int] | None,
                     cotangent: Any, observer: Callable | None) -> dict:
    """Trace ``f(*args)`` on a tape and sweep it, calling ``observer`` after each node.

    Differentiates the floating leaves of ``args[argnums]`` (all arguments if None), seeded
    with ``cotangent`` (ones shaped like the output if None). Returns a dict with ``nodes``,
    ``names`` (slot -> readable name), ``out`` (output values), ``out_slots``, ``in_slots``,
    ``in_values``, ``seeds``, ``grads`` (cotangents of the input slots) and ``arg_grads``
    (the gradients shaped like ``args[argnums]``: one pytree for an int ``argnums``, else a
    tuple over the differentiated arguments; None at leaves that are not differentiable).
    """
    nums = range(len(args)) if argnums is None else (
        (argnums,) if isinstance(argnums, int) else tuple(argnums))
    arg_names = _argument_names(f, len(args))
    flat, names_of_leaves = [], []
    for i, a in enumerate(args):
        for path, leaf in tree_flatten_with_path(a)[0]:
            flat.append((i, leaf))
            names_of_leaves.append(arg_names[i] + keystr(path))
    diff = [i in nums and _differentiable_leaf(x) for i, x in flat]
    values = [jnp.asarray(x) for (_, x), d in zip(flat, diff) if d]
    treedefs = [jax.tree_util.tree_structure(a) for a in args]

    def flat_fun(*tracers: Any) -> Any:
        it = iter(tracers)
        leaves_in = [next(it) if d else x for (_, x), d in zip(flat, diff)]
        rebuilt, k = [], 0
        for td in treedefs:
            rebuilt.append(tree_unflatten(td, leaves_in[k:k + td.num_leaves]))
            k += td.num_leaves
        return f(*rebuilt)

    with inlining():  # see inside jitted calls, one node per primitive
        trace, tracers, result = run_traced(flat_fun, values)
    out_leaves, out_tree = jax.tree_util.tree_flatten(result)
    out_values, out_slots = (zip(*map(trace.unwrap, out_leaves)) if out_leaves else ((), ()))
    if cotangent is None:
        seeds = [jnp.ones(jnp.shape(o), _jax.aval_of(o).dtype) if s is not None else None
                 for o, s in zip(out_values, out_slots)]
    else:
        seeds = jax.tree_util.tree_leaves(cotangent)
    in_slots = [t.slot for t in tracers]
    grads = backward(trace.nodes, out_slots, seeds, in_slots, observer=observer)
    leaf_grads, it = [], iter(zip(grads, values))
    for d in diff:
        g, v = next(it) if d else (None, None)
        leaf_grads.append(None if not d else g if g is not None else jnp.zeros_like(v))
    arg_grads, start = [], 0
    for td in treedefs:
        arg_grads.append(tree_unflatten(td, leaf_grads[start:start + td.num_leaves]))
        start += td.num_leaves
    arg_grads = (arg_grads[argnums] if isinstance(argnums, int)
                 else tuple(arg_grads[i] for i in nums))
    names = {}
    it = iter(in_slots)
    for name, d in zip(names_of_leaves, diff):
        if d:
            names[next(it)] = name
    _name_intermediates(trace.nodes, names, out_slots)
    return dict(nodes=trace.nodes, names=names, out=jax.tree_util.tree_unflatten(
        out_tree, list(out_values)), out_slots=tuple(out_slots), in_slots=in_slots,
        in_values=values, seeds=seeds, grads=grads, arg_grads=arg_grads)


def _differentiable_leaf(x: Any) -> bool:
    """A floating array (or scalar); other leaves (functions in Equinox modules…) pass as is."""
    try:
        return is_differentiable(_jax.aval_of(x))
    except TypeError:
        return False


def _argument_names(f: Callable, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(f).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if params and len(params) >= n:
        return [p.name for p in params[:n]]
    return [f"arg{i}" for i in range(n)]


def _name_intermediates(nodes: Sequence[Node], names: dict, out_slots: Sequence) -> None:
    """Tags keep their names, outputs are 'out', the rest 'v1', 'v2', … in tape order."""
    finals = [s for s in out_slots if s is not None]
    for k, s in enumerate(finals):
        names.setdefault(s, "out" if len(finals) == 1 else f"out{k}")
    count = 0
    for node in nodes:
        for s in node.out_slots:
            if s is None or s in names:
                continue
            if node.name == "tag":
                names[s] = node.params["name"] + (
                    f"[{node.params['index']}]" if node.params["count"] > 1 else "")
            else:
                count += 1
                names[s] = f"v{count}"


# -- the explanation ------------------------------------------------------------------------
@jax.tree_util.register_pytree_node_class
class Explanation:
    """Every node of a recorded gradient with its values; see :func:`explain`.

    ``rows``: one dict per node, in tape (forward) order, with static keys ``index``,
    ``primitive``, ``params``, ``source`` ('file:line (fn)'), ``line``, ``scope``,
    ``in_names`` / ``out_names`` (None for constants) and array keys ``inputs``, ``outputs``,
    ``upstream`` (∂L/∂out), ``downstream`` (∂L/∂in), ``local`` (∂out/∂in, elementwise only;
    None for constant inputs). ``grads``: the gradients shaped like the differentiated
    arguments, as ``jax.grad`` returns them (one pytree for an int ``argnums``, else a tuple;
    None at leaves that are not differentiable), ready for optax or ``jax.tree.map``.
    ``named_grads`` maps input names (``"p['w']"``) to the same arrays.
    """

    _ARRAYS = ("inputs", "outputs", "upstream", "downstream", "local")

    def __init__(self, rows: list[dict], grads: Any, named_grads: dict, seeds: dict,
                 collapse: Any = None, max_full: int = 6) -> None:
        self.rows = rows
        self.grads = grads
        self.named_grads = named_grads
        self.seeds = seeds
        self.collapse = collapse
        self.max_full = max_full

    def tree_flatten(self) -> tuple[list, Any]:
        arrays = [tuple(r[k] for k in self._ARRAYS) for r in self.rows]
        static = [{k: v for k, v in r.items() if k not in self._ARRAYS} for r in self.rows]
        return [arrays, self.grads, self.named_grads, self.seeds], _Static((
            static, self.collapse, self.max_full))

    @classmethod
    def tree_unflatten(cls, aux: _Static, children: list) -> Explanation:
        static, collapse, max_full = aux.value
        arrays, grads, named_grads, seeds = children
        rows = [dict(s, **dict(zip(cls._ARRAYS, a))) for s, a in zip(static, arrays)]
        return cls(rows, grads, named_grads, seeds, collapse, max_full)

    # -- text ------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<Explanation of {len(self.rows)} nodes; print() it for the table>"

    def table(self, collapse: Any = "default", width: int | None = None) -> str:
        """The nodes (or collapsed groups) as a text table at most ``width`` characters wide
        (default: the terminal's width, 120 when there is no terminal; 0: no limit).

        Too wide a table shrinks its widest columns first: op lists wrap, value names keep
        their end ("…['Dense_0']['kernel']"), other cells are cut with "…".
        """
        collapse = self.collapse if collapse == "default" else collapse
        fmt = lambda x: format_value(x, self.max_full)  # noqa: E731
        width = terminal_width() if width is None else width
        if collapse is not None:  # an overview: summaries without min/max, as in graphs
            return self._group_table(collapse, lambda x: format_value(
                x, self.max_full, compact=True), width)
        header = ["#", "op", "output", "inputs", "local ∂out/∂in", "upstream ∂L/∂out",
                  "downstream ∂L/∂in", "source"]
        body = []
        for r in self.rows:
            body.append([
                str(r["index"]), r["primitive"] + (f" {r['params']}" if r["params"] else ""),
                "\n".join(f"{n} = {fmt(v)}" for n, v in zip(r["out_names"], r["outputs"])),
                "\n".join(f"{n or 'const'} = {fmt(v)}" for n, v in zip(r["in_names"],
                                                                         r["inputs"])),
                "\n".join(fmt(v) if s is not None else NO_GRADIENT
                          for v, s in zip(r["local"], r["in_slots"]))
                if r["local"] is not None else "",
                "\n".join(fmt(v) for v in r["upstream"]),
                "\n".join(fmt(v) if s is not None else NO_GRADIENT
                          for v, s in zip(r["downstream"], r["in_slots"])),
                short_source(r["source"])])
        grads = "\n".join(_fit(f"∂L/∂{n} = {fmt(g)}", width or 10**9, "end")
                          for n, g in self.named_grads.items())
        table = _render_table(header, body, width, wrap=(1,))
        return table + ("\n" + grads if grads else "")

    def _group_table(self, collapse: Any, fmt: Callable, width: int) -> str:
        """One row per group; its inputs ("in") and outputs ("out") one per line, each with
        its forward value and its gradient (summed over the group's uses)."""
        header = ["group", "ops", "", "value", "forward", "gradient ∂L/∂value"]
        body = []
        for key, g in self.groups(collapse).items():
            crossing = ([("in", n, v, g["downstream"][n]) for n, v in g["in"].items()]
                        + [("out", n, v, g["upstream"][n]) for n, v in g["out"].items()])
            body.append([key, g["ops"]] + ["\n".join(str(c[k]) if k < 2 else fmt(c[k])
                                                     for c in crossing) for k in range(4)])
        return _render_table(header, body, width, wrap=(1,), keep_end=(3,))

    # -- grouping ----------------------------------------------------------------------------
    def key_of(self, collapse: Any) -> Callable[[dict], str]:
        """The grouping function for ``collapse``: "line", "scope"/"module", ("scope", depth),
        or a function of a row."""
        if callable(collapse):
            return collapse
        if collapse == "line":
            return lambda r: short_source(r["source"]) or "?"
        if collapse in ("scope", "module"):
            return lambda r: r["scope"] or "(top level)"
        if isinstance(collapse, tuple) and collapse[0] in ("scope", "module"):
            depth = collapse[1]
            return lambda r: "/".join(r["scope"].split("/")[:depth]) or "(top level)"
        raise ValueError(f"collapse must be 'line', 'scope', 'module', ('scope', depth) or a "
                         f"function of a row, not {collapse!r}.")

    def groups(self, collapse: Any) -> dict[str, dict]:
        """Nodes grouped by ``collapse``: their ops and the values crossing the group's edge."""
        key = self.key_of(collapse)
        producer = {s: key(r) for r in self.rows for s in r["out_slots"] if s is not None}
        groups: dict[str, dict] = {}
        for r in self.rows:
            g = groups.setdefault(key(r), dict(ops={}, **{k: {} for k in (
                "in", "out", "upstream", "downstream")}, slots_out={}))
            g["ops"][r["primitive"]] = g["ops"].get(r["primitive"], 0) + 1
            for n, v, s, d in zip(r["in_names"], r["inputs"], r["in_slots"], r["downstream"]):
                if s is not None and producer.get(s) != key(r):
                    g["in"][n] = v
                    g["downstream"][n] = _add(g["downstream"].get(n), d)
            for n, v, s, u in zip(r["out_names"], r["outputs"], r["out_slots"], r["upstream"]):
                g["slots_out"][s] = (n, v, u)
        consumed_outside = {s for r in self.rows for s in r["in_slots"]
                            if s is not None and producer.get(s) not in (None, key(r))}
        finals = set(self.seeds)
        for g in groups.values():
            for s, (n, v, u) in g.pop("slots_out").items():
                if s in consumed_outside or s in finals:
                    g["out"][n], g["upstream"][n] = v, u
            g["ops"] = ", ".join(f"{p}×{c}" if c > 1 else p for p, c in g["ops"].items())
        return groups

    # -- graphs ------------------------------------------------------------------------------
    def to_dot(self, collapse: Any = "default", rankdir: str | None = None,
               legend: bool = True) -> str:
        """Graphviz DOT source: values (green, above) and gradients (red, below) on edges.

        Each edge carries the value flowing along it and the gradient flowing back along it
        (for collapsed groups: summed over the group's uses of the value). Nodes recorded under
        a ``jax.named_scope`` / Flax module are drawn inside a box labelled with its path.
        ``rankdir``: "LR" (left to right, the seeds' circuit diagrams) or "TB" (top to bottom);
        by default LR for at most 12 nodes, TB for larger graphs so that they stay readable.
        ``legend`` adds a box saying what the colours and shapes mean.
        """
        collapse = self.collapse if collapse == "default" else collapse
        fmt = lambda x: format_value(x, self.max_full, compact=True)  # noqa: E731
        count = len(self._input_slots()) + (len(self.rows) if collapse is None
                                            else len(self.groups(collapse)))
        rankdir = rankdir or ("LR" if count <= 12 else "TB")
        lines = ["digraph gradient {", f"  rankdir={rankdir}; newrank=true;",
                 '  node [fontname="Helvetica", fontsize=11];',
                 '  edge [fontname="Helvetica", fontsize=10];']
        if legend:
            lines += _LEGEND
        if collapse is None:
            box = lambda r: f"n{r['index']}"  # noqa: E731
            scopes: dict[str, list[str]] = {}
            for r in self.rows:
                tip = html.escape(short_source(r["source"]), quote=True)
                label = _dq(SYMBOLS.get(r["primitive"], r["primitive"]))
                scopes.setdefault(r["scope"] or "", []).append(
                    f'{box(r)} [label="{label}", shape=circle, tooltip="{tip}"];')
            for k, (scope, nodes) in enumerate(scopes.items()):
                if scope:
                    lines.append(f'  subgraph cluster_{k} {{ label="{_dq(scope)}"; '
                                 'style="rounded,dashed"; color=gray50; fontname="Helvetica";')
                lines += [("    " if scope else "  ") + n for n in nodes]
                if scope:
                    lines.append("  }")
        else:
            key, ids = self.key_of(collapse), {}
            for r in self.rows:
                ids.setdefault(key(r), f"g{len(ids)}")
            box = lambda r: ids[key(r)]  # noqa: E731
            for k, gid in ids.items():
                lines.append(f'  {gid} [label="{_dq(str(k))}", shape=box, style=rounded];')
        producer = {s: box(r) for r in self.rows for s in r["out_slots"] if s is not None}
        for s, name in self._input_slots().items():
            producer[s] = f'"in:{_dq(name)}"'
            lines.append(f'  {producer[s]} [label="{_dq(name)}", shape=box];')
        edges: dict[tuple, list] = {}  # (source box, dest box, slot) -> [value, gradient]
        consts = 0
        for r in self.rows:
            for v, s, d in zip(r["inputs"], r["in_slots"], r["downstream"]):
                if s is None and collapse is None:
                    consts += 1
                    lines.append(f'  c{consts} [label="{_dq(fmt(v))}", shape=plaintext];')
                    lines.append(f"  c{consts} -> {box(r)};")
                elif s is not None and producer.get(s, box(r)) != box(r):
                    e = edges.setdefault((producer[s], box(r), s), [v, None])
                    e[1] = _add(e[1], d)
        names = self._slot_names()
        for s, ct in self.seeds.items():
            out = f'"out:{_dq(names.get(s, "out"))}"'
            lines.append(f'  {out} [label="{_dq(names.get(s, "out"))}", shape=doublecircle];')
            if s in producer:
                edges[(producer[s], out, s)] = [self._value_of(s), ct]
        placed = set()
        for (a, b, _), (v, g) in edges.items():
            grad = f"<br/>{_font('#c0392b', fmt(g))}" if g is not None else ""
            lines.append(f"  {a} -> {b} [label=<{_font('#1a7f37', fmt(v))}{grad}>];")
            if rankdir == "TB" and a.startswith('"in:') and a not in placed:
                placed.add(a)  # an input beside its first use, not all in one top row
                lines.append(f"  {{ rank=same; {a}; {b}; }}")
        lines.append("}")
        return "\n".join(lines)

    def render(self, path: str | os.PathLike, collapse: Any = "default",
               **dot_options: Any) -> str:
        """Draw the graph with Graphviz's ``dot`` into ``path`` (format from its suffix:
        .svg, .png, .pdf); ``dot_options`` go to :meth:`to_dot` (``rankdir``, ``legend``).
        Raises RuntimeError if ``dot`` is not installed."""
        dot = shutil.which("dot")
        if dot is None:
            raise RuntimeError("Graphviz's `dot` program is not installed (apt install graphviz"
                               " / brew install graphviz); use .to_dot() for the DOT source.")
        path = os.fspath(path)
        fmt = os.path.splitext(path)[1].lstrip(".") or "svg"
        subprocess.run([dot, f"-T{fmt}", "-o", path],
                       input=self.to_dot(collapse, **dot_options).encode(),
                       check=True, capture_output=True)
        return path

    def _repr_svg_(self) -> str | None:  # pragma: no cover - Jupyter display
        dot = shutil.which("dot")
        if dot is None:
            return None
        return subprocess.run([dot, "-Tsvg"], input=self.to_dot().encode(),
                              capture_output=True, check=True).stdout.decode()

    # -- helpers -------------------------------------------------------------------------------
    def _slot_names(self) -> dict[int, str]:
        names = {}
        for r in self.rows:
            names.update({s: n for s, n in zip(r["in_slots"], r["in_names"]) if s is not None})
            names.update({s: n for s, n in zip(r["out_slots"], r["out_names"])
                          if s is not None})
        return names

    def _input_slots(self) -> dict[int, str]:
        produced = {s for r in self.rows for s in r["out_slots"]}
        names = self._slot_names()
        return {s: n for s, n in names.items() if s not in produced and n in self.named_grads}

    def _value_of(self, slot: int) -> Any:
        for r in self.rows:
            for s, v in zip(r["out_slots"], r["outputs"]):
                if s == slot:
                    return v
        return None


class _Static:
    """Static part of an explanation, compared by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def explain(f: Callable, *args: Any, argnums: int | Sequence[int] | None = None,
            cotangent: Any = None, collapse: Any = None, max_full: int = 6) -> Explanation:
    """Differentiate ``f`` at ``args`` and keep every node's values and gradients.

    All floating inputs are differentiated (or those of ``argnums``). A scalar output is seeded
    with 1; a non-scalar one with ones (the gradient of its sum) unless ``cotangent`` is given.
    Arrays with at most ``max_full`` elements are shown in full, larger ones as summaries
    (shape, norm, min/max, NaN/inf counts). ``collapse`` sets the default grouping ('line',
    'scope', 'module', ('scope', depth) or a function of a row).

    >>> e = jaxprop.explain(lambda x, y, z: (x + y) * z, -2.0, 5.0, -4.0)
    >>> print(e)             # add: out 3, upstream -4, downstream -4, -4; mul: …
    >>> e.grads              # (-4.0, -4.0, 3.0): shaped like the arguments, as jax.grad
    >>> e.named_grads        # {'x': -4.0, 'y': -4.0, 'z': 3.0}
    >>> e.render("graph.svg")
    """
    cts_by_node: dict[int, tuple] = {}

    def observe(node: Node, cts_out: Sequence, cts_in: Sequence) -> None:
        cts_by_node[id(node)] = (tuple(cts_out), tuple(cts_in))

    rec = record_and_sweep(f, args, argnums, cotangent, observe)
    names = rec["names"]
    rows = []
    for i, node in enumerate(rec["nodes"]):
        cts_out, cts_in = cts_by_node.get(id(node), ((None,) * len(node.outputs),
                                                     (None,) * len(node.inputs)))
        frame = _jax.source_frame(node.source)
        rows.append(dict(
            index=i, primitive=node.name, params=_params_summary(node.params),
            source=_jax.source_summary(node.source), line=frame[1] if frame else None,
            scope=_jax.source_scope(node.source),
            in_names=tuple(names.get(s) if s is not None else None for s in node.in_slots),
            out_names=tuple(names.get(s, "_") for s in node.out_slots),
            in_slots=node.in_slots, out_slots=node.out_slots,
            inputs=tuple(map(_as_array, node.inputs)), outputs=tuple(node.outputs),
            upstream=cts_out, downstream=_wanted(cts_in, node.in_slots),
            local=_local_gradient(node)))
        if rows[-1]["local"] is not None:  # a constant has no gradient: None, shown as —
            rows[-1]["local"] = _wanted(rows[-1]["local"], node.in_slots)
    named = {names[s]: (g if g is not None else jnp.zeros_like(v))
             for s, g, v in zip(rec["in_slots"], rec["grads"], rec["in_values"])}
    seeds = {s: c for s, c in zip(rec["out_slots"], rec["seeds"]) if s is not None}
    return Explanation(rows, rec["arg_grads"], named, seeds, collapse, max_full)


def _wanted(cts_in: Sequence, in_slots: Sequence) -> tuple:
    return tuple(ct if s is not None else None for ct, s in zip(cts_in, in_slots))


def _local_gradient(node: Node) -> tuple | None:
    """∂out/∂in for elementwise gates: the rule applied to a cotangent of ones (None if the
    input is broadcast or gets no gradient)."""
    if node.name not in ELEMENTWISE or len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    try:
        cts = node.rule(node, [jnp.ones(jnp.shape(out), _jax.aval_of(out).dtype)])
    except Exception:  # pragma: no cover - a rule that cannot take a ones cotangent
        return None
    return tuple(ct if ct is not None and jnp.shape(ct) == jnp.shape(out) else None
                 for ct in cts)


def _as_array(x: Any) -> Any:
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else jnp.asarray(x)


def _params_summary(params: dict) -> str:
    parts = []
    for k, v in params.items():
        if v is None or callable(v) or k in ("treedef", "sharding", "out_sharding",
                                               "accuracy", "precision", "count", "index"):
            continue
        if isinstance(v, (bool, int, float, str, tuple)) and len(repr(v)) <= 30:
            parts.append(f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}")
    return " ".join(parts)


# -- formatting -------------------------------------------------------------------------------
def format_value(x: Any, max_full: int = 6, compact: bool = False) -> str:
    """An array in full if small, else a summary; shape only for tracers; '0' for None.

    ``compact`` (graph labels) leaves out a small array's shape tag and a summary's min/max."""
    if x is None:
        return "0"
    aval = _jax.aval_of(x)
    shape = tuple(aval.shape)
    dtype = aval.dtype
    tag = f"{_dtype_name(dtype)}[{','.join(map(str, shape))}]"
    if isinstance(x, _jax.Tracer) and _jax.to_concrete_value(x) is None:
        return tag
    a = np.asarray(x)
    if dtype == _jax.float0:
        return "0"
    if a.size <= max_full:
        if a.ndim == 0:
            return _num(a[()])
        return "[" + ", ".join(_num(v) for v in a.ravel()) + "]" + (
            f" {tag}" if a.ndim > 1 and not compact else "")
    if not jnp.issubdtype(dtype, jnp.inexact):
        return f"{tag} min={a.min()} max={a.max()}"
    finite = a[np.isfinite(a)]
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    parts = [tag, f"‖·‖={_num(np.linalg.norm(finite.ravel()))}"]
    if finite.size and not np.iscomplexobj(a) and not compact:
        parts.append(f"[{_num(finite.min())}, {_num(finite.max())}]")
    if nan:
        parts.append(f"nan={nan}")
    if inf:
        parts.append(f"inf={inf}")
    return " ".join(parts)


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name if dtype != jnp.bfloat16 else "bf16"
    return {"float32": "f32", "float64": "f64", "float16": "f16", "int32": "i32",
            "int64": "i64", "bool": "bool", "complex64": "c64",
            "complex128": "c128"}.get(name, name)


def _num(v: Any) -> str:
    if isinstance(v, (complex, np.complexfloating)):
        return f"{complex(v):.4g}"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.4g}"


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if jnp.shape(a) != jnp.shape(b):
        return a
    return a + b


def _fit(text: str, width: int, keep: str) -> str:
    """``text`` cut to ``width`` characters with '…', keeping its "start" or its "end"."""
    if len(text) <= width:
        return text
    return text[:width - 1] + "…" if keep == "start" else "…" + text[len(text) - width + 1:]


def short_source(source: str) -> str:
    """'path/to/file.py:12 (fn)' -> 'file.py:12 (fn)': how jaxprop prints a source line."""
    head, _, rest = source.partition(":")
    return os.path.basename(head) + (":" + rest if rest else "")


def _font(color: str, text: str) -> str:
    return f'<font color="{color}">{html.escape(text)}</font>'


_LEGEND = [
    '  subgraph cluster_legend { label="legend"; fontname="Helvetica"; style=rounded; '
    'color=gray60;',
    '    legend [shape=plaintext, fontsize=10, label=<'
    '<font color="#1a7f37">value (forward)</font><br/>'
    '<font color="#c0392b">gradient ∂L/∂value (backward)</font><br/>'
    'circle: a primitive; box: an input or a group<br/>'
    'double circle: the output; dashed box: a scope>];',
    '  }']


def _dq(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def terminal_width() -> int:
    """Columns of the terminal (``$COLUMNS`` first); 120 when output is not a terminal."""
    return shutil.get_terminal_size((120, 24)).columns


def _render_table(header: list[str], body: list[list[str]], width: int = 0,
                  wrap: Sequence[int] = (), keep_end: Sequence[int] = ()) -> str:
    """A plain-text table at most ``width`` wide (0: no limit); cells may hold several lines.

    While too wide, ``wrap`` columns narrow first (down to 24), then the widest column loses a
    character at a time (down to 8). Cells of ``wrap`` columns wrap at spaces, lines of
    ``keep_end`` columns keep their end ('…' + tail), other lines their start (head + '…')."""
    natural = [max(len(line) for row in [header] + body for line in row[i].split("\n"))
               for i in range(len(header))]
    widths = list(natural)
    too_wide = lambda: width and sum(widths) + 2 * (len(widths) - 1) > width  # noqa: E731
    for i in wrap:
        while too_wide() and widths[i] > 24:
            widths[i] -= 1
    while too_wide() and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1
    split = []
    for row in [header] + body:
        cells = []
        for i, cell in enumerate(row):
            lines = cell.split("\n")
            if i in wrap and widths[i] < natural[i]:
                lines = [w for line in lines for w in (textwrap.wrap(line, widths[i]) or [""])]
            cells.append([_fit(line, widths[i], "end" if i in keep_end else "start")
                          for line in lines])
        split.append(cells)
    out = []
    for k, row in enumerate(split):
        height = max(len(c) for c in row)
        for j in range(height):
            out.append("  ".join((c[j] if j < len(c) else "").ljust(w)
                                 for c, w in zip(row, widths)).rstrip())
        if k == 0:
            out.append("  ".join("─" * w for w in widths))
    return "\n".join(out)

