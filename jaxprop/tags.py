"""Gradients of intermediate values: ``tag(h, "h1")`` in the model, ``∂L/∂h1`` out.

``tag`` is an identity primitive. jaxprop records it like any other node; its rule passes the
cotangent through unchanged and, while :func:`grad_and_tags` is sweeping, hands that
cotangent — the total gradient of the tagged value — to the caller::

    def loss(params, x):
        h = jaxprop.tag(jnp.tanh(x @ params["w1"]), "h1")
        return jnp.sum((h @ params["w2"]) ** 2)

    grads, tags = jaxprop.grad_and_tags(loss)(params, x)   # tags["h1"] = ∂L/∂h1

Outside :func:`grad_and_tags` a tag does nothing (under ``jax.grad``, ``jax.jit`` and
``jax.vmap`` too), so tags can stay in a model. Tags inside ``scan``/``cond``/``while``
bodies are not collected (tag the loop's outputs instead).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from jax.tree_util import tree_flatten, tree_unflatten

from jaxprop import _jax, api
from jaxprop.registry import Node
from jaxprop.tracer import JaxpropTrace, handler, is_differentiable

__all__ = ["grad_and_tags", "tag", "value_and_grad_and_tags"]

tag_p = _jax.identity_primitive("tag", lambda ct, **params: ct)


class _Collector:
    """Tags seen while recording (name -> structure and avals) and cotangents swept."""

    def __init__(self, parent: Any) -> None:
        self.parent = parent  # the trace grad_and_tags was called on: its tape's parent
        self.seen: dict[str, tuple[Any, list[Any]]] = {}
        self.cts: dict[tuple[str, int], Any] = {}
        self.inner: set[str] = set()  # tags recorded on inner tapes (loop bodies): unsupported

    def note(self, params: dict, aval: Any) -> None:
        name, index = params["name"], params["index"]
        treedef, avals = self.seen.setdefault(name, (params["treedef"], [None] * params["count"]))
        avals[index] = aval

    def add(self, params: dict, ct: Any) -> None:
        key = (params["name"], params["index"])
        if key in self.cts:
            raise ValueError(f"jaxprop.tag name '{key[0]}' was given to more than one value; "
                             "use a distinct name for each tagged value.")
        self.cts[key] = ct

    def result(self) -> dict[str, Any]:
        for name in sorted(self.inner - set(self.seen)):
            raise ValueError(
                f"jaxprop.tag '{name}' is inside a scan/cond/while body (or another inner "
                "tape), whose gradients grad_and_tags cannot return; tag a value outside the "
                "loop instead, e.g. the stacked outputs of the scan.")
        out = {}
        for name, (treedef, avals) in self.seen.items():
            leaves = []
            for i, aval in enumerate(avals):
                ct = self.cts.get((name, i))
                leaves.append(ct if ct is not None else
                              jnp.zeros(aval.shape, aval.dtype) if aval is not None else None)
            out[name] = tree_unflatten(treedef, leaves)
        return out


_COLLECTORS: list[_Collector] = []


def tag(x: Any, name: str) -> Any:
    """Return ``x`` unchanged, marked so that :func:`grad_and_tags` returns ``∂L/∂x`` as
    ``tags[name]``. ``x`` may be a pytree; its floating leaves are tagged.

    A value that does not depend on the differentiated inputs (an input batch, a constant)
    can be tagged too: its gradient is still returned (saliency maps) — except inside a
    function you wrapped in ``jax.jit``, where such a tag is traced before jaxprop sees it.

    >>> f = lambda w, x: jnp.sum(jaxprop.tag(x * w, "h") ** 2)
    >>> jaxprop.grad_and_tags(f)(2.0, 3.0)   # (36.0, {'h': 12.0})
    """
    leaves, treedef = tree_flatten(x)
    trace = _jax.get_current_trace()
    count = len(leaves)
    out = []
    for i, v in enumerate(leaves):
        if not is_differentiable(_jax.aval_of(v)):
            out.append(v)
            continue
        if isinstance(trace, JaxpropTrace) and trace.unwrap(v)[1] is None:
            v = trace.new_input(v)  # a constant: give it a slot so its cotangent is swept
        out.append(tag_p.bind(v, name=name, index=i, count=count, treedef=treedef))
    return tree_unflatten(treedef, out)


def _tag_rule(node: Node, cts: Sequence[Any]) -> list[Any]:
    """tag: identity (ct passes through); the cotangent is also handed to the collector."""
    if _COLLECTORS:
        _COLLECTORS[-1].add(node.params, cts[0])
    return [cts[0]]


@handler("tag")
def _record_tag(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any],
                params: dict) -> Any:
    """Record the tag node and tell the active collector which tags exist (for zeros)."""
    values, slots = zip(*map(trace.unwrap, tracers))
    out = _jax.bind_on(trace.parent, primitive, values, params)
    if not _COLLECTORS:
        return trace.record(primitive, params, values, slots, out, _pass_rule)
    collector = _COLLECTORS[-1]
    if trace.parent is not collector.parent:  # an inner tape: a loop body, a nested grad
        collector.inner.add(params["name"])
        return trace.record(primitive, params, values, slots, out, _pass_rule)
    collector.note(params, _jax.aval_of(values[0]))
    return trace.record(primitive, params, values, slots, out, _tag_rule)


def _pass_rule(node: Node, cts: Sequence[Any]) -> list[Any]:
    """tag outside grad_and_tags: identity."""
    return [cts[0]]


def value_and_grad_and_tags(fun: Callable, argnums: int | Sequence[int] = 0,
                            has_aux: bool = False, **kwargs: Any) -> Callable:
    """Like :func:`jaxprop.value_and_grad`, also returning the gradients of tagged values.

    Returns ``(value, (grads, tags))`` (``((value, aux), (grads, tags))`` with ``has_aux``),
    where ``tags`` maps each :func:`tag` name to ``∂L/∂value`` (zeros for a tagged value the
    output does not depend on). Works eagerly and under ``jax.jit``.
    """
    vg = api.value_and_grad(fun, argnums, has_aux, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args: Any, **kw: Any) -> Any:
        collector = _Collector(_jax.get_current_trace())
        _COLLECTORS.append(collector)
        try:
            value, grads = vg(*args, **kw)
        finally:
            _COLLECTORS.remove(collector)
        return value, (grads, collector.result())

    return wrapped


def grad_and_tags(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                  **kwargs: Any) -> Callable:
    """Like :func:`jaxprop.grad`, returning ``(grads, tags)`` with ``tags[name] = ∂L/∂value``
    for every :func:`tag` in ``fun`` (``((grads, tags), aux)`` with ``has_aux``).

    >>> def loss(w, x):
    ...     h = jaxprop.tag(jnp.tanh(w * x), "h")
    ...     return h ** 2
    >>> grads, tags = jaxprop.grad_and_tags(loss)(0.5, 1.0)   # tags["h"] = 2 tanh(0.5)
    """
    vgt = value_and_grad_and_tags(fun, argnums, has_aux, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args: Any, **kw: Any) -> Any:
        value, grads_and_tags = vgt(*args, **kw)
        return (grads_and_tags, value[1]) if has_aux else grads_and_tags

    return wrapped
