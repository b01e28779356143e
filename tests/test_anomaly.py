"""jaxprop.detect_anomaly: the first backward node that turns a finite gradient into NaN/inf."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop


def line_of(fn, marker):
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if marker in text)


def loss(w, x):
    h = jnp.tanh(x @ w)
    r = jnp.sqrt(h * h)  # <- origin: 1/(2·0) at h = 0
    return jnp.sum(r)


W = jnp.ones((3, 2))
BAD, GOOD = jnp.zeros((4, 3)), jnp.ones((4, 3))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_first_non_finite_cotangent_raises_with_primitive_line_and_values(mode):
    step = jaxprop.grad(loss)
    step = jax.jit(step) if mode == "jit" else step
    assert not np.all(np.isfinite(jax.grad(loss)(W, BAD)))       # JAX's gradient is broken too
    with pytest.raises(jaxprop.NonFiniteGradientError) as info:
        with jaxprop.detect_anomaly():
            step(W, BAD)
    err = info.value
    assert err.primitive == "sqrt"
    assert err.source.endswith(f"test_anomaly.py:{line_of(loss, '<- origin')} (loss)")
    text = str(err)
    assert "input  v" in text and "= [0, 0, 0" in text              # the forward values
    assert "upstream ∂L/∂out = [1, 1" in text and "downstream ∂L/∂in = [inf" in text


def test_clean_steps_pass_and_give_jax_grad():
    step = jax.jit(jaxprop.grad(loss))
    with jaxprop.detect_anomaly():
        g = step(W, GOOD)
    np.testing.assert_allclose(g, jax.grad(loss)(W, GOOD), rtol=1e-5)


def test_nan_born_inside_a_scan_body_under_jit():
    def scanned(w, xs):
        def body(c, x):
            y = jnp.log(c * x)  # <- origin
            return c, jnp.where(x > 0, y, 0.0)
        return jnp.sum(jax.lax.scan(body, w, xs)[1])

    xs = jnp.array([1.0, 0.0, 2.0])
    with pytest.raises(jaxprop.NonFiniteGradientError, match="at log") as info:
        with jaxprop.detect_anomaly():
            jax.jit(jaxprop.grad(scanned))(1.5, xs)
    assert f":{line_of(scanned, '<- origin')} (" in info.value.source


def test_a_step_compiled_before_the_block_is_not_checked_and_that_warns():
    step = jax.jit(jaxprop.grad(loss))
    step(W, GOOD)
    with pytest.warns(jaxprop.ScopeWarning, match="compiled before the block"):
        with jaxprop.detect_anomaly():
            g = step(W, BAD)                        # cached without checks: no error
    assert not np.all(np.isfinite(g))
