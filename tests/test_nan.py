"""NaN origin: the report names the primitive and the user's line where the gradient breaks."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop


def line_of(fn, marker):
    """The file line number of the line of ``fn``'s source holding ``marker``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if marker in text)


def sqrt_at_zero(x):
    y = x * 2.0
    r = jnp.sqrt(y)  # <- origin
    return jnp.sum(r * 3.0)


def log_behind_where(x):
    y = jnp.log(x)  # <- origin
    z = jnp.where(x > 0, y, 0.0)
    return jnp.sum(z)


def zero_times_inf(x, y):
    a = jnp.exp(x)
    b = a * y  # <- origin
    return jnp.sum(b)


def norm_at_zero(x):
    n = jnp.linalg.norm(x)  # <- origin
    return n * 2.0


CASES = [
    (sqrt_at_zero, (jnp.array([0.0, 1.0, 4.0]),), "sqrt"),
    (log_behind_where, (jnp.zeros(40),), "log"),
    (zero_times_inf, (jnp.array([-jnp.inf, 0.0]), jnp.array([jnp.inf, 1.0])), "mul"),
    (norm_at_zero, (jnp.zeros(3),), "sqrt"),
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("fn, args, primitive", CASES, ids=[c[0].__name__ for c in CASES])
def test_report_names_the_primitive_and_line(fn, args, primitive, mode):
    assert not np.all(np.isfinite(jax.grad(fn)(*args)))       # JAX agrees it is broken
    find = lambda *a: jaxprop.find_nan_origin(fn, *a)  # noqa: E731
    report = (jax.jit(find) if mode == "jit" else find)(*args)
    assert report.found
    assert report.primitive == primitive
    assert report.line == line_of(fn, "<- origin")
    assert report.file == __file__
    text = str(report)
    assert f"test_nan.py:{report.line} ({fn.__name__})" in text
    assert __file__ not in text                  # the file name only, as explain prints it
    assert primitive in text


def test_report_shows_the_forward_values():
    report = jaxprop.find_nan_origin(sqrt_at_zero, jnp.array([0.0, 1.0, 4.0]))
    text = str(report)
    assert "input  v1 = [0, 2, 8]" in text           # y = 2x entered sqrt
    assert "downstream ∂L/∂in = [inf," in text       # 3 / (2·√0)
    big = str(jaxprop.find_nan_origin(log_behind_where, jnp.zeros(40)))
    assert "[40]" in big and "zeros=40" in big and "nan=40" in big
    assert "forward pass first produces NaN/inf at log" in big


def test_clean_gradient_reports_nothing():
    report = jaxprop.find_nan_origin(sqrt_at_zero, jnp.array([1.0, 2.0]))
    assert not report.found and report.primitive is None and report.line is None
    assert "No NaN/inf in the gradient" in str(report)
    jitted = jax.jit(lambda x: jaxprop.find_nan_origin(sqrt_at_zero, x))(jnp.ones(2))
    assert not jitted.found


def test_argnums_and_first_of_several():
    def two(x, w):
        a = jnp.sqrt(x)  # <- origin
        b = jnp.log(w)
        return jnp.sum(a) + jnp.sum(b)

    x, w = jnp.zeros(2), jnp.zeros(2)
    assert jaxprop.find_nan_origin(two, x, w).line in (line_of(two, "<- origin"),
                                                       line_of(two, "jnp.log"))
    assert jaxprop.find_nan_origin(two, x, w, argnums=1).primitive == "log"
    assert jaxprop.find_nan_origin(two, x, w, argnums=0).primitive == "sqrt"
