"""Gradients of intermediate values: ``tag(h, "h1")`` in the model, ``∂L/∂h1`` out.

``tag`` is an identity primitive. jaxprop records it like any other node; its rule passes the
cotangent through unchanged and, while :func:`grad_and_tags` is sweeping, hands that
cotangent — the total gradient of the tagged value — to the caller::

    def loss(params, x):
        h = jaxprop.tag(jnp.tanh(x @ params["w1"]), "h1")
        return jnp.sum((h @ params["w2"]) ** 2)

    grads, tags = jaxprop.grad_and_tags(loss)(params, x)   # tags["h1"] = ∂L/∂h1

Outside :func:`grad_and_tags` a tag does nothing (under ``jax.grad``, ``jax.jit`` and
``jax.vmap`` too), so tags can stay in a model. A tag inside a ``lax.scan`` body gives a
per-step stack (leading axis: the steps), inside a traced ``cond`` the taken branch's
cotangent (zeros when another branch ran), inside a ``while_loop`` body (differentiable
eagerly, where it runs unrolled) a stack with one gradient per iteration. :class:`scope_tag` tags
what a named scope (a Flax module) sends out, without editing the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from jax.tree_util import tree_flatten, tree_unflatten

from jaxprop import _jax, api
from jaxprop.collect import COLLECTORS, STEPS, TagCollector
from jaxprop.registry import Node
from jaxprop.scopes import ScopedContext
from jaxprop.tracer import WATCHES, JaxpropTrace, handler, is_differentiable, outermost

__all__ = ["grad_and_tags", "scope_tag", "tag", "value_and_grad_and_tags"]

tag_p = _jax.identity_primitive("tag", lambda ct, **params: ct)


def tag(x: Any, name: str) -> Any:
    """Return ``x`` unchanged, marked so that :func:`grad_and_tags` returns ``∂L/∂x`` as
    ``tags[name]``. ``x`` may be a pytree; its floating leaves are tagged.

    A value that does not depend on the differentiated inputs (an input batch, a constant)
    can be tagged too: its gradient is still returned (saliency maps) — except inside a
    function you wrapped in ``jax.jit``, where such a tag is traced before jaxprop sees it.

    Only :func:`grad_and_tags` / :func:`value_and_grad_and_tags` return tags; under
    ``jaxprop.grad``, ``jax.grad``, ``jax.jit`` and ``jax.vmap`` a tag is the identity. Inside
    a ``lax.scan`` body ``tags[name]`` is stacked per step; see the module docstring.

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
    if COLLECTORS:
        COLLECTORS[-1].add((node.params["name"], node.params["index"]), cts[0],
                           node.params.get("step", ()))
    return [cts[0]]


@handler("tag")
def _record_tag(trace: JaxpropTrace, primitive: Any, tracers: Sequence[Any],
                params: dict) -> Any:
    """Record the tag node and tell the active collector which tags exist (for zeros)."""
    values, slots = zip(*map(trace.unwrap, tracers))
    out = _jax.bind_on(trace.parent, primitive, values, params)
    if not COLLECTORS:
        return trace.record(primitive, params, values, slots, out, _pass_rule)
    collector = COLLECTORS[-1]
    if outermost(trace).parent is not collector.root.parent:  # a gradient inside the loss
        collector.root.inner.add(params["name"])
        return trace.record(primitive, params, values, slots, out, _pass_rule)
    step = tuple(STEPS)
    collector.note((params["name"], params["index"]), params["treedef"], params["count"],
                   _jax.aval_of(values[0]), step)
    return trace.record(primitive, dict(params, step=step) if step else params, values, slots,
                        out, _tag_rule)


def _pass_rule(node: Node, cts: Sequence[Any]) -> list[Any]:
    """tag outside grad_and_tags: identity."""
    return [cts[0]]


class scope_tag(ScopedContext):
    """Tag the values a named scope sends out, without editing the model.

    Inside the block (or decorated function), every value computed under a ``jax.named_scope``
    / Flax module path matching ``scope`` (see :mod:`jaxprop.scopes`) and used by code
    outside that scope — the module's outputs — is tagged: :func:`grad_and_tags` returns
    ``tags[name]``, a list with ``∂L/∂value`` for each such value in the order they were
    first used outside::

        f = jaxprop.scope_tag("MLP/block1", "block1")(loss)
        grads, tags = jaxprop.grad_and_tags(f)(params, x)   # tags["block1"][0]: ∂L/∂out

    Flax nnx and Equinox modules get a scope with :func:`jaxprop.scoped`. It acts on what
    jaxprop records (not under plain ``jax.grad``; under ``jax.jit`` enter it inside the
    jitted function): a block that tagged nothing warns when it ends.
    """

    active = WATCHES
    kind = "scope_tag"

    def __init__(self, scope: str, name: str, *, warn: bool = True) -> None:
        super().__init__(scope, warn)
        self.name = name

    def apply(self, value: Any, index: int) -> Any:
        """The tagged value: leaf ``index`` of the list ``tags[name]``."""
        return tag_p.bind(value, name=self.name, index=index, count=None, treedef=None)

    def describe(self) -> str:
        return f"jaxprop.scope_tag({self.scope!r}, {self.name!r})"


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
        collector = TagCollector(_jax.get_current_trace())
        COLLECTORS.append(collector)
        try:
            value, grads = vg(*args, **kw)
        finally:
            COLLECTORS.remove(collector)
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
