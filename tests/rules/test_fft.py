"""FFT rules (FFT, IFFT, RFFT, IRFFT in 1-3 dimensions) against jax.vjp at orders 1 and 2.

Complex outputs get complex random cotangents from check_vjp, so JAX's convention for the
real transforms (RFFT: real input, IRFFT: real output) is checked, not just the real part.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop
from jaxprop.testing import check_vjp

RNG = np.random.default_rng(1)


def normal(*shape, dtype="float32"):
    x = RNG.normal(size=shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * RNG.normal(size=shape)
    return jnp.asarray(x, dtype)


def check(f, x, tol=None):
    tol = tol or (1e-4 if jnp.dtype(x.dtype).itemsize <= 8 else 1e-10)
    for order in (1, 2):
        check_vjp(f, x, order=order, rtol=tol, atol=tol)


# name -> (function, input shape, input is complex)
CASES = {
    "fft": (jnp.fft.fft, (6,), True),
    "ifft": (jnp.fft.ifft, (5,), True),
    "fft_real_input": (jnp.fft.fft, (4, 5), False),
    "fft2": (jnp.fft.fft2, (3, 4), True),
    "ifftn_3d": (jnp.fft.ifftn, (2, 3, 4), True),
    "rfft_even": (jnp.fft.rfft, (6,), False),
    "rfft_odd": (jnp.fft.rfft, (2, 5), False),
    "rfft_padded": (lambda x: jnp.fft.rfft(x, n=8), (5,), False),
    "rfft2": (jnp.fft.rfft2, (3, 4), False),
    "rfftn_3d_odd": (jnp.fft.rfftn, (2, 3, 5), False),
    "irfft_even": (jnp.fft.irfft, (4,), True),            # n = 6
    "irfft_odd": (lambda z: jnp.fft.irfft(z, n=7), (2, 4), True),
    "irfft_truncated": (lambda z: jnp.fft.irfft(z, n=4), (5,), True),
    "irfft2": (jnp.fft.irfft2, (3, 4), True),
    "irfftn_3d": (lambda z: jnp.fft.irfftn(z, s=(2, 3, 5)), (2, 3, 3), True),
    "rfft_ortho": (lambda x: jnp.fft.rfft(x, norm="ortho"), (6,), False),
    "irfft_forward_norm": (lambda z: jnp.fft.irfft(z, norm="forward"), (4,), True),
    "roundtrip": (lambda x: jnp.fft.irfft(jnp.fft.rfft(x) * jnp.arange(4.0), n=6), (6,), False),
    "hfft": (jnp.fft.hfft, (4,), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fft_float32(name):
    f, shape, is_complex = CASES[name]
    check(f, normal(*shape, dtype="complex64" if is_complex else "float32"))


@pytest.mark.parametrize("name", ["fft2", "rfft_odd", "irfft_odd", "rfftn_3d_odd", "irfft2"])
def test_fft_float64(x64, name):
    f, shape, is_complex = CASES[name]
    check(f, normal(*shape, dtype="complex128" if is_complex else "float64"))


def test_irfft_ignores_dc_and_nyquist_imaginary_parts_like_jax():
    """irfft drops Im z₀ (and Im z_{N/2} for even N); the cotangent convention still matches."""
    z = jnp.asarray([1.0 + 5.0j, 2.0 - 1.0j, 0.5 + 3.0j], jnp.complex64)  # n = 4: z₂ is Nyquist
    check(jnp.fft.irfft, z)


def test_fft_empty_batch():
    check(jnp.fft.rfft, jnp.zeros((0, 6), jnp.float32))


def test_spectral_loss_under_jit_and_vmap():
    loss = lambda x: jnp.sum(jnp.abs(jnp.fft.rfft(x)) ** 2 * jnp.arange(5.0))
    x = normal(3, 8)
    np.testing.assert_allclose(jax.jit(jax.vmap(jaxprop.grad(loss)))(x),
                               jax.vmap(jax.grad(loss))(x), rtol=1e-4, atol=1e-4)
