"""Change the backward pass: cotangent hooks on values, rule overrides for a scope.

- :func:`hook` ``(x, fn)``: identity forward; in the sweep the cotangent of the result is
  replaced by ``fn(ct)`` before it flows on into ``x`` (``fn`` returning None only observes).
  Built on it: :func:`gradient_reversal`, :func:`clip_gradient`, :func:`clip_gradient_norm`.
- :func:`override`: replace a primitive's rule for the code that runs inside a ``with`` block
  (or a decorated function) — the primitives *recorded* there use the new rule; ``scope=``
  narrows it to a ``jax.named_scope`` / Flax module path. Names are checked, and a block
  that changed nothing, or that a jit traced from outside, warns (:class:`ScopeWarning`).
- :class:`scope_hook`: :func:`hook` applied to every value a named scope (a module) sends
  out, without editing the model — PyTorch's module backward hooks.
- :func:`straight_through` and :func:`feedback_alignment`: forward one function, backward
  another (``jax.custom_vjp``, which jaxprop honours, so they work under ``jax.grad`` too).

Hooks work eagerly, under ``jax.jit`` (``fn`` must then be traceable: jax.numpy ops) and under
``jax.vmap``. Under plain ``jax.grad`` a hook applies ``fn`` too (JAX transposes it with ``fn``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import tree_map

from jaxprop import _jax
from jaxprop.registry import OVERRIDES, Node, NodeRule, lookup, register, registered
from jaxprop.rules._util import convert_like, unbroadcast
from jaxprop.scopes import ScopedContext
from jaxprop.tracer import HANDLERS, WATCHES, is_differentiable

__all__ = ["clip_gradient", "clip_gradient_norm", "feedback_alignment", "feedback_rule",
           "gradient_reversal", "hook", "override", "scope_hook", "straight_through"]


def _apply(ct: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn(ct)``, checked to keep the cotangent's shape and cast back to its dtype."""
    new = fn(ct)
    if new is None:
        return ct
    new = jnp.asarray(new)
    if new.shape != ct.shape:
        raise ValueError(f"A jaxprop.hook function must return a cotangent of shape {ct.shape}"
                         f" (or None), but it returned shape {new.shape}.")
    return convert_like(new, ct.dtype)


hook_p = _jax.identity_primitive("hook", lambda ct, fn: _apply(ct, fn))
register("hook", lambda node, cts: [_apply(cts[0], node.params["fn"])])  # hook: ct -> fn(ct)


def hook(x: Any, fn: Callable[[Any], Any]) -> Any:
    """Return ``x`` unchanged; in the backward pass replace its cotangent ``ct`` by ``fn(ct)``.

    ``fn`` sees the *total* cotangent of the returned value (all its uses summed) and returns
    the cotangent that flows on into ``x`` — same shape — or None to leave it unchanged (to
    print or record it, e.g. with ``jax.debug.print``). ``x`` may be a pytree: ``fn`` is
    applied to each floating leaf. A value that receives no cotangent never calls ``fn``.

    Where it acts: in jaxprop's sweep (eagerly, under ``jax.jit`` and ``jax.vmap``) and also
    under plain ``jax.grad`` (JAX transposes the hook with ``fn``). Under ``jax.jit`` ``fn`` is
    traced once, with the function: it receives tracers, so Python side effects in it
    (``print``, appending to a list) run at trace time only — use ``jax.debug.print`` /
    ``jax.debug.callback`` — and a value it closes over that changes later is not seen by
    the compiled program (pass such values as arguments of the jitted function). To hook a
    model you did not write, see :class:`scope_hook`.

    >>> f = lambda x: jnp.sin(jaxprop.hook(x, lambda ct: 2 * ct))
    >>> jaxprop.grad(f)(0.0)   # 2 * cos(0) = 2.0
    """
    return tree_map(lambda v: hook_p.bind(v, fn=fn)
                    if is_differentiable(_jax.aval_of(v)) else v, x)


class scope_hook(ScopedContext):
    """Hook the values a named scope sends out: PyTorch's module backward hooks, by name.

    Inside the block (or decorated function), every value computed under a ``jax.named_scope``
    / Flax module path matching ``scope`` (a pattern, see :mod:`jaxprop.scopes`) and then
    used by code *outside* that scope — a module's outputs — gets :func:`hook`'s treatment:
    in the backward pass its cotangent ``ct`` (the sum over its outside uses) is replaced by
    ``fn(ct)`` before flowing into the scope (``fn`` returning None only observes). The model
    is not edited::

        with jaxprop.scope_hook("MLP/block1", lambda ct: 2 * ct):
            grads = jaxprop.grad(loss)(params, batch)    # block1's gradients doubled

    Flax linen modules have scopes; Flax nnx and Equinox modules get one with
    :func:`jaxprop.scoped`. Like :class:`override`, it acts on what jaxprop *records* in
    the block: under plain ``jax.grad`` it does nothing, and under ``jax.jit`` it must be
    entered inside the jitted function (a block that hooked nothing warns on exit, one
    entered outside a jit being traced warns once; ``matched`` counts the values hooked).
    ``fn`` is traced with the function under ``jax.jit``: a closure whose values change
    later is not seen by the compiled program — pass them as arguments instead.
    """

    active = WATCHES
    kind = "scope_hook"

    def __init__(self, scope: str, fn: Callable[[Any], Any], *, warn: bool = True) -> None:
        super().__init__(scope, warn)
        self.fn = fn

    def apply(self, value: Any, index: int) -> Any:
        """The hooked value (binds the marker on the recording trace)."""
        return hook_p.bind(value, fn=self.fn)

    def describe(self) -> str:
        return f"jaxprop.scope_hook({self.scope!r})"


def gradient_reversal(x: Any, scale: float = 1.0) -> Any:
    """Identity forward, ``-scale · ct`` backward (domain-adversarial training, Ganin 2015).

    >>> jaxprop.grad(lambda x: 3 * jaxprop.gradient_reversal(x, 0.5))(1.0)   # -1.5
    """
    return hook(x, lambda ct: -scale * ct)


def clip_gradient(x: Any, lo: Any, hi: Any) -> Any:
    """Identity forward; the cotangent flowing into ``x`` is clipped elementwise to [lo, hi].

    >>> jaxprop.grad(lambda x: 10 * jaxprop.clip_gradient(x, -1.0, 1.0))(2.0)   # 1.0
    """
    return hook(x, lambda ct: jnp.clip(ct, lo, hi))


def clip_gradient_norm(x: Any, max_norm: float) -> Any:
    """Identity forward; the cotangent of ``x`` is rescaled so its L2 norm is ≤ ``max_norm``.

    >>> jaxprop.grad(lambda x: 10 * jaxprop.clip_gradient_norm(x, 1.0).sum())(jnp.ones(4))
    ... # [0.5, 0.5, 0.5, 0.5]
    """

    def clip(ct: Any) -> Any:
        norm = jnp.sqrt(jnp.sum(jnp.abs(ct) ** 2))
        return ct * jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(ct.dtype).tiny))

    return hook(x, clip)


class override(ScopedContext):
    """Use other VJP rules for the primitives recorded inside a ``with`` block or function.

    ``override(name, rule)`` or ``override({name: rule, …})``; a rule is a node rule
    ``rule(node, cts_out) -> cts_in`` (see :func:`jaxprop.register`), or one function per
    input made with :func:`jaxprop.vjp_rule`. The scope is where the *forward* code runs: a
    layer written inside ``with jaxprop.override(...)`` gets the rule, the rest of the model
    keeps jaxprop's. Used as a decorator, every call of the function is in scope, so
    ``jaxprop.grad(jaxprop.override(rules)(f))`` overrides rules for one gradient.
    ``scope="MLP/block1"`` narrows it to primitives run under that ``jax.named_scope`` /
    Flax module path (a pattern, see :mod:`jaxprop.scopes`): a model you did not write can
    be changed from outside.

    Names are checked: an unknown primitive name raises ``ValueError`` with the closest
    known names; so do primitives the rules of which cannot be overridden (``scan``,
    ``jit``, ``custom_jvp_call`` … carry sub-programs whose own primitives are recorded).

    What it cannot see, and how it says so:

    - Only jaxprop's sweep reads these rules. Under plain ``jax.grad`` (or any JAX autodiff)
      an override does nothing; a block in which no recorded primitive used a rule warns
      (:class:`jaxprop.ScopeWarning`) when it ends, and ``matched`` / :meth:`report` tell
      how many nodes each rule served.
    - Under ``jax.jit`` the rules are read while the function is *traced*: enter the scope
      inside the jitted function. A block around a call of an already compiled function
      changes nothing (the block warns: nothing matched); a block around the *first* call
      bakes the rule into the cached program, which keeps it after the block ends (that
      warns once too, as the trace crosses the jit).

    >>> pass_through = jaxprop.vjp_rule(lambda ct, out, x, y: ct, None)  # max(x, y): ct to x
    >>> with jaxprop.override("max", pass_through) as o:
    ...     g = jaxprop.grad(lambda x: jnp.maximum(x, 0.0))(-1.0)           # 1.0, not 0.0
    >>> o.matched["max"]    # 1 node used the rule

    (``jax.nn.relu`` is a ``custom_jvp`` function: its rule is the user's JVP, not ``max``.)
    """

    active = OVERRIDES
    kind = "override"

    def __init__(self, rules: str | Mapping[str, NodeRule], rule: NodeRule | None = None, *,
                 scope: str | None = None, warn: bool = True):
        if isinstance(rules, str):
            if rule is None:
                raise TypeError("jaxprop.override(name, rule) needs a rule.")
            rules = {rules: rule}
        elif rule is not None:
            raise TypeError("Pass either override(name, rule) or override({name: rule}).")
        for name, r in rules.items():
            if not callable(r):
                raise TypeError(f"The rule for '{name}' must be callable as rule(node, cts); "
                                "build one from per-input functions with jaxprop.vjp_rule.")
        check_overridable(rules)
        super().__init__(scope, warn)
        self.rules = dict(rules)

    def rule_for(self, name: str, trace: Any = None) -> NodeRule | None:
        """This override's rule for ``name`` if it has one and the code runs in scope."""
        rule = self.rules.get(name)
        if rule is None or not self.in_scope():
            return None
        self.acted(name, trace)
        return rule

    def describe(self) -> str:
        where = f", scope={self.scope!r}" if self.scope is not None else ""
        return f"jaxprop.override({sorted(self.rules)}{where})"

    def report(self) -> str:
        """How many recorded nodes used each rule (so far, over every use of this object)."""
        lines = [f"{self.describe()}:"]
        lines += [f"  {name}: {self.matched[name]} node(s)" for name in sorted(self.rules)]
        if not any(self.matched[name] for name in self.rules):
            lines += ["  nothing matched; possible reasons:"]
            lines += [f"  - {r}" for r in self.unused_reasons()]
        return "\n".join(lines)


_NOT_OVERRIDABLE = ("custom_jvp_call", "custom_vjp_call")


def check_overridable(rules: Mapping[str, Any]) -> None:
    """Raise ValueError for a name that is no primitive, or one whose rule is not used."""
    for name in rules:
        if name in HANDLERS or name in _NOT_OVERRIDABLE:
            raise ValueError(
                f"jaxprop.override cannot replace the rule of '{name}': jaxprop differentiates "
                "the program it carries (a loop body, branch, jitted or custom-derivative "
                "function) by recording its primitives, so override those instead (the "
                "override applies inside the sub-program too). To change a custom_jvp "
                "function's gradient (jax.nn.relu …) wrap its output: jaxprop.hook, "
                "jaxprop.straight_through.")
        if name in registered() or name in _jax.primitive_names():
            continue
        if name in _jax.primitive_names(everywhere=True):
            continue  # a user's primitive without a rule yet
        known = registered() | _jax.primitive_names(everywhere=True)
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"jaxprop.override: there is no primitive called {name!r}.{hint} Rules are keyed "
            "by primitive name (jax.make_jaxpr(f)(x) or jaxprop.explain(f, x) show the "
            "primitives your code runs; jaxprop.registered() lists those with rules).")


def straight_through(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``g(x) = f(x)`` forward, ``∂g/∂x = 1`` backward: the straight-through estimator.

    For quantisation, rounding, sampling, hard thresholds. ``f(x)`` must broadcast to ``x``'s
    shape; the cotangent is passed to ``x`` unchanged (summed over broadcast axes).

    >>> q = jaxprop.straight_through(jnp.round)
    >>> jaxprop.grad(lambda x: q(x) * 3.0)(0.4)   # 3.0 (jax.grad of round would give 0)
    """

    @jax.custom_vjp
    def g(x: Any) -> Any:
        return f(x)

    def fwd(x: Any) -> tuple[Any, Any]:
        return f(x), jnp.zeros(jnp.shape(x), jnp.result_type(x))

    def bwd(like: Any, ct: Any) -> tuple[Any]:
        return (unbroadcast(ct, like),)       # identity: ct passes straight through

    g.defvjp(fwd, bwd)
    return g


@jax.custom_vjp
def feedback_alignment(x: Any, w: Any, feedback: Any) -> Any:
    """``x @ w`` forward; backward sends ``ct @ feedbackᵀ`` to ``x`` instead of ``ct @ wᵀ``.

    Feedback alignment (Lillicrap et al. 2016): a fixed random matrix ``feedback`` (shape of
    ``w``) carries the error to the layer below; ``w`` still gets ``xᵀ ct`` and ``feedback``
    gets no gradient. ``x``: ``(..., n)``, ``w``: ``(n, m)``.

    >>> B = jax.random.normal(key, w.shape)
    >>> h = jnp.tanh(jaxprop.feedback_alignment(x, w, B))
    """
    return x @ w


def _fa_fwd(x: Any, w: Any, feedback: Any) -> tuple[Any, tuple]:
    return x @ w, (x, w, feedback)


def _fa_bwd(res: tuple, ct: Any) -> tuple:
    """(ct Bᵀ, xᵀ ct, 0): W's own gradient, the feedback matrix in place of Wᵀ."""
    x, w, feedback = res
    x2, ct2 = x.reshape(-1, x.shape[-1]), ct.reshape(-1, ct.shape[-1])
    dx = convert_like(ct @ feedback.T, x.dtype)
    dw = convert_like(x2.T @ ct2, w.dtype)
    return dx, dw, jnp.zeros_like(feedback)


feedback_alignment.defvjp(_fa_fwd, _fa_bwd)


def feedback_rule(feedback: Any, rule: NodeRule | None = None) -> NodeRule:
    """A ``dot_general`` rule that uses ``feedback`` in place of the weight for the first input.

    For ``with jaxprop.override("dot_general", feedback_rule(B)): y = x @ w`` when ``B`` is a
    constant (not a differentiated value); ``rule`` defaults to jaxprop's ``dot_general`` rule.
    """
    base = rule or lookup("dot_general")  # taken now: inside the scope it would be ``fa``

    def fa(node: Node, cts: Any) -> list[Any]:
        x_slot, w_slot = node.in_slots
        via_b = Node(node.primitive, node.params, (node.inputs[0], feedback), node.outputs,
                     (x_slot, None), node.out_slots, base, node.residuals, node.source)
        via_w = Node(node.primitive, node.params, node.inputs, node.outputs,
                     (None, w_slot), node.out_slots, base, node.residuals, node.source)
        return [base(via_b, cts)[0] if x_slot is not None else None,
                base(via_w, cts)[1] if w_slot is not None else None]

    return fa
