"""jaxprop.fuzz: random programs compared with jax.vjp (eager, jit, vmap, order 2; f32, f64)."""

import time

import jax.numpy as jnp
import pytest

import jaxprop

from jaxprop import fuzz


def test_programs_are_deterministic_readable_python():
    a, b = fuzz.random_program(11), fuzz.random_program(11)
    assert a == b and a.body_source().startswith("def f(")
    args = a.arguments("float32")
    a.function()(*args)                                      # the source is what runs
    compile(a.source("jit", "float64"), "<repro>", "exec")


def test_a_wrong_rule_is_found_and_shrunk(monkeypatch):
    """A sin whose jaxprop rule is off by a factor 2: found, and shrunk to the sin alone."""
    doubled = jaxprop.vjp_rule(lambda ct, out, x: 2.0 * ct * jnp.cos(x))
    monkeypatch.setitem(fuzz._NS, "bad_sin", jaxprop.override("sin", doubled)(jnp.sin))
    program = fuzz.Program(
        (fuzz.Input("x0", (3,)), fuzz.Input("x1", (2, 3))),
        (fuzz.Statement(("v0 = jnp.tanh(x0) * x1",), ("v0",), frozenset({"x0", "x1"})),
         fuzz.Statement(("v1 = bad_sin(v0)",), ("v1",), frozenset({"v0"})),
         fuzz.Statement(("v2 = jnp.sum(v1, axis=0)",), ("v2",), frozenset({"v1"})),
         fuzz.Statement(("v3 = jnp.cos(x0)",), ("v3",), frozenset({"x0"}))),
        ("v2", "v3"), seed=3)
    failure = fuzz.check(program, "eager", "float32")
    assert failure.kind == "mismatch"
    small = fuzz.shrink(program, failure)
    assert [s.lines for s in small.statements][0] == ("v1 = bad_sin(v0_)",)
    assert len(small.statements) <= 2 and [i.shape for i in small.inputs] == [(1, 1)]
    assert "bad_sin(v0_)" in small.source()


def test_time_limit_reports_instead_of_hanging():
    slow = fuzz.Program((fuzz.Input("x0", (2,)),), (
        fuzz.Statement(("import time as _t; _t.sleep(5); v0 = x0 * 2.0",), ("v0",),
                       frozenset({"x0"})),), ("v0",))
    start = time.monotonic()
    failure = fuzz.check(slow, "eager", "float32", time_limit=0.5)
    assert failure.kind == "timeout" and time.monotonic() - start < 3


def test_short_sweep():
    """A seeded sweep over every mode and dtype (CI: a few programs; see the slow one)."""
    report = fuzz.sweep(range(2), size=4, depth=1, time_limit=120)
    assert report.ok, str(report)


@pytest.mark.slow
def test_long_sweep():
    report = fuzz.sweep(range(1000, 1100), time_limit=120)   # 40–90 s per program on 2 busy cores
    assert report.ok, str(report)
