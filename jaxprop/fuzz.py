"""Random-program fuzzing of jaxprop against ``jax.vjp``: ``jaxprop.fuzz.sweep(range(50))``.

A :class:`Program` is straight-line Python source over ``jnp`` / ``lax`` / linalg / control
flow (``scan``, ``cond``, ``switch``, ``fori_loop``, ``jax.checkpoint``, ``jax.jit``,
``custom_jvp`` / ``custom_vjp`` functions): a random DAG whose values are used several times,
broadcast against each other and mixed with integer indices and boolean masks. Its source is
what runs, so a failing program prints as a script that reproduces the failure.

Each program is checked in four modes against JAX, for ``float32`` and ``float64`` inputs:

- ``eager``: ``jaxprop.vjp(f, *x)[1](ct)`` versus ``jax.vjp(f, *x)[1](ct)``;
- ``jit``: the same pullback, both under ``jax.jit``;
- ``vmap``: the same pullback under ``jax.vmap`` over a batch of two examples;
- ``order2``: the VJP of ``x ↦ ⟨w, vjp(f)(x)(ct)⟩`` (a second derivative contracted with
  random ``ct`` and ``w``), jaxprop's on jaxprop's versus JAX's on JAX's.

Outputs and cotangents agree when ``|a − b| ≤ tol·(|b| + max|b|)`` per leaf, with NaN equal to
NaN. A mismatch (or an error that JAX does not raise) is shrunk by :func:`shrink`, which
deletes nodes, replaces them by fresh inputs and shrinks input shapes while the same failure
persists. Every check runs under a time limit and reports ``timeout`` instead of hanging.

Example::

    from jaxprop import fuzz
    report = fuzz.sweep(range(20), modes=("eager", "jit"), dtypes=("float32",))
    print(report)                      # counts per outcome, and each failure's shrunk source
    print(fuzz.random_program(3).source())

From a shell: ``python -m jaxprop.fuzz --programs 200``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_flatten, tree_map

from jaxprop import api
from jaxprop.testing import random_like

__all__ = ["MODES", "DTYPES", "Failure", "Program", "SweepReport", "check", "random_program",
           "shrink", "sweep"]

MODES = ("eager", "jit", "vmap", "order2")
DTYPES = ("float32", "float64")
TOLERANCE = {"float32": 2e-3, "float64": 1e-7}

# Helpers every program may call; printed at the top of every reproduction.
PRELUDE = '''\
import jax, jax.numpy as jnp, numpy as np
from jax import lax


@jax.custom_jvp
def fz_softclip(x):                      # custom_jvp: 2·tanh(x/2), derivative 1 − y²/4
    return 2.0 * jnp.tanh(x / 2.0)


fz_softclip.defjvp(lambda p, t: (fz_softclip(p[0]), (1.0 - fz_softclip(p[0]) ** 2 / 4.0) * t[0]))


@jax.custom_vjp
def fz_halfgrad(x):                      # custom_vjp: identity forward, halved gradient
    return x


fz_halfgrad.defvjp(lambda x: (x, None), lambda _, ct: (0.5 * ct,))


def fz_fit(v, like):                     # v's entries, tiled/truncated to like's shape and dtype
    return jnp.resize(v, jnp.shape(like)).astype(jnp.result_type(like))
'''


def _namespace() -> dict:
    ns: dict = {}
    exec(compile(PRELUDE, "<jaxprop.fuzz prelude>", "exec"), ns)
    return ns


_NS = _namespace()


# -- programs -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Input:
    """A program argument: ``kind`` is ``"float"`` (standard normal) or ``"int"`` (0..bound-1)."""
    name: str
    shape: tuple[int, ...]
    kind: str = "float"
    bound: int = 4


@dataclasses.dataclass(frozen=True)
class Statement:
    """Source lines that bind ``outputs`` and read ``reads`` (names of earlier values)."""
    lines: tuple[str, ...]
    outputs: tuple[str, ...]
    reads: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Program:
    """``def f(*inputs): statements; return outputs`` with seeded argument values."""
    inputs: tuple[Input, ...]
    statements: tuple[Statement, ...]
    outputs: tuple[str, ...]
    seed: int = 0

    def body_source(self) -> str:
        lines = [f"def f({', '.join(i.name for i in self.inputs)}):"]
        lines += ["    " + line for s in self.statements for line in s.lines]
        lines.append(f"    return ({''.join(o + ', ' for o in self.outputs)})")
        return "\n".join(lines) + "\n"

    def function(self) -> Callable:
        ns = dict(_NS)
        exec(compile(self.body_source(), f"<fuzz program {self.seed}>", "exec"), ns)
        return ns["f"]

    def arguments(self, dtype: str, seed: int | None = None) -> tuple:
        rng = np.random.default_rng(self.seed if seed is None else seed)
        return tuple(jnp.asarray(rng.integers(0, i.bound, size=i.shape), jnp.int32)
                     if i.kind == "int" else jnp.asarray(rng.normal(size=i.shape), dtype)
                     for i in self.inputs)

    def source(self, mode: str = "eager", dtype: str = "float32") -> str:
        """A self-contained script that compares jaxprop with jax.vjp on this program."""
        args = ", ".join(f"jnp.asarray(rng.integers(0, {i.bound}, size={i.shape}), jnp.int32)"
                         if i.kind == "int" else
                         f"jnp.asarray(rng.normal(size={i.shape}), '{dtype}')"
                         for i in self.inputs)
        return (PRELUDE + "import jaxprop\nfrom jaxprop import fuzz\n"
                + ("jax.config.update('jax_enable_x64', True)\n" if dtype == "float64" else "")
                + "\n\n" + self.body_source() + "\n\n"
                + f"rng = np.random.default_rng({self.seed})\nargs = ({args}{',' if args else ''})\n"
                + f"print(fuzz.compare(f, args, {mode!r}, {dtype!r}, seed={self.seed}))\n")

    def prune(self) -> Program:
        """Drop statements and inputs that no output depends on."""
        live = set(self.outputs)
        kept = []
        for s in reversed(self.statements):
            if live & set(s.outputs):
                kept.append(s)
                live |= s.reads
        return dataclasses.replace(self, statements=tuple(reversed(kept)),
                                   inputs=tuple(i for i in self.inputs if i.name in live))


# -- the generator --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Value:
    name: str
    shape: tuple[int, ...]
    dtype: Any

    @property
    def kind(self) -> str:
        if jnp.issubdtype(self.dtype, jnp.inexact):
            return "float"
        return "bool" if self.dtype == jnp.bool_ else "int"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=int))


class _Block:
    """Grows a list of statements over a pool of values; checks each by abstract evaluation."""

    def __init__(self, rng: np.random.Generator, pool: list[_Value], depth: int,
                 names: Iterator[str]) -> None:
        self.rng, self.pool, self.depth, self.names = rng, list(pool), depth, names
        self.params = list(pool)
        self.statements: list[Statement] = []

    # drawing ------------------------------------------------------------------------
    def pick(self, kind: str = "float", where: Callable[[_Value], bool] = lambda v: True
             ) -> _Value | None:
        options = [v for v in self.pool if v.kind == kind and where(v)]
        if not options:
            return None
        weights = np.arange(1, len(options) + 1, dtype=float) ** 1.5  # prefer recent values
        return options[self.rng.choice(len(options), p=weights / weights.sum())]

    def choice(self, seq: Sequence) -> Any:
        return seq[self.rng.integers(len(seq))]

    def fresh(self, prefix: str) -> str:
        """A parameter name no enclosing block uses."""
        return prefix + "_" + next(self.names)[1:]

    def axis(self, v: _Value) -> int:
        return int(self.rng.integers(len(v.shape))) if v.shape else 0

    # growing ------------------------------------------------------------------------
    def grow(self, n: int, tries: int = 12) -> None:
        for _ in range(n):
            for _ in range(tries):
                if self._try_once():
                    break

    def _try_once(self) -> bool:
        ops = [op for op in _OPS if self.depth > 0 or not op.nested]
        op = ops[self.rng.choice(len(ops), p=_weights(ops))]
        made = op.make(self)
        if made is None:
            return False
        lines, n_out = made
        outs = tuple(next(self.names) for _ in range(n_out))
        lines = [line.replace("{o}", ", ".join(outs) + ("," if n_out > 1 else ""))
                 .replace("{fn}", f"fn_{outs[0]}") for line in lines]
        avals = self._evaluate(lines, outs)
        if avals is None:
            return False
        reads = frozenset(v.name for v in self.pool if _mentions(lines, v.name))
        self.statements.append(Statement(tuple(lines), outs, reads))
        self.pool += [_Value(o, tuple(a.shape), a.dtype) for o, a in zip(outs, avals)]
        return True

    def _evaluate(self, lines: list[str], outs: tuple[str, ...]) -> list | None:
        names = [v.name for v in self.params]
        body = [line for s in self.statements for line in s.lines] + lines
        src = (f"def _g({', '.join(names)}):\n" + "".join("    " + b + "\n" for b in body)
               + f"    return ({''.join(o + ', ' for o in outs)})\n")
        ns = dict(_NS)
        specs = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in self.params]
        try:
            exec(compile(src, "<fuzz>", "exec"), ns)
            with _warnings_off():
                avals = jax.eval_shape(ns["_g"], *specs)
        except Exception:
            return None
        if any(a.size == 0 or a.size > 64 or a.dtype == jnp.complex64 or a.dtype ==
               jnp.complex128 for a in avals):
            return None
        return list(avals)

    def body(self, params: list[_Value], n: int) -> _Block:
        """A nested block over ``params`` that may also read this block's values."""
        inner = _Block(self.rng, self.pool + params, self.depth - 1, self.names)
        inner.params = list(params) + list(self.params)
        inner.statements = list(self.statements)  # so that closures over them type-check
        start = len(inner.statements)
        inner.grow(n)
        inner.statements = inner.statements[start:]
        inner.pool = params + [v for v in inner.pool if v not in self.pool and v not in params]
        return inner

    def last_float(self, params: list[_Value]) -> _Value:
        floats = [v for v in self.pool if v.kind == "float"]
        return floats[-1] if floats else params[0]


def _mentions(lines: Sequence[str], name: str) -> bool:
    import re
    return any(re.search(rf"\b{re.escape(name)}\b", line) for line in lines)


@contextlib.contextmanager
def _warnings_off() -> Iterator[None]:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    weight: float
    make: Callable[[_Block], tuple[list[str], int] | None]
    nested: bool = False


def _weights(ops: Sequence[_Op]) -> np.ndarray:
    w = np.array([op.weight for op in ops])
    return w / w.sum()


_UNARY = ["jnp.sin(X)", "jnp.cos(X)", "jnp.tanh(X)", "jax.nn.sigmoid(X)", "jnp.exp(jnp.tanh(X))",
          "jnp.log1p(X * X)", "jnp.sqrt(X * X + 1.0)", "jnp.abs(X)", "-X", "X * X",
          "jax.nn.relu(X)", "jax.nn.softplus(X)", "jax.nn.gelu(X)", "jax.nn.silu(X)",
          "jnp.arctan(X)", "lax.rsqrt(X * X + 0.5)", "jnp.maximum(X, 0.3)", "jnp.clip(X, -1.0, 1.0)",
          "jnp.round(X)", "lax.integer_pow(X, 3)", "(jnp.abs(X) + 0.5) ** 1.5", "jnp.expm1(jnp.tanh(X))",
          "lax.erf(X)", "jnp.sinc(X)", "fz_softclip(X)", "fz_halfgrad(X)", "lax.stop_gradient(X) * X",
          "jnp.log(jnp.cosh(X))", "jnp.arcsinh(X)", "jnp.square(jnp.sin(X))", "jnp.reciprocal(X * X + 1.0)",
          "X.astype(jnp.float32)", "jnp.where(X > 0, X, 0.1 * X)", "jnp.logaddexp(X, 0.5)",
          "jax.scipy.special.erfc(X)", "jnp.floor(X) + X", "jnp.sign(X) * X"]

_BINARY = ["X + Y", "X - Y", "X * Y", "X / (1.0 + Y * Y)", "jnp.maximum(X, Y)", "jnp.minimum(X, Y)",
           "jnp.arctan2(X, Y)", "(jnp.abs(X) + 1.0) ** jnp.tanh(Y)", "jnp.where(X > Y, X, Y)",
           "jnp.logaddexp(X, Y)", "jnp.hypot(X, Y) + 0.0 * X", "X * jax.nn.sigmoid(Y)",
           "lax.max(X, Y)", "jnp.where(Y > 0, X, 2.0 * Y)", "jnp.copysign(X, Y)",
           "jnp.remainder(X, jnp.abs(Y) + 1.0)"]


def _unary(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick()
    return [f"{{o}} = {b.choice(_UNARY).replace('X', x.name)}"], 1


def _binary(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick()
    y = b.pick(where=lambda v: _broadcasts(v.shape, x.shape))
    expr = b.choice(_BINARY).replace("X", x.name).replace("Y", y.name)
    return [f"{{o}} = {expr}"], 1


def _broadcasts(a: tuple, b: tuple) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


def _reduce(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: len(v.shape) > 0)
    if x is None:
        return None
    axis = b.choice([None, b.axis(x), -1])
    keep = bool(b.rng.integers(2))
    fn = b.choice(["jnp.sum", "jnp.mean", "jnp.max", "jnp.min", "jnp.prod", "jnp.var",
                   "jax.nn.logsumexp", "jnp.linalg.norm", "jnp.std", "jnp.amax"])
    arg = f"jnp.tanh({x.name})" if fn == "jnp.prod" else x.name
    if fn in ("jnp.std", "jnp.linalg.norm"):
        arg = f"{x.name} + 0.1"
        keep = False if fn == "jnp.linalg.norm" and axis is None else keep
    return [f"{{o}} = {fn}({arg}, axis={axis}, keepdims={keep})"], 1


def _softmax(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: len(v.shape) > 0)
    if x is None:
        return None
    fn = b.choice(["jax.nn.softmax", "jax.nn.log_softmax", "jnp.cumsum", "jnp.cumprod",
                   "lax.cummax", "jnp.sort", "lax.cumlogsumexp", "jnp.flip", "jnp.diff"])
    arg = f"jnp.tanh({x.name})" if fn == "jnp.cumprod" else x.name
    return [f"{{o}} = {fn}({arg}, axis={b.axis(x)})"], 1


def _structural(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: v.size > 0)
    s, name, r = x.shape, x.name, b.rng
    options = [f"{name}.reshape({_factor(r, x.size)})", f"jnp.expand_dims({name}, 0)",
               f"jnp.pad({name}, 1)", f"jnp.tile({name}, 2)", f"{name}[None] * 1.5",
               f"jnp.broadcast_to({name}, (2,) + {name}.shape)", f"jnp.ravel({name})"]
    if s:
        ax = b.axis(x)
        perm = tuple(int(i) for i in r.permutation(len(s)))
        options += [f"jnp.transpose({name}, {perm})", f"jnp.roll({name}, 1, axis={ax})",
                    f"jnp.repeat({name}, 2, axis={ax})", f"{name}[{':, ' * ax}::-1]",
                    f"jnp.squeeze({name}[{':, ' * ax}:1], axis={ax})",
                    f"lax.pad({name}, 0.0, {[(1, 0, 1) if i == ax else (0, 0, 0) for i in range(len(s))]})"]
        if s[ax] >= 2:
            lo = int(r.integers(s[ax] - 1))
            options += [f"{name}[{':, ' * ax}{lo}:]", f"{name}[{':, ' * ax}::2]",
                        f"lax.dynamic_slice_in_dim({name}, {lo}, 1, axis={ax})"]
    if len(s) >= 2:
        options += [f"jnp.swapaxes({name}, 0, -1)", f"jnp.triu({name})",
                    f"jnp.diagonal({name}, axis1=0, axis2=1)", f"{name}.T"]
    return [f"{{o}} = {b.choice(options)}"], 1


def _factor(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    dims: list[int] = []
    while n > 1 and len(dims) < 2:
        divisors = [d for d in range(2, n + 1) if n % d == 0]
        d = int(rng.choice(divisors))
        dims.append(d)
        n //= d
    dims.append(n)
    return tuple(int(d) for d in rng.permutation(dims))


def _combine(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: len(v.shape) > 0)
    if x is None:
        return None
    ax = b.axis(x)
    y = b.pick(where=lambda v: len(v.shape) == len(x.shape) and all(
        a == c for i, (a, c) in enumerate(zip(v.shape, x.shape)) if i != ax))
    z = b.pick(where=lambda v: v.shape == x.shape)
    options = [f"jnp.concatenate([{x.name}, {y.name}], axis={ax})",
               f"jnp.stack([{x.name}, {z.name}], axis={ax})",
               f"lax.dynamic_update_slice_in_dim({x.name}, {z.name}[{':, ' * ax}:1], 1 % {x.shape[ax]}, axis={ax})",
               f"jnp.where({x.name} > {z.name}, {x.name}, {z.name} * 0.5)",
               f"jnp.stack([{x.name}, {x.name}.at[{':, ' * ax}0].set(0.0)])"]
    return [f"{{o}} = {b.choice(options)}"], 1


def _index(b: _Block) -> tuple[list[str], int] | None:
    """Gathers and scatters with integer indices computed in the program (argmax, argsort…)."""
    x = b.pick(where=lambda v: len(v.shape) > 0)
    if x is None:
        return None
    i = b.pick("int")
    d = x.shape[0]
    idx = f"({i.name} % {d})" if i is not None else f"jnp.array({[int(v) for v in b.rng.integers(0, d, 3)]})"
    y = b.pick()
    options = [f"{x.name}[{idx}]", f"jnp.take({x.name}, {idx}, axis=0)",
               f"{x.name}.at[{idx}].add(fz_fit({y.name}, {x.name}[{idx}]))",
               f"{x.name}.at[{idx}].set(fz_fit({y.name}, {x.name}[{idx}]))",
               f"{x.name}.at[{idx}].max(fz_fit({y.name}, {x.name}[{idx}]))",
               f"jnp.take_along_axis({x.name}, jnp.argsort({x.name}, axis=-1), axis=-1)",
               f"{x.name}[..., 0]", f"{x.name}[-1]"]
    return [f"{{o}} = {b.choice(options)}"], 1


def _integer(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: len(v.shape) > 0)
    if x is None:
        return None
    options = [f"jnp.argmax({x.name}, axis={b.axis(x)})", f"jnp.argsort({x.name}, axis=0)",
               f"jnp.round(jnp.abs({x.name})).astype(jnp.int32)",
               f"jnp.argmin({x.name}, axis=-1)", f"jnp.arange({x.shape[0]})[::-1]"]
    return [f"{{o}} = {b.choice(options)}"], 1


def _mask(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick()
    y = b.pick(where=lambda v: _broadcasts(v.shape, x.shape))
    m = b.pick("bool", where=lambda v: _broadcasts(v.shape, np.broadcast_shapes(x.shape, y.shape)))
    if m is None:
        return [f"{{o}} = {x.name} > {b.choice(['0.0', y.name])}"], 1
    return [f"{{o}} = jnp.where({m.name}, {x.name}, {y.name})"], 1


def _dot(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: len(v.shape) > 0)
    if x is None:
        return None
    y = b.pick()
    k, m = x.shape[-1], int(b.rng.integers(1, 4))
    options = [f"{x.name} @ fz_fit({y.name}, jnp.zeros(({k}, {m}), {x.name}.dtype))",
               f"jnp.dot({x.name}, fz_fit({y.name}, jnp.zeros(({k},), {x.name}.dtype)))",
               f"jnp.einsum('...i,ji->...j', {x.name}, fz_fit({y.name}, jnp.zeros(({m}, {k}), {x.name}.dtype)))",
               f"jnp.outer({x.name}, {y.name})",
               f"jnp.tensordot({x.name}, fz_fit({y.name}, {x.name}), axes={len(x.shape)})"]
    return [f"{{o}} = {b.choice(options)}"], 1


def _linalg(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: v.size >= 1)
    y = b.pick()
    n = int(b.rng.integers(1, 4))
    sq = f"fz_fit({x.name}, jnp.zeros(({n}, {n}), {x.name}.dtype))"
    well = f"(0.3 * {sq} + jnp.eye({n}, dtype={x.name}.dtype))"
    rhs = f"fz_fit({y.name}, jnp.zeros(({n}, 2), {x.name}.dtype))"
    # Distinct singular values / eigenvalues: tiling alone can make a rank-deficient matrix,
    # where the second derivatives of svd, eigh and qr are undefined (both sides are noise).
    spread = f"jnp.arange(1.0, {n + 1}, dtype={x.name}.dtype)"
    tall = (f"(0.3 * fz_fit({x.name}, jnp.zeros(({n + 1}, {n}), {x.name}.dtype)) "
            f"+ jnp.eye({n + 1}, {n}, dtype={x.name}.dtype) * {spread})")
    options = [(f"jnp.linalg.solve({well}, {rhs})", 1),
               (f"jnp.linalg.cholesky({sq} @ {sq}.T + jnp.eye({n}, dtype={x.name}.dtype))", 1),
               (f"jnp.linalg.qr({tall})", 2), (f"jnp.linalg.inv({well})", 1),
               (f"jnp.linalg.slogdet({well})", 2), (f"jnp.linalg.det({well})", 1),
               (f"jnp.linalg.eigh(0.3 * ({sq} + {sq}.T) + jnp.diag({spread}))", 2),
               (f"jax.scipy.linalg.solve_triangular(jnp.tril({well}), {rhs}, lower=True)", 1),
               (f"jnp.linalg.svd({tall}, full_matrices=False)[1]", 1),
               (f"jax.scipy.linalg.expm(0.3 * {sq})", 1)]
    expr, n_out = b.choice(options)
    return [f"{{o}} = {expr}"], n_out


def _scan(b: _Block) -> tuple[list[str], int] | None:
    c = b.pick()
    xs = b.pick(where=lambda v: len(v.shape) > 0 and v.shape[0] <= 5)
    if xs is None:
        return None
    pc = _Value(b.fresh("c"), c.shape, c.dtype)
    px = _Value(b.fresh("x"), xs.shape[1:], xs.dtype)
    inner = b.body([pc, px], int(b.rng.integers(1, 4)))
    y = inner.last_float([pc])
    z = inner.pick() or y
    rev = bool(b.rng.integers(2))
    lines = [f"def {{fn}}({pc.name}, {px.name}):",
             *("    " + line for s in inner.statements for line in s.lines),
             f"    return fz_fit({y.name}, {pc.name}), {z.name}",
             f"{{o}} = lax.scan({{fn}}, {c.name}, {xs.name}, reverse={rev})"]
    return lines, 2


def _fori(b: _Block) -> tuple[list[str], int] | None:
    c = b.pick()
    pc = _Value(b.fresh("c"), c.shape, c.dtype)
    pi = _Value(b.fresh("i"), (), jnp.dtype("int32"))
    inner = b.body([pi, pc], int(b.rng.integers(1, 4)))
    y = inner.last_float([pc])
    n = int(b.rng.integers(1, 4))
    lines = [f"def {{fn}}({pi.name}, {pc.name}):",
             *("    " + line for s in inner.statements for line in s.lines),
             f"    return fz_fit({y.name}, {pc.name})",
             f"{{o}} = lax.fori_loop(0, {n}, {{fn}}, {c.name})"]
    return lines, 1


def _cond(b: _Block) -> tuple[list[str], int] | None:
    p = b.pick()
    x = b.pick()
    branches = []
    for k in range(int(b.rng.integers(2, 4))):
        px = _Value(b.fresh("x"), x.shape, x.dtype)
        inner = b.body([px], int(b.rng.integers(0, 3)))
        y = inner.last_float([px])
        branches += [f"def {{fn}}_{k}({px.name}):",
                     *("    " + line for s in inner.statements for line in s.lines),
                     f"    return fz_fit({y.name}, {px.name})"]
    n = sum(1 for line in branches if line.startswith("def "))
    if n == 2:
        call = f"{{o}} = lax.cond(jnp.sum({p.name}) > 0, {{fn}}_0, {{fn}}_1, {x.name})"
    else:
        call = (f"{{o}} = lax.switch(jnp.argmax(jnp.ravel({p.name})) % {n}, "
                f"[{', '.join(f'{{fn}}_{i}' for i in range(n))}], {x.name})")
    return branches + [call], 1


def _wrapped(b: _Block) -> tuple[list[str], int] | None:
    """A sub-function under jax.checkpoint (with or without a policy) or jax.jit."""
    x = b.pick()
    y = b.pick()
    px, py = _Value(b.fresh("a"), x.shape, x.dtype), _Value(b.fresh("b"), y.shape, y.dtype)
    inner = b.body([px, py], int(b.rng.integers(1, 4)))
    out = inner.last_float([px])
    wrap = b.choice(["jax.checkpoint({fn})", "jax.jit({fn})",
                     "jax.checkpoint({fn}, policy=jax.checkpoint_policies.checkpoint_dots)",
                     "jax.checkpoint({fn}, policy=jax.checkpoint_policies.nothing_saveable)",
                     "jax.checkpoint({fn}, policy=jax.checkpoint_policies.everything_saveable)",
                     "jax.checkpoint({fn}, prevent_cse=False)"])
    lines = [f"def {{fn}}({px.name}, {py.name}):",
             *("    " + line for s in inner.statements for line in s.lines),
             f"    return {out.name}", f"{{o}} = {wrap}({x.name}, {y.name})"]
    return lines, 1


def _window(b: _Block) -> tuple[list[str], int] | None:
    x = b.pick(where=lambda v: len(v.shape) == 1 and v.shape[0] >= 2)
    if x is None:
        return None
    y = b.pick()
    options = [f"lax.reduce_window({x.name}, -jnp.inf, lax.max, (2,), (1,), 'VALID')",
               f"jnp.convolve({x.name}, fz_fit({y.name}, jnp.zeros((2,), {x.name}.dtype)))",
               f"lax.conv({x.name}[None, None], fz_fit({y.name}, jnp.zeros((1, 1, 2), {x.name}.dtype)), (1,), 'SAME')[0, 0]",
               f"lax.reduce_window({x.name}, 0.0, lax.add, (2,), (1,), 'VALID')",
               f"lax.top_k({x.name}, 1)[0]"]
    return [f"{{o}} = {b.choice(options)}"], 1


_OPS = [_Op("unary", 6, _unary), _Op("binary", 6, _binary), _Op("reduce", 2, _reduce),
        _Op("axis", 2, _softmax), _Op("structural", 3, _structural), _Op("combine", 1.5, _combine),
        _Op("index", 2, _index), _Op("integer", 1, _integer), _Op("mask", 1, _mask),
        _Op("dot", 2, _dot), _Op("linalg", 1.5, _linalg), _Op("window", 0.7, _window),
        _Op("scan", 1, _scan, nested=True), _Op("fori", 0.7, _fori, nested=True),
        _Op("cond", 1, _cond, nested=True), _Op("wrapped", 1, _wrapped, nested=True)]


def random_program(seed: int, size: int = 8, depth: int = 2) -> Program:
    """A random program of about ``size`` statements, control flow nested ``depth`` deep.

    Inputs are one to three float arrays (rank 0–3, sides 1–4; standard normal values) and
    sometimes an int32 array; outputs are the float values no statement reads, plus one more.
    """
    rng = np.random.default_rng(seed)
    inputs = []
    for k in range(int(rng.integers(1, 4))):
        shape = tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(0, 4)))
        inputs.append(Input(f"x{k}", shape))
    if rng.random() < 0.25:
        inputs.append(Input(f"x{len(inputs)}", (int(rng.integers(1, 4)),), "int", 4))
    pool = [_Value(i.name, i.shape, jnp.dtype("int32" if i.kind == "int" else "float32"))
            for i in inputs]
    names = (f"v{k}" for k in range(10 ** 6))
    block = _Block(rng, pool, depth, names)
    block.grow(size)
    read = set().union(*(s.reads for s in block.statements)) if block.statements else set()
    floats = [v for v in block.pool if v.kind == "float"]
    outs = [v.name for v in floats if v.name not in read]
    extra = block.pick()
    if extra is not None and extra.name not in outs:
        outs.append(extra.name)
    return Program(tuple(inputs), tuple(block.statements), tuple(outs), seed).prune()


# -- checking -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Failure:
    """What went wrong: ``kind`` is ``"mismatch"``, ``"error"`` or ``"timeout"``."""
    mode: str
    dtype: str
    kind: str
    message: str

    @property
    def signature(self) -> tuple:
        first = self.message.splitlines()[0] if self.message else ""
        return (self.mode, self.dtype, self.kind,
                first.split(":")[0] if self.kind == "error" else self.kind)


class _Timeout(BaseException):  # not caught by "except Exception" in user code
    pass


class _Invalid(Exception):
    """JAX itself rejects the program in this mode: nothing to compare."""


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise _Timeout after ``seconds`` (SIGALRM, main thread only; otherwise unlimited)."""
    import threading
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _x64(dtype: str) -> Any:
    return jax.enable_x64(dtype == "float64")


def compare(f: Callable, args: tuple, mode: str, dtype: str, seed: int = 0) -> str:
    """``"ok"`` if jaxprop's VJP of ``f`` at ``args`` agrees with JAX's in ``mode``, else why.

    JAX's side always runs under ``jax.jit`` (its eager op-by-op dispatch costs seconds per new
    program and computes the same values). Raises whatever jaxprop raises where JAX does not;
    used by the printed reproductions.
    """
    with _x64(dtype), _warnings_off():
        try:
            theirs = jax.jit(lambda a: _run(jax.vjp, f, a, mode, seed))(args)
        except Exception as err:  # JAX rejects it: not a jaxprop bug
            raise _Invalid(f"{type(err).__name__}: {err}") from err
        ours = _run(api.vjp, f, args, mode, seed)
        problem = _difference(ours, theirs, TOLERANCE[dtype])
        return "ok" if problem is None else f"mismatch in {mode} ({dtype}): {problem}"


def _run(vjp: Callable, f: Callable, args: tuple, mode: str, seed: int) -> Any:
    """(outputs, cotangents of the inputs) of ``f`` in ``mode``, with ``vjp`` as the engine."""
    ct = random_like(jax.eval_shape(f, *args), seed + 1)

    def pulled(a: tuple, c: Any) -> Any:
        o, pull = vjp(f, *a)
        return o, pull(c)

    if mode == "eager":
        return pulled(args, ct)
    if mode == "jit":
        return jax.jit(pulled)(args, ct)
    if mode == "vmap":
        other = random_like(args, seed + 7)
        batch = tree_map(lambda x, o: jnp.stack([x, o.astype(x.dtype) if
                                                 o.dtype != jax.dtypes.float0 else x]),
                         args, other)
        cts = tree_map(lambda c: jnp.stack([c, c * 0.5 if c.dtype != jax.dtypes.float0 else c]),
                       ct)
        return jax.vmap(pulled)(batch, cts)
    if mode == "order2":
        w = random_like(args, seed + 3)

        def h(*a: Any) -> Any:
            cts_in = vjp(f, *a)[1](ct)
            terms = [jnp.sum(x * y) for x, y in zip(tree_flatten(cts_in)[0], tree_flatten(w)[0])
                     if y.dtype != jax.dtypes.float0]
            return sum(terms) if terms else jnp.zeros(())

        value, pull = vjp(h, *args)
        return value, pull(jnp.ones_like(value))
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def _difference(ours: Any, theirs: Any, tol: float) -> str | None:
    a_leaves, a_tree = tree_flatten(ours)
    b_leaves, b_tree = tree_flatten(theirs)
    if a_tree != b_tree:
        return f"structure {a_tree} != JAX's {b_tree}"
    for k, (a, b) in enumerate(zip(a_leaves, b_leaves)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"leaf {k}: {a.shape} {a.dtype} != JAX's {b.shape} {b.dtype}"
        if a.dtype == jax.dtypes.float0 or a.size == 0:
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(b64)
        scale = np.max(np.abs(b64[finite]), initial=1.0)
        bad = ~((np.abs(a64 - b64) <= tol * (np.abs(b64) + scale))
                | (np.isnan(a64) & np.isnan(b64)) | (a64 == b64))
        if bad.any():
            return (f"leaf {k} {a.dtype}{list(a.shape)}: {int(bad.sum())} of {a.size} entries "
                    f"differ\n  jaxprop: {a.ravel()[:6]}\n  jax:     {b.ravel()[:6]}")
    return None


def check(program: Program, mode: str, dtype: str, time_limit: float | None = 60.0
          ) -> Failure | None | str:
    """Compare jaxprop with JAX on ``program``: None if they agree, a :class:`Failure` if not,
    ``"invalid"`` if JAX itself rejects the program in this mode."""
    try:
        with _time_limit(time_limit):
            f = program.function()
            with _x64(dtype):
                args = program.arguments(dtype)
            result = compare(f, args, mode, dtype, program.seed)
    except _Invalid:
        return "invalid"
    except _Timeout:
        return Failure(mode, dtype, "timeout", f"took over {time_limit} s")
    except Exception as err:
        return Failure(mode, dtype, "error", f"{type(err).__name__}: {err}"[:2000])
    return None if result == "ok" else Failure(mode, dtype, "mismatch", result)


# -- shrinking ------------------------------------------------------------------------------
def _candidates(p: Program) -> Iterator[Program]:
    """Smaller variants of ``p``: fewer outputs, a statement replaced by fresh inputs or by one
    of its own inputs, input dimensions cut to 1."""
    if len(p.outputs) > 1:
        for o in p.outputs:
            yield dataclasses.replace(p, outputs=(o,)).prune()
    for k, s in enumerate(p.statements):
        rest = p.statements[:k] + p.statements[k + 1:]
        with _warnings_off():
            try:
                avals = jax.eval_shape(_prefix(p, k + 1), *_specs(p))
            except Exception:
                continue
        fresh = tuple(Input(o + "_", tuple(a.shape), "float" if jnp.issubdtype(a.dtype, jnp.inexact)
                            else "int", 2) for o, a in zip(s.outputs, avals))
        if all(i.kind == "float" for i in fresh):
            names = {o: i.name for o, i in zip(s.outputs, fresh)}
            outs = tuple(names.get(o, o) for o in p.outputs)
            yield Program(p.inputs + fresh, rest[:k] + _rename(rest[k:], names), outs,
                          p.seed).prune()
    for k, i in enumerate(p.inputs):
        for ax, d in enumerate(i.shape):
            if d > 1:
                shape = i.shape[:ax] + (1,) + i.shape[ax + 1:]
                yield dataclasses.replace(p, inputs=p.inputs[:k] + (
                    dataclasses.replace(i, shape=shape),) + p.inputs[k + 1:])


def _specs(p: Program) -> list:
    return [jax.ShapeDtypeStruct(i.shape, jnp.int32 if i.kind == "int" else jnp.float32)
            for i in p.inputs]


def _prefix(p: Program, n: int) -> Callable:
    last = p.statements[n - 1].outputs
    return dataclasses.replace(p, statements=p.statements[:n], outputs=last).function()


def _rename(statements: Sequence[Statement], names: dict[str, str]) -> tuple[Statement, ...]:
    import re
    out = []
    for s in statements:
        lines = list(s.lines)
        for old, new in names.items():
            lines = [re.sub(rf"\b{re.escape(old)}\b", new, line) for line in lines]
        out.append(Statement(tuple(lines), s.outputs,
                             frozenset(names.get(r, r) for r in s.reads)))
    return tuple(out)


def shrink(program: Program, failure: Failure, time_limit: float | None = 60.0,
           budget_s: float = 120.0) -> Program:
    """The smallest variant of ``program`` found that still fails like ``failure``."""
    start = time.monotonic()
    improved = True
    while improved and time.monotonic() - start < budget_s:
        improved = False
        for candidate in _candidates(program):
            if time.monotonic() - start > budget_s:
                break
            if not candidate.outputs or _cost(candidate) >= _cost(program):
                continue
            result = check(candidate, failure.mode, failure.dtype, time_limit)
            if isinstance(result, Failure) and result.signature == failure.signature:
                program, improved = candidate, True
                break
    return program


def _cost(p: Program) -> tuple:
    return (sum(len(s.lines) for s in p.statements), len(p.statements), len(p.outputs),
            sum(int(np.prod(i.shape, dtype=int)) for i in p.inputs))


# -- sweeps ---------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepReport:
    """Outcome counts per (mode, dtype) and the shrunk failures, with their reproductions."""
    programs: int = 0
    counts: Counter = dataclasses.field(default_factory=Counter)
    failures: list[tuple[Program, Failure]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"{self.programs} programs in {self.seconds:.1f} s"]
        for key in sorted(self.counts):
            lines.append(f"  {key[0]:7s} {key[1]:8s} {key[2]:9s} {self.counts[key]}")
        for program, failure in self.failures:
            lines += [f"\n# seed {program.seed}: {failure.kind} in {failure.mode} "
                      f"({failure.dtype}): {failure.message.splitlines()[0][:300]}",
                      program.body_source()]
        return "\n".join(lines)


def sweep(seeds: Iterable[int], modes: Sequence[str] = MODES, dtypes: Sequence[str] = DTYPES,
          size: int = 8, depth: int = 2, time_limit: float | None = 60.0,
          shrink_failures: bool = True, known: Callable[[Program, Failure], bool] | None = None,
          log: Callable[[str], None] | None = None) -> SweepReport:
    """Generate ``random_program(seed)`` for each seed and check it in every mode and dtype.

    A failing (mode, dtype) is shrunk and recorded once per program; ``known(program,
    failure)`` returning True counts it as ``known`` instead (documented open bugs).
    """
    report = SweepReport()
    start = time.monotonic()
    for seed in seeds:
        program = random_program(seed, size, depth)
        report.programs += 1
        failed = False
        outcomes: Counter = Counter()
        for dtype in dtypes:
            for mode in modes:
                t0 = time.monotonic()
                result = check(program, mode, dtype, time_limit)
                if log and time.monotonic() - t0 > 20:
                    log(f"seed {seed}: {mode} {dtype} took {time.monotonic() - t0:.0f} s")
                outcome = ("ok" if result is None else result if isinstance(result, str)
                           else result.kind)
                if isinstance(result, Failure) and known is not None and known(program, result):
                    outcome = "known"
                report.counts[(mode, dtype, outcome)] += 1
                outcomes[outcome] += 1
                if isinstance(result, Failure) and outcome != "known" and not failed:
                    failed = True
                    if log:
                        log(f"seed {seed}: {result.kind} in {mode} ({dtype}), shrinking: "
                            f"{result.message[:1000]}")
                    small = (shrink(program, result, time_limit)
                             if shrink_failures and result.kind != "timeout" else program)
                    report.failures.append((small, result))
                    if log:
                        log(f"seed {seed}: {result.kind} in {mode} ({dtype})\n"
                            f"{small.body_source()}")
        if log:
            log(f"seed {seed} done: {time.monotonic() - start:.0f} s {dict(outcomes)}")
    report.seconds = time.monotonic() - start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz jaxprop against jax.vjp with random "
                                                 "programs.")
    parser.add_argument("--programs", type=int, default=100, help="how many programs")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first program")
    parser.add_argument("--size", type=int, default=8, help="statements per program")
    parser.add_argument("--depth", type=int, default=2, help="nesting depth of control flow")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes")
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="seconds per program and mode before it counts as a timeout")
    args = parser.parse_args(argv)
    report = sweep(range(args.first_seed, args.first_seed + args.programs),
                   args.modes.split(","), args.dtypes.split(","), args.size, args.depth,
                   args.time_limit, log=lambda s: print(s, flush=True))
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
