"""The rule registry: primitive name -> VJP rule, and the node a rule reads.

A *node* is one primitive application recorded on the tape. Its VJP rule maps the upstream
cotangents of its outputs to the downstream cotangents of its inputs::

    rule(node, cts_out) -> cts_in            (None = symbolic zero / not wanted)

Most primitives have one output and a formula per input, so :func:`defvjp` takes one
function per input, micrograd style, with the math beside it::

    defvjp("mul", lambda ct, out, x, y: ct * y,      # d(x*y)/dx = y
                  lambda ct, out, x, y: ct * x)      # d(x*y)/dy = x

Only the inputs that need a cotangent are computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from jaxprop import _jax

Cotangent = Any  # an array, or None for a symbolic zero
NodeRule = Callable[["Node", Sequence[Cotangent]], Sequence[Cotangent]]
InputRule = Callable[..., Any]


class Node:
    """One primitive application: ``outputs = primitive.bind(*inputs, **params)``.

    ``inputs`` / ``outputs`` hold the values one level below the jaxprop trace (concrete arrays
    eagerly, jit tracers under ``jax.jit``, outer tracers for higher order). ``in_slots`` /
    ``out_slots`` name the differentiated values (None: a constant or a non-float value).
    ``residuals`` holds any extra arrays a rule saved (custom_vjp residuals, inner tapes).
    """

    __slots__ = ("primitive", "params", "inputs", "outputs", "in_slots", "out_slots",
                 "rule", "residuals", "source")

    def __init__(self, primitive: Any, params: dict, inputs: tuple, outputs: tuple,
                 in_slots: tuple, out_slots: tuple, rule: NodeRule, residuals: Any = (),
                 source: Any = None) -> None:
        self.primitive = primitive
        self.params = params
        self.inputs = inputs
        self.outputs = outputs
        self.in_slots = in_slots
        self.out_slots = out_slots
        self.rule = rule
        self.residuals = residuals
        self.source = source

    @property
    def name(self) -> str:
        """The primitive's name, e.g. ``'mul'``."""
        return self.primitive.name if hasattr(self.primitive, "name") else str(self.primitive)

    @property
    def wants(self) -> tuple[bool, ...]:
        """Which inputs need a cotangent."""
        return tuple(s is not None for s in self.in_slots)

    def __repr__(self) -> str:
        return f"Node({self.name}, in={self.in_slots}, out={self.out_slots})"


_RULES: dict[str, NodeRule] = {}


def register(name: str, rule: NodeRule) -> NodeRule:
    """Register (or replace) the node rule for the primitive called ``name``."""
    _RULES[name] = rule
    return rule


def noderule(name: str) -> Callable[[NodeRule], NodeRule]:
    """Decorator form of :func:`register` for rules that need the whole node."""
    return lambda rule: register(name, rule)


def defvjp(name: str, *input_rules: InputRule | None) -> NodeRule:
    """Register a single-output primitive's VJP as one function per input.

    Each ``input_rules[i](ct, out, *inputs, **params)`` returns the cotangent of input ``i``
    given the upstream cotangent ``ct`` of the output ``out``; None marks an input that gets no
    gradient. Users extend jaxprop the same way::

        jaxprop.defvjp("sin", lambda ct, out, x: ct * jnp.cos(x))
    """
    return register(name, vjp_rule(*input_rules))


def vjp_rule(*input_rules: InputRule | None) -> NodeRule:
    """The node rule made of one function per input, as :func:`defvjp` takes them."""
    takes = [_param_filter(f) for f in input_rules]

    def rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
        ct, out = cts[0], node.outputs[0]
        return [f(ct, out, *node.inputs, **take(node.params))
                if (f is not None and s is not None) else None
                for f, take, s in zip(input_rules, takes, node.in_slots)]

    rule.__doc__ = input_rules[0].__doc__ if input_rules and input_rules[0] else None
    return rule


def _param_filter(fn: InputRule | None) -> Callable[[dict], dict]:
    """Pass a rule only the params it names (all of them if it takes ``**params``)."""
    if fn is None:
        return lambda params: params
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return lambda params: params
    names = set(sig.parameters)
    if not names:
        return lambda params: {}
    return lambda params: {k: v for k, v in params.items() if k in names}


def defzero(*names: str) -> None:
    """Register primitives whose outputs carry no gradient to their inputs."""
    for name in names:
        register(name, zero_rule)


def zero_rule(node: Node, cts: Sequence[Cotangent]) -> list[Cotangent]:
    """No gradient reaches any input (outputs of such primitives are recorded as constants)."""
    return [None] * len(node.inputs)


# Scoped replacements (``jaxprop.override`` objects), innermost last; each has
# ``rule_for(name, trace) -> NodeRule | None`` and is consulted before ``_RULES``.
OVERRIDES: list[Any] = []


def lookup(name: str, trace: Any = None) -> NodeRule | None:
    """The rule for ``name``: an active override's if one applies here, else the registered
    one (or None). ``trace``: the trace recording the node (overrides check jit boundaries)."""
    for entry in reversed(OVERRIDES):
        rule = entry.rule_for(name, trace)
        if rule is not None:
            return rule
    return _RULES.get(name)


def registered() -> frozenset[str]:
    """Names of every primitive jaxprop can differentiate."""
    return frozenset(_RULES)


class MissingRuleError(NotImplementedError):
    """Raised when a differentiated value flows into a primitive with no VJP rule."""


def missing_rule_error(primitive: Any) -> MissingRuleError:
    """An error naming the primitive, the user's source line, and how to add a rule."""
    where = _jax.source_summary(_jax.current_source())
    return MissingRuleError(
        f"jaxprop has no VJP rule for the primitive '{primitive.name}'"
        + (f", applied at {where}" if where else "") + ".\n"
        "Register one before differentiating, for example:\n"
        f"    jaxprop.defvjp('{primitive.name}', lambda ct, out, *inputs, **params: ...)\n"
        "(one function per input, returning that input's cotangent), or "
        f"jaxprop.register('{primitive.name}', rule) with rule(node, cts) -> cts_in for "
        "multi-output primitives.")
