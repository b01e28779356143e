"""Discrete Fourier transforms. A DFT matrix is symmetric, so the transpose of an FFT is the
same FFT; the real transforms add a slice (RFFT) or a Hermitian fold (IRFFT) around it.

With ω = e^{−2πi/N}: ``rfft`` is the first M = N/2+1 entries of the complex FFT of a real x,
so its transpose zero-pads ct to N, applies the FFT and keeps the real part (the transpose of
embedding ℝ in ℂ). ``irfft`` is x_n = (1/N) Σ_k c_k Re(z_k ω^{−kn}) with c_k = 1 for the DC
(and, N even, the Nyquist) term and 2 otherwise; under JAX's convention Re(a z) transposes to
a·ct, so ct_z = (c / N) · conj(rfft(ct)).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop.registry import defvjp
from jaxprop.rules._util import convert_like


def _fft(ct, out, x, fft_type, fft_lengths):
    """fft: FFT/IFFT → the same transform; RFFT → Re FFT(pad ct); IRFFT → c·conj(RFFT ct)/N."""
    kind = lax.FftType(int(fft_type))
    if kind == lax.FftType.RFFT:
        n, m = fft_lengths[-1], ct.shape[-1]
        padded = jnp.pad(ct, [(0, 0)] * (ct.ndim - 1) + [(0, n - m)])
        return convert_like(jnp.real(lax.fft(padded, lax.FftType.FFT, fft_lengths)), x.dtype)
    if kind == lax.FftType.IRFFT:
        n, m = fft_lengths[-1], x.shape[-1]
        fold = np.full((m,), 2.0)
        fold[0] = 1.0
        if n % 2 == 0:
            fold[-1] = 1.0
        spectrum = lax.fft(ct, lax.FftType.RFFT, fft_lengths)
        scale = (fold / math.prod(fft_lengths)).astype(np.dtype(ct.dtype))
        return convert_like(jnp.conj(spectrum * scale), x.dtype)
    return lax.fft(ct, kind, fft_lengths)


defvjp("fft", _fft)
