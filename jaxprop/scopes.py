"""Where a value is computed: ``jax.named_scope`` paths, and contexts that act on a scope.

Every node jaxprop records keeps the name stack active when it ran (``explain`` shows it as
``scope``). Flax linen modules run under a named scope of their path (``"MLP/block1/dense"``)
inside ``jax.jit``; outside jit too, as long as ``flax_profile`` (the default) is on. Flax nnx
and Equinox modules push no scope: :func:`scoped` wraps a submodule so that its calls run
under one, without editing the model's code::

    model = eqx.tree_at(lambda m: m.layers[1], model, jaxprop.scoped(model.layers[1], "block1"))
    model.block1 = jaxprop.scoped(model.block1, "block1")          # Flax nnx

A *scope pattern* is a ``/``-separated path whose components may use ``fnmatch`` wildcards;
it matches a name stack that contains those components as a contiguous run: ``"block1"``
matches ``"MLP/block1"`` and ``"MLP/block1/dense"``, ``"MLP/block*"`` matches both blocks.

:class:`ScopedContext` is the base of jaxprop's contexts that change what is *recorded*
inside them (``override``, ``scope_hook``, ``scope_tag``): it keeps their active stack, counts
what they acted on, and says so — with a :class:`ScopeWarning` — when a ``with`` block acted
on nothing, or when it was entered outside a ``jax.jit`` that traced it (the compiled program
keeps what the block changed on every later call, and one compiled before ignores it).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

from jaxprop import _jax

__all__ = ["ScopeWarning", "ScopedContext", "current_scope", "scope_matches", "scoped"]


class ScopeWarning(UserWarning):
    """A jaxprop context had no effect, or an effect that will outlive its block."""


def current_scope() -> str:
    """The ``jax.named_scope`` / Flax module path active right now (``'MLP/block1'``)."""
    return _jax.source_scope(_jax.current_source())


@functools.lru_cache(maxsize=4096)
def scope_matches(pattern: str, scope: str) -> bool:
    """Whether ``pattern``'s components are a contiguous run of ``scope``'s (fnmatch-style).

    >>> scope_matches("block1", "MLP/block1/dense"), scope_matches("MLP/b*", "MLP/block2")
    (True, True)
    """
    parts = [p for p in scope.split("/") if p]
    pat = [p for p in pattern.split("/") if p]
    if not pat:
        return True
    return any(all(fnmatch.fnmatchcase(parts[i + k], pat[k]) for k in range(len(pat)))
               for i in range(len(parts) - len(pat) + 1))


class ScopedContext(contextlib.ContextDecorator):
    """A context (or decorator) that acts on the primitives jaxprop records inside it.

    Subclasses set ``active`` (the list the tracer reads) and call :meth:`acted` each time
    they change something. ``matched`` counts those actions by key over the object's life.
    On leaving a ``with`` block that acted on nothing a :class:`ScopeWarning` says why that
    happens (``warn=False`` silences it); entering it outside a ``jax.jit`` whose trace it
    then changes warns once per block.
    """

    active: ClassVar[list[Any]]
    kind: ClassVar[str] = "context"

    def __init__(self, scope: str | None, warn: bool) -> None:
        self.scope = scope
        self.warn = warn
        self.matched: Counter[str] = Counter()
        self._entries: list[list[Any]] = []  # [trace at entry, total at entry, jit warned?]

    def in_scope(self) -> bool:
        """Whether the code running now is inside ``scope`` (always, without one)."""
        return self.scope is None or scope_matches(self.scope, current_scope())

    def acted(self, key: str, trace: Any = None) -> None:
        """Count one action by ``trace`` (the recording trace); warn if the block was entered
        outside a jit that is tracing it now."""
        self.matched[key] += 1
        if not self._entries or self._entries[-1][2]:
            return
        jit = _jax.jit_between(trace, self._entries[-1][0]) if trace is not None else None
        if jit is not None:
            self._entries[-1][2] = True
            where = _jax.source_summary(_jax.current_source())
            warnings.warn(ScopeWarning(
                f"{self.describe()} was entered outside the jax.jit of {jit}, which is "
                f"traced inside it (at {where or 'an unknown line'}): the compiled program keeps"
                " this change on every later call, also after the block ends, and a program "
                "compiled before the block ignores it. Enter it inside the jitted function "
                "instead (a `with` block there, or decorate the function before jitting it)."),
                stacklevel=4)

    def describe(self) -> str:
        return f"jaxprop.{self.kind}(…)"

    def unused_reasons(self) -> list[str]:
        """Why a block may act on nothing (shown in the warning and in reports)."""
        reasons = [
            "the code in the block is not differentiated by jaxprop: jax.grad, jax.vjp and "
            "optax's helpers never call jaxprop's tracer (use jaxprop.grad / value_and_grad)",
            "it only calls a jax.jit function compiled before the block: the cached program "
            "does not see it (enter it inside the jitted function, or jax.clear_caches())",
            "the block is inside a function that jax.jit turns into a program before jaxprop "
            "records it (jaxprop.grad(jax.jit(f))): enter it around the jitted call instead, "
            "or jit the gradient (jax.jit(jaxprop.grad(f)))"]
        if self.scope is not None:
            reasons.append(f"no recorded primitive ran under a name scope matching "
                           f"{self.scope!r} (jaxprop.explain(...).table(collapse='scope') "
                           "lists the scopes; Flax nnx and Equinox need jaxprop.scoped)")
        return reasons

    def __enter__(self) -> Any:
        self.active.append(self)
        self._entries.append([_jax.get_current_trace(), sum(self.matched.values()), False])
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for i in range(len(self.active) - 1, -1, -1):  # this object's innermost entry
            if self.active[i] is self:
                del self.active[i]
                break
        _, total, _ = self._entries.pop()
        if self.warn and exc_type is None and sum(self.matched.values()) == total:
            reasons = "".join(f"\n  - {r}" for r in self.unused_reasons())
            warnings.warn(ScopeWarning(f"{self.describe()} had no effect in its block. "
                                       f"Possible reasons:{reasons}"), stacklevel=2)


# -- giving modules without scopes one --------------------------------------------------------
def scoped(module: Callable, name: str) -> Any:
    """``module`` whose calls run under ``jax.named_scope(name)``: same parameters, same result.

    For an Equinox module it is an Equinox module (a pytree holding ``module``), for a Flax nnx
    module an nnx module (its state moves under ``.inner``), else a plain function. Use it to
    give a submodule a scope without editing the model::

        model = eqx.tree_at(lambda m: m.layers[1], model, jaxprop.scoped(model.layers[1], "b1"))
    """
    if _is_instance(module, "equinox", "Module"):
        return _equinox_scoped()(module, name)
    if _is_instance(module, "flax.nnx", "Module"):
        return _nnx_scoped()(module, name)

    @functools.wraps(module)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _jax_named_scope(name):
            return module(*args, **kwargs)

    return call


def _jax_named_scope(name: str) -> Any:
    import jax

    return jax.named_scope(name)


def _is_instance(obj: Any, module_name: str, cls: str) -> bool:
    import sys

    mod = sys.modules.get(module_name)  # not imported: obj cannot be one of its classes
    return mod is not None and isinstance(obj, getattr(mod, cls))


@functools.lru_cache(maxsize=None)
def _equinox_scoped() -> type:
    import equinox as eqx

    class Scoped(eqx.Module):
        """An Equinox module run under ``jax.named_scope(name)``."""

        inner: Any
        name: str = eqx.field(static=True)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with _jax_named_scope(self.name):
                return self.inner(*args, **kwargs)

    return Scoped


@functools.lru_cache(maxsize=None)
def _nnx_scoped() -> type:
    from flax import nnx

    class Scoped(nnx.Module):
        """A Flax nnx module run under ``jax.named_scope(name)``."""

        def __init__(self, inner: Any, name: str) -> None:
            self.inner = inner
            self.name = name

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with _jax_named_scope(self.name):
                return self.inner(*args, **kwargs)

    return Scoped
