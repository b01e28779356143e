"""Primitive coverage: trace a broad sweep of JAX's namespaces and require a rule for every
differentiable primitive they emit, so a JAX upgrade that adds one is caught here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.special as jss
import numpy as np
from jax import lax

from jaxprop import registered
from jaxprop.tracer import HANDLERS

x = jnp.linspace(0.1, 0.9, 6).reshape(2, 3)
v = jnp.linspace(0.1, 0.9, 4)
m = jnp.eye(3) * 2.0 + 0.1
spd = m @ m.T
img = jnp.ones((1, 4, 4, 2))
ker = jnp.ones((3, 3, 2, 2))
idx = jnp.array([0, 2])
key = jax.random.key(0)

SWEEP = {
    # jax.numpy elementwise and reductions
    "numpy_math": lambda: [f(x) for f in (
        jnp.sin, jnp.cos, jnp.tan, jnp.arcsin, jnp.arccos, jnp.arctan, jnp.sinh, jnp.cosh,
        jnp.tanh, jnp.arcsinh, jnp.arctanh, jnp.exp, jnp.exp2, jnp.expm1, jnp.log, jnp.log1p,
        jnp.log2, jnp.log10, jnp.sqrt, jnp.cbrt, jnp.square, jnp.abs, jnp.sign, jnp.floor,
        jnp.ceil, jnp.round, jnp.reciprocal, jnp.negative, jnp.sinc, jnp.deg2rad, jnp.i0)]
    + [jnp.arccosh(x + 1.0)],
    "numpy_binary": lambda: [f(x, x[::-1]) for f in (
        jnp.add, jnp.subtract, jnp.multiply, jnp.divide, jnp.power, jnp.maximum, jnp.minimum,
        jnp.arctan2, jnp.remainder, jnp.fmod, jnp.hypot, jnp.logaddexp, jnp.logaddexp2,
        jnp.copysign, jnp.heaviside, jnp.float_power)] + [x ** 3, x ** -2, jnp.clip(x, .2, .5)],
    "numpy_reductions": lambda: [f(x, axis=1) for f in (
        jnp.sum, jnp.prod, jnp.max, jnp.min, jnp.mean, jnp.var, jnp.std, jnp.cumsum,
        jnp.cumprod, jnp.argmax, jnp.argmin, jnp.median, jnp.nansum, jnp.ptp)]
    + [jnp.linalg.norm(x), jnp.cumulative_sum(v), lax.cummax(v), lax.cummin(v),
       lax.cumlogsumexp(v), jnp.average(x, axis=0, weights=jnp.ones(2))],
    "numpy_structure": lambda: [
        x.T, x.reshape(3, 2), x[None], jnp.squeeze(x[None]), jnp.concatenate([x, x]),
        jnp.stack([x, x]), jnp.tile(x, 2), jnp.repeat(x, 2, axis=0), jnp.flip(x),
        jnp.pad(x, 1), jnp.pad(x, 1, mode="reflect"), jnp.roll(x, 1), jnp.split(x, 3, 1),
        jnp.where(x > .5, x, -x), jnp.sort(x), jnp.argsort(x), jnp.take(x, idx),
        x[:, idx], x[1:, ::2], x.at[0, idx].add(1.0), x.at[0].set(v[:3]),
        x.at[:, 1].multiply(2.0), x.at[idx[:1]].min(0.3), x.at[idx[:1]].max(0.3),
        jnp.take_along_axis(x, jnp.argsort(x), 1), jnp.triu(m), jnp.diag(m), jnp.trace(m),
        jnp.outer(v, v), jnp.kron(m, m), jnp.einsum("ij,jk->ik", m, m), jnp.matmul(m, m),
        jnp.convolve(v, v), jnp.interp(v, v, v), jnp.diff(v), jnp.broadcast_to(v, (2, 4)),
        lax.dynamic_slice(x, (0, 1), (2, 2)), lax.dynamic_update_slice(x, x[:, :1], (0, 1)),
        lax.top_k(v, 2), jnp.searchsorted(v, 0.5), jnp.unique(v, size=4)],
    # jax.nn
    "nn": lambda: [f(x) for f in (
        jax.nn.relu, jax.nn.relu6, jax.nn.sigmoid, jax.nn.softplus, jax.nn.soft_sign,
        jax.nn.silu, jax.nn.log_sigmoid, jax.nn.leaky_relu, jax.nn.hard_tanh, jax.nn.elu,
        jax.nn.celu, jax.nn.selu, jax.nn.gelu, jax.nn.logsumexp, jax.nn.softmax,
        jax.nn.log_softmax, jax.nn.standardize, jax.nn.hard_sigmoid, jax.nn.mish,
        jax.nn.sparse_plus, jax.nn.squareplus)] + [jax.nn.one_hot(idx, 3), jax.nn.glu(v)],
    # special functions
    "scipy_special": lambda: [f(x) for f in (
        jss.erf, jss.erfc, jss.erfinv, jss.gammaln, jss.digamma, jss.expit, jss.logit,
        jss.ndtr, jss.ndtri, jss.log_ndtr, jss.i0e, jss.i1e, jss.i0, jss.i1, jss.entr,
        jss.spence, jss.gamma)]
    + [jss.gammainc(x, x), jss.gammaincc(x, x), jss.polygamma(1, x), jss.xlogy(x, x),
       jss.xlog1py(x, x), jss.betainc(x, x, x), jss.zeta(x + 1.0, x), jss.multigammaln(x + 2, 2),
       jss.logsumexp(x), jss.betaln(x, x), jss.kl_div(x, x), jss.rel_entr(x, x)],
    # linear algebra
    "linalg": lambda: [
        jnp.linalg.inv(m), jnp.linalg.solve(m, v[:3]), jnp.linalg.det(m), jnp.linalg.slogdet(m),
        jnp.linalg.cholesky(spd), jnp.linalg.qr(m), jnp.linalg.svd(m), jnp.linalg.eigh(spd),
        jnp.linalg.pinv(m), jnp.linalg.matrix_power(m, 3), jnp.linalg.eigvalsh(spd),
        jsl.solve_triangular(m, v[:3]), jsl.lu(m), jsl.cho_solve(jsl.cho_factor(spd), v[:3]),
        jsl.expm(m * 0.1), jsl.lu_factor(m), jnp.linalg.lstsq(m, v[:3])],
    "fft": lambda: [jnp.fft.fft(v), jnp.fft.ifft(v), jnp.fft.rfft(v), jnp.fft.irfft(v),
                    jnp.fft.fft2(x), jnp.fft.rfftn(x)],
    # lax: convolution, windows, control flow, custom rules, random
    "lax": lambda: [
        lax.conv_general_dilated(img, ker, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")),
        lax.reduce_window(img, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        lax.reduce_window(img, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "SAME"),
        lax.reduce_window(img, jnp.inf, lax.min, (1, 2, 2, 1), (1, 1, 1, 1), "SAME"),
        lax.scan(lambda c, a: (c * a, c + a), 1.0, v),
        lax.fori_loop(0, 3, lambda i, c: c * 2.0, v),
        lax.cond(True, jnp.sin, jnp.cos, v), lax.switch(1, [jnp.sin, jnp.cos], v),
        lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0), (0, v)),
        jax.checkpoint(lambda a: jnp.sin(jnp.sin(a)))(v),
        lax.optimization_barrier(v), lax.reduce_precision(v, 5, 10),
        lax.stop_gradient(v), lax.rsqrt(v), lax.integer_pow(v, 3), lax.logistic(v),
        lax.erf_inv(v * 0.5), lax.lgamma(v), lax.igamma(v, v), lax.bessel_i1e(v),
        lax.complex(v, v), lax.real(lax.complex(v, v)), lax.imag(lax.complex(v, v)),
        lax.conj(lax.complex(v, v)), lax.abs(lax.complex(v, v)), lax.clamp(0.2, v, 0.5),
        lax.select(v > 0.5, v, -v), lax.rem(v, 0.3), lax.sort((v, v), num_keys=1),
        jax.jit(jnp.sin)(v), jax.random.normal(key, (3,)) * v[:3],
        jax.random.uniform(key, (3,)) + v[:3], jax.random.bernoulli(key, 0.5, (3,)),
        jax.random.split(key), lax.expand_dims(v, (0,)), lax.collapse(x, 0, 2)],
}


def collect(jaxpr, names):
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            collect(sub, names)
    return names


def emitted_primitives():
    """name -> the sweep groups that emit it, with whether it has a float output."""
    found: dict[str, set[str]] = {}
    differentiable: set[str] = set()
    for group, make in SWEEP.items():
        closed = jax.make_jaxpr(make)()
        for name in collect(closed.jaxpr, set()):
            found.setdefault(name, set()).add(group)
        _float_outputs(closed.jaxpr, differentiable)
    return found, differentiable


def _is_float(var):
    return jnp.issubdtype(getattr(var.aval, "dtype", np.int32), jnp.inexact)


def _float_outputs(jaxpr, acc):
    """Primitives that map a float input to a float output: the ones needing a rule."""
    for eqn in jaxpr.eqns:
        if any(map(_is_float, eqn.outvars)) and any(map(_is_float, eqn.invars)):
            acc.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _float_outputs(sub, acc)


def test_every_differentiable_primitive_has_a_rule():
    found, differentiable = emitted_primitives()
    known = registered() | set(HANDLERS) | {"custom_jvp_call", "custom_vjp_call"}
    missing = sorted(n for n in differentiable if n not in known)
    assert not missing, f"primitives with float outputs and no jaxprop rule: {missing}"


def test_sweep_is_broad():
    found, differentiable = emitted_primitives()
    assert len(found) >= 120, len(found)
    assert len(differentiable) >= 100, len(differentiable)
