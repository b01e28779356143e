"""Complex inputs and complex cotangents against jax.vjp (JAX's no-conjugation convention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop.testing import check_vjp

CDTYPES = ["complex64", "complex128"]


@pytest.fixture(params=CDTYPES)
def cdtype(request):
    """complex64, and complex128 under x64."""
    if request.param == "complex128":
        request.getfixturevalue("x64")
    return jnp.dtype(request.param)


def carr(values, dtype):
    return jnp.asarray(np.asarray(values, np.complex128), dtype)


Z = [0.5 + 0.3j, -1.2 + 0.7j, 0.2 - 0.9j]

HOLOMORPHIC = {
    "exp": jnp.exp, "exp2": jnp.exp2, "log": jnp.log, "log1p": jnp.log1p, "expm1": jnp.expm1,
    "sqrt": jnp.sqrt, "rsqrt": lax.rsqrt, "square": jnp.square, "cube": lambda z: z ** 3,
    "inv": lambda z: 1 / z, "int_pow_neg": lambda z: lax.integer_pow(z, -2),
    "sin": jnp.sin, "cos": jnp.cos, "tan": jnp.tan, "tanh": jnp.tanh, "sinh": jnp.sinh,
    "cosh": jnp.cosh, "asin": jnp.arcsin, "acos": jnp.arccos, "atan": jnp.arctan,
    "asinh": jnp.arcsinh, "acosh": jnp.arccosh, "atanh": jnp.arctanh,
    "logistic": lax.logistic, "neg": jnp.negative,
}


@pytest.mark.parametrize("name", sorted(HOLOMORPHIC))
def test_holomorphic(name, cdtype):
    tol = 1e-4 if cdtype == jnp.complex64 else 1e-10
    check_vjp(HOLOMORPHIC[name], carr(Z, cdtype), order=2, rtol=tol, atol=tol)


BINARY = {
    "mul": lax.mul, "div": lax.div, "add": lax.add, "sub": lax.sub, "pow": lax.pow,
    "complex_parts": lambda z, w: lax.complex(jnp.real(z) * jnp.imag(w), jnp.abs(w)),
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary(name, cdtype):
    tol = 1e-4 if cdtype == jnp.complex64 else 1e-10
    z, w = carr(Z, cdtype), carr([1.1 - 0.2j, 0.3 + 0.4j, -0.7 - 0.5j], cdtype)
    check_vjp(BINARY[name], z, w, order=2, rtol=tol, atol=tol)


def test_real_imag_conj_abs(cdtype):
    z = carr(Z + [0.0], cdtype)
    for f in [jnp.real, jnp.imag, jnp.conj, jnp.abs, jnp.angle,
              lambda z: jnp.real(z) * jnp.imag(z) ** 2 + jnp.abs(z) ** 3,
              lambda z: jnp.conj(z) * z, lambda z: jnp.exp(jnp.conj(z)) * jnp.abs(z)]:
        check_vjp(f, z, order=2)


def test_abs_complex_zero():
    """|z| at z = 0: JAX's rule gives 0 (it divides by a 1 there), so does jaxprop's."""
    z = jnp.asarray([0.0 + 0.0j, 3.0 + 4.0j])
    check_vjp(jnp.abs, z, order=1)
    g = jaxprop.grad(lambda z: jnp.sum(jnp.abs(z)))(z)
    np.testing.assert_allclose(g, jax.grad(lambda z: jnp.sum(jnp.abs(z)))(z))
    np.testing.assert_allclose(g, [0.0, 0.6 - 0.8j])


def test_complex_from_real_parts():
    x, y = jnp.asarray([1.0, -2.0, 0.5]), jnp.asarray([0.3, 0.0, -1.0])
    check_vjp(lax.complex, x, y, order=2)
    check_vjp(lambda x, y: jnp.exp(lax.complex(x, y)), x, y, order=2)
    check_vjp(lambda x: lax.complex(x, jnp.float32(2.0)), x, order=2)   # rank-0 imaginary part


def test_conj_of_real():
    """conj of a real array is complex; its cotangent is the real part of ct."""
    x = jnp.asarray([1.0, -2.0, 0.5])
    check_vjp(lambda x: lax.conj(x) * (1 + 2j), x, order=2)


def test_convert_real_complex(x64):
    x = jnp.asarray([1.0, -2.0, 0.5])
    z = jnp.asarray([1.0 + 2j, -0.5j, 3.0])
    check_vjp(lambda x: lax.convert_element_type(x, jnp.complex128) * (1 + 2j), x, order=2)
    check_vjp(lambda x: x.astype(jnp.complex64) ** 2, x.astype(jnp.float32), order=2)
    with pytest.warns(np.exceptions.ComplexWarning):
        check_vjp(lambda z: lax.convert_element_type(z, jnp.float64) ** 2, z, order=2)
    check_vjp(lambda z: z.astype(jnp.complex64) * z.astype(jnp.complex64), z, order=2,
              rtol=1e-5, atol=1e-5)


def test_real_to_complex_pipeline(cdtype):
    """A real loss of complex intermediates: gradients of the real parameters."""
    rdtype = jnp.float32 if cdtype == jnp.complex64 else jnp.float64
    a = jnp.asarray([0.3, -0.2, 1.1], rdtype)

    def loss(a):
        z = jnp.exp(1j * a) * (a + 2.0) / (1.0 + 0.5j * a)
        return jnp.sum(jnp.abs(jnp.sin(z)) ** 2 + jnp.real(jnp.log(z)))

    check_vjp(loss, a, order=2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jaxprop.grad(loss)(a), jax.grad(loss)(a), rtol=1e-4)


def test_where_sign_and_broadcast_complex():
    z = carr(Z, jnp.complex64)
    check_vjp(lambda z: jnp.where(jnp.real(z) > 0, z * z, jnp.sign(z) + z), z, order=2)
    check_vjp(lambda z: z * (2 - 1j), z, order=2)


def test_finite_differences_holomorphic(x64):
    """Independent of JAX: for holomorphic f the VJP is ct·f'(z); FD along the real axis."""
    z = jnp.asarray([0.5 + 0.3j, -1.2 + 0.7j])
    f = lambda z: jnp.tanh(z) * jnp.sqrt(z) + jnp.arcsin(z)
    ct = jnp.asarray([1.0 - 0.5j, 0.2 + 1.0j])
    _, pull = jaxprop.vjp(f, z)
    eps = 1e-6
    fd = (f(z + eps) - f(z - eps)) / (2 * eps)
    np.testing.assert_allclose(pull(ct)[0], ct * fd, rtol=1e-7)
