"""Elementwise rules against jax.vjp, at orders 1 and 2, over dtypes, shapes and edge values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop.testing import check_vjp

def arr(values, dtype):
    return jnp.asarray(np.asarray(values, dtype=np.float64), dtype)


# name -> (function, sample values inside its domain, including edge values)
UNARY = {
    "neg": (lax.neg, [-1.5, 0.0, 2.0]),
    "exp": (jnp.exp, [-2.0, 0.0, 1.3]),
    "exp2": (jnp.exp2, [-2.0, 0.0, 1.3]),
    "log": (jnp.log, [0.3, 1.0, 4.0]),
    "log1p": (jnp.log1p, [-0.5, 0.0, 3.0]),
    "expm1": (jnp.expm1, [-2.0, 0.0, 1e-4, 1.5]),
    "logistic": (jax.nn.sigmoid, [-3.0, 0.0, 2.5]),
    "tanh": (jnp.tanh, [-2.0, 0.0, 0.7]),
    "sqrt": (jnp.sqrt, [0.25, 1.0, 9.0]),
    "rsqrt": (lax.rsqrt, [0.25, 1.0, 9.0]),
    "cbrt": (jnp.cbrt, [-8.0, 0.3, 27.0]),
    "square": (jnp.square, [-2.0, 0.0, 1.5]),
    "sin": (jnp.sin, [-2.0, 0.0, 1.0]),
    "cos": (jnp.cos, [-2.0, 0.0, 1.0]),
    "tan": (jnp.tan, [-1.0, 0.0, 1.2]),
    "asin": (jnp.arcsin, [-0.9, 0.0, 0.5]),
    "acos": (jnp.arccos, [-0.9, 0.0, 0.5]),
    "atan": (jnp.arctan, [-3.0, 0.0, 0.5]),
    "sinh": (jnp.sinh, [-2.0, 0.0, 1.0]),
    "cosh": (jnp.cosh, [-2.0, 0.0, 1.0]),
    "asinh": (jnp.arcsinh, [-2.0, 0.0, 1.0]),
    "acosh": (jnp.arccosh, [1.2, 2.0, 5.0]),
    "atanh": (jnp.arctanh, [-0.9, 0.0, 0.5]),
    "abs": (jnp.abs, [-2.0, 0.0, 1.0, -0.0]),       # JAX: +1 at 0
    "sign": (jnp.sign, [-2.0, 0.0, 1.0]),
    "floor": (jnp.floor, [-2.5, 0.0, 1.2]),
    "ceil": (jnp.ceil, [-2.5, 0.0, 1.2]),
    "round": (jnp.round, [-2.5, 0.5, 1.2]),
    "round_away": (lambda x: lax.round(x, lax.RoundingMethod.AWAY_FROM_ZERO), [-2.5, 0.5]),
    "integer_pow3": (lambda x: x ** 3, [-2.0, 0.0, 1.5]),
    "integer_pow2": (lambda x: lax.integer_pow(x, 2), [-2.0, 0.0, 1.5]),
    "integer_pow1": (lambda x: lax.integer_pow(x, 1), [-2.0, 0.0, 1.5]),
    "integer_pow0": (lambda x: lax.integer_pow(x, 0), [-2.0, 0.0, 1.5]),
    "integer_pow_neg": (lambda x: lax.integer_pow(x, -3), [-2.0, 0.5, 1.5]),
    "integer_pow_neg_at0": (lambda x: lax.integer_pow(x, -2), [0.0, 1.0]),
    "reduce_precision": (lambda x: lax.reduce_precision(x, 5, 10), [-2.0, 0.3, 1.5]),
    "copy": (lambda x: lax.copy_p.bind(x), [-2.0, 0.3]),
    "stop_gradient": (lambda x: x * lax.stop_gradient(x), [-2.0, 0.3]),
    "is_finite": (lambda x: jnp.where(jnp.isfinite(x), x, 0.0), [-2.0, 0.3]),
    "sqrt_at0": (jnp.sqrt, [0.0, 1.0]),              # ∞ at 0, as JAX
    "log_at0": (jnp.log, [0.0, 1.0]),
    "cbrt_at0": (jnp.cbrt, [0.0, 1.0]),
    "logistic_far": (jax.nn.sigmoid, [-40.0, 40.0]),
    "tanh_far": (jnp.tanh, [-30.0, 30.0]),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, dtype):
    fn, values = UNARY[name]
    x = arr(values, dtype)
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    check_vjp(fn, x, order=2, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", ["tanh", "log", "square", "abs", "integer_pow3", "sqrt"])
@pytest.mark.parametrize("shape", [(), (2, 3), (0, 2)])
def test_unary_shapes(name, shape):
    fn, values = UNARY[name]
    x = jnp.resize(jnp.asarray(values, jnp.float32), shape) if shape != (0, 2) else \
        jnp.zeros(shape, jnp.float32)
    check_vjp(fn, x, order=2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["exp", "tanh", "logistic", "log", "sin", "sqrt", "abs",
                                  "expm1", "integer_pow3", "rsqrt"])
def test_unary_low_precision(name, low):
    fn, values = UNARY[name]
    x = arr(values, low)
    check_vjp(fn, x, order=2, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name", ["tanh", "logistic", "expm1", "sin", "cos", "exp", "log"])
def test_accuracy_highest(name):
    """Transcendentals asked for their most accurate evaluation use JAX's stable formulas."""
    fn = {"tanh": lax.tanh, "logistic": lax.logistic, "expm1": lax.expm1, "sin": lax.sin,
          "cos": lax.cos, "exp": lax.exp, "log": lax.log}[name]
    x = jnp.asarray([0.3, 1.2, 2.5], jnp.float32)
    check_vjp(lambda x: fn(x, accuracy=lax.AccuracyMode.HIGHEST), x, order=2, rtol=1e-4,
              atol=1e-4)


BINARY = {
    "add": (lax.add, [1.0, -2.0, 0.5], [0.3, 2.0, -1.0]),
    "sub": (lax.sub, [1.0, -2.0, 0.5], [0.3, 2.0, -1.0]),
    "mul": (lax.mul, [1.0, -2.0, 0.0], [0.3, 2.0, -1.0]),
    "div": (lax.div, [1.0, -2.0, 0.0], [0.3, 2.0, -1.5]),
    "rem": (lax.rem, [5.5, -7.0, 0.3, 2.0], [2.0, 2.5, -1.5, 3.0]),
    "max": (lax.max, [1.0, -2.0, 0.5, 3.0], [0.3, 2.0, 0.5, 3.0]),      # ties split ½/½
    "min": (lax.min, [1.0, -2.0, 0.5, 3.0], [0.3, 2.0, 0.5, 3.0]),
    "pow": (lax.pow, [1.5, 0.5, 2.0], [2.0, -1.3, 0.5]),
    "pow_negbase": (lax.pow, [-1.5, -2.0], [2.0, 3.0]),                   # nan in ∂y, as JAX
    "pow_zero_base": (lax.pow, [0.0, 0.0, 0.0], [2.0, 0.5, 0.0]),
    "atan2": (lax.atan2, [1.0, -2.0, 0.5], [0.3, 2.0, -1.0]),
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary(name, dtype):
    fn, xs, ys = BINARY[name]
    x, y = arr(xs, dtype), arr(ys, dtype)
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    check_vjp(fn, x, y, order=2, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "max", "min", "pow", "atan2",
                                  "rem"])
def test_binary_broadcast_scalar(name):
    """lax broadcasts rank-0 operands: the scalar's cotangent sums over the copies."""
    fn, xs, ys = BINARY[name]
    x = jnp.asarray(xs, jnp.float32).reshape(-1, 1) * jnp.ones((1, 2), jnp.float32)
    y = jnp.asarray(ys[0], jnp.float32)
    check_vjp(fn, x, y, order=2, rtol=1e-4, atol=1e-4)
    check_vjp(fn, y, x, order=2, rtol=1e-4, atol=1e-4)


def test_jnp_broadcasting():
    f = lambda x, y: jnp.maximum(x, y) * jnp.power(jnp.abs(x) + 1, y) / (y + 3)
    x = jnp.asarray([[1.0], [2.0], [-0.5]])
    y = jnp.asarray([0.5, 1.0, -1.0, 2.0])
    check_vjp(f, x, y, order=2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["add", "mul", "div", "max", "pow", "atan2"])
def test_binary_low_precision(name, low):
    fn, xs, ys = BINARY[name]
    check_vjp(fn, arr(xs, low), arr(ys, low), order=2, rtol=5e-2, atol=5e-2)


def test_max_min_ties_split_half():
    x = jnp.asarray([1.0, 2.0, 3.0])
    y = jnp.asarray([1.0, 0.0, 3.0])
    gx, gy = jaxprop.grad(lambda x, y: jnp.sum(jnp.maximum(x, y)), argnums=(0, 1))(x, y)
    np.testing.assert_array_equal(gx, [0.5, 1.0, 0.5])
    np.testing.assert_array_equal(gy, [0.5, 0.0, 0.5])
    gx, gy = jaxprop.grad(lambda x, y: jnp.sum(jnp.minimum(x, y)), argnums=(0, 1))(x, y)
    np.testing.assert_array_equal(gx, [0.5, 0.0, 0.5])
    np.testing.assert_array_equal(gy, [0.5, 1.0, 0.5])
    # signed zeros tie too; nan gives nobody a gradient
    a, b = jnp.asarray([0.0, jnp.nan]), jnp.asarray([-0.0, 1.0])
    check_vjp(lax.max, a, b, order=2)
    check_vjp(lax.min, a, b, order=2)


def test_pow_integer_exponent(dtype):
    """pow with an integer exponent array: y gets no cotangent; 0⁰ is flat in x."""
    x = arr([0.0, 2.0, -1.5, 0.0], dtype)
    y = jnp.asarray([0, 3, 2, 1], jnp.int32)
    check_vjp(lambda x: lax.pow(x, y), x, order=2)
    out, pull = jaxprop.vjp(lax.pow, x, y)
    assert pull(jnp.ones_like(out))[1].dtype == jax.dtypes.float0


def test_jnp_power_and_logaddexp(dtype):
    x = arr([0.5, -1.0, 3.0], dtype)
    y = arr([1.5, -2.0, 3.0], dtype)
    check_vjp(jnp.logaddexp, x, y, order=2)
    check_vjp(jnp.logaddexp2, x, y, order=2)
    check_vjp(lambda x, y: jnp.power(jnp.abs(x), y), x, y, order=2)
    check_vjp(lambda x: jnp.power(x, 3), x, order=2)


def test_logaddexp_infinities():
    """logaddexp's custom JVP handles -inf inputs (where a naive rule gives nan)."""
    x = jnp.asarray([-jnp.inf, 0.0, -jnp.inf])
    y = jnp.asarray([1.0, -jnp.inf, -jnp.inf])
    check_vjp(jnp.logaddexp, x, y, order=1)


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)])
def test_clamp(lo, hi, dtype):
    """JAX's convention: at x == lo or x == hi no input gets the gradient."""
    x = arr([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0], dtype)
    lo_a, hi_a = jnp.full_like(x, lo), jnp.full_like(x, hi)
    check_vjp(lax.clamp, lo_a, x, hi_a, order=2)
    check_vjp(lambda x: jnp.clip(x, lo, hi), x, order=2)


def test_clamp_scalar_bounds():
    """Rank-0 bounds (JAX's own vjp fails there): compared with the same bounds broadcast."""
    x = jnp.asarray([-1.0, 0.0, 0.25, 1.0, 2.0])
    lo, hi = jnp.asarray(0.0), jnp.asarray(1.0)
    ct = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0])
    _, pull = jaxprop.vjp(lax.clamp, lo, x, hi)
    glo, gx, ghi = pull(ct)
    _, pull_ref = jax.vjp(lax.clamp, jnp.full_like(x, 0.0), x, jnp.full_like(x, 1.0))
    rlo, rx, rhi = pull_ref(ct)
    np.testing.assert_allclose(glo, rlo.sum())
    np.testing.assert_allclose(gx, rx)
    np.testing.assert_allclose(ghi, rhi.sum())
    assert float(glo) == 1.0 and float(ghi) == 5.0


@pytest.mark.parametrize("pred_dtype", ["bool", "int32"])
def test_select_n_two_cases(pred_dtype, dtype):
    p = jnp.asarray([0, 1, 1, 0], pred_dtype)
    a, b = arr([1.0, 2.0, 3.0, 4.0], dtype), arr([-1.0, -2.0, -3.0, -4.0], dtype)
    check_vjp(lambda a, b: lax.select_n(p, a, b) ** 2, a, b, order=2)
    check_vjp(lambda a: lax.select_n(p, a, jnp.sin(a)), a, order=2)


def test_select_n_three_cases(dtype):
    p = jnp.asarray([0, 1, 2, 2, 1], jnp.int32)
    a, b, c = (arr(np.arange(5) + k, dtype) for k in (0.5, 10.0, -7.0))
    check_vjp(lambda a, b, c: lax.select_n(p, a, b * b, c), a, b, c, order=2)
    check_vjp(lambda a: lax.select_n(jnp.asarray(True), a, a * 3), a, order=2)


def test_where_scalar_predicate_and_broadcast():
    x = jnp.asarray([[1.0, -2.0, 3.0]])
    check_vjp(lambda x: jnp.where(x > 0, x, 0.1 * x), x, order=2)
    check_vjp(lambda x: jnp.where(x > 0, jnp.log(jnp.abs(x)), 0.0), x, order=2)


@pytest.mark.parametrize("src,dst", [("float32", "float16"), ("float32", "bfloat16"),
                                     ("float16", "float32"), ("float32", "float64"),
                                     ("float64", "float32")])
def test_convert_element_type_float(src, dst, x64):
    x = arr([1.5, -2.25, 0.0], src)
    check_vjp(lambda x: lax.convert_element_type(x, jnp.dtype(dst)) ** 2, x, order=2,
              rtol=1e-2, atol=1e-2)


def test_convert_element_type_int():
    x = jnp.asarray([1.5, -2.25, 3.7])
    # float -> int: piecewise constant, no gradient
    check_vjp(lambda x: x * lax.convert_element_type(x, jnp.int32), x, order=2)
    g = jaxprop.grad(lambda x: jnp.sum(x.astype(jnp.int32).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(g, jnp.zeros(3))
    # int -> float: an integer input gets a float0 cotangent
    i = jnp.asarray([1, 2, 3])
    out, pull = jaxprop.vjp(lambda i, x: i.astype(jnp.float32) * x, i, x)
    gi, gx = pull(jnp.ones(3))
    assert gi.dtype == jax.dtypes.float0
    np.testing.assert_array_equal(gx, [1.0, 2.0, 3.0])


def test_nextafter_identity_in_x():
    """jaxprop's documented choice (JAX raises): nextafter(x, y) has ∂x = 1, ∂y = 0."""
    x = jnp.asarray([1.0, -2.0])
    y = jnp.asarray([5.0, -5.0])
    gx, gy = jaxprop.grad(lambda x, y: jnp.sum(3.0 * jnp.nextafter(x, y)), argnums=(0, 1))(x, y)
    np.testing.assert_array_equal(gx, [3.0, 3.0])
    np.testing.assert_array_equal(gy, [0.0, 0.0])
    with pytest.raises(NotImplementedError):
        jax.grad(lambda x: jnp.sum(jnp.nextafter(x, y)))(x)


def test_copysign(dtype):
    x = arr([1.0, -2.0, 0.5, -0.0], dtype)
    y = arr([-1.0, 2.0, 0.0, 1.0], dtype)
    check_vjp(jnp.copysign, x, y, order=2)


COMPOSITES = {
    "log2": jnp.log2, "log10": jnp.log10, "hypot": jnp.hypot, "fmod": jnp.fmod,
    "remainder": jnp.remainder, "arctan2": jnp.arctan2, "softplus": jax.nn.softplus,
    "gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu, "elu": jax.nn.elu,
    "log_sigmoid": jax.nn.log_sigmoid, "sinc": jnp.sinc, "float_power": jnp.float_power,
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composites(name):
    """jnp / jax.nn functions that lower to several of these primitives (some custom_jvp)."""
    f = COMPOSITES[name]
    x = jnp.asarray([0.3, -1.2, 2.0, 0.0])
    if name in ("hypot", "fmod", "remainder", "arctan2"):
        args = (x, x[::-1] + 0.1)
    elif name == "float_power":
        args = (jnp.abs(x) + 0.5, x)
    else:
        args = (x,)
    check_vjp(f, *args, order=2)


def test_under_jit_and_vmap():
    f = lambda x: jnp.sum(jnp.tanh(x) * jnp.exp(-x * x) + jnp.maximum(x, 0.0) ** 1.5)
    x = jnp.linspace(-1.0, 2.0, 6)
    g = jax.jit(jaxprop.grad(f))(x)
    np.testing.assert_allclose(g, jax.grad(f)(x), rtol=1e-5)
    gv = jax.vmap(jaxprop.grad(lambda s: f(s * x)))(jnp.asarray([0.5, 1.0]))
    np.testing.assert_allclose(gv, jax.vmap(jax.grad(lambda s: f(s * x)))(
        jnp.asarray([0.5, 1.0])), rtol=1e-5)


def test_finite_differences(x64):
    x = jnp.asarray([0.3, 0.7, 1.4])
    f = lambda x: jnp.tanh(x) * jnp.arctan2(x, 1.0 + x) + jnp.cbrt(x) * jnp.arcsinh(x)
    check_vjp(f, x, order=1, finite_differences=True, rtol=1e-7)
