"""Special-function rules against jax.vjp at orders 1 and 2 (and JAX's refusals)."""

import jax
import jax.numpy as jnp
import jax.scipy.special as sp
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop.testing import check_vjp


def arr(values, dtype=jnp.float32):
    return jnp.asarray(np.asarray(values, np.float64), dtype)


def tol(dtype, f32=1e-4):
    return f32 if dtype == jnp.float32 else 1e-9


UNARY = {
    "erf": (sp.erf, [-2.0, -0.3, 0.0, 1.1]),
    "erfc": (sp.erfc, [-2.0, -0.3, 0.0, 1.1]),
    "erf_inv": (sp.erfinv, [-0.9, -0.2, 0.0, 0.7]),
    "lgamma": (sp.gammaln, [0.3, 1.0, 2.5, 7.0, -1.5]),
    "digamma": (sp.digamma, [0.3, 1.0, 2.5, 7.0]),
    "i0e": (sp.i0e, [-3.0, -0.5, 0.0, 0.5, 12.0]),
    "i1e": (sp.i1e, [-3.0, -0.5, 0.0, 1e-9, 0.5, 12.0]),
    "i0": (sp.i0, [-1.5, 0.0, 2.0]),
    "i1": (sp.i1, [-1.5, 0.0, 2.0]),
    "ndtr": (sp.ndtr, [-3.0, 0.0, 1.5]),
    "ndtri": (sp.ndtri, [0.1, 0.5, 0.93]),
    "log_ndtr": (sp.log_ndtr, [-12.0, -1.0, 0.0, 3.0]),
    "expit": (sp.expit, [-3.0, 0.0, 2.0]),
    "logit": (sp.logit, [0.1, 0.5, 0.8]),
    "gamma": (sp.gamma, [0.4, 1.5, 3.2]),
    "entr": (sp.entr, [0.0, 0.3, 2.0]),
    "erfcx": (sp.erfcx, [-1.0, 0.5, 3.0]),
}


SLOW_UNARY = {"ndtri", "gamma"}   # a scan / many primitives: several seconds each


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_UNARY
                                  else n for n in sorted(UNARY)])
def test_unary(name, dtype):
    fn, values = UNARY[name]
    check_vjp(fn, arr(values, dtype), order=2, rtol=tol(dtype, 2e-4), atol=tol(dtype, 2e-4))


@pytest.mark.parametrize("low", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["erf", "erfc", "lgamma", "digamma", "i0e", "i1e"])
def test_unary_low_precision(name, low):
    fn, values = UNARY[name]
    check_vjp(fn, arr(values, low), order=2, rtol=5e-2, atol=5e-2)


def test_polygamma(dtype):
    x = arr([0.4, 1.3, 4.0], dtype)
    for n in (0, 1, 3):
        check_vjp(lambda x: sp.polygamma(n, x), x, order=2, rtol=tol(dtype), atol=tol(dtype))
    check_vjp(lambda x: lax.polygamma(arr([1.0, 2.0, 0.0], dtype), x), x, order=2,
              rtol=tol(dtype), atol=tol(dtype))


def test_polygamma_wrt_m_raises_like_jax():
    m, x = jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, 1.5])
    with pytest.raises(ValueError, match="polygamma gradient with respect to m"):
        jax.vjp(lax.polygamma, m, x)
    _, pull = jaxprop.vjp(lax.polygamma, m, x)
    with pytest.raises(ValueError, match="polygamma gradient with respect to m"):
        pull(jnp.ones(2))


@pytest.mark.parametrize("fn", [sp.gammainc, sp.gammaincc], ids=["igamma", "igammac"])
def test_igamma(fn, dtype):
    a = arr([0.5, 1.0, 2.5, 4.0], dtype)
    x = arr([0.3, 1.7, 2.0, 6.0], dtype)
    # second order w.r.t. a would differentiate igamma_grad_a, which JAX cannot either
    check_vjp(fn, a, x, order=1, rtol=tol(dtype, 1e-3), atol=tol(dtype, 1e-3))
    check_vjp(lambda x: fn(a, x), x, order=2, rtol=tol(dtype, 1e-3), atol=tol(dtype, 1e-3))


def test_igamma_grad_a_has_no_rule():
    """Neither JAX nor jaxprop differentiates igamma_grad_a: both raise NotImplementedError."""
    a, x = jnp.asarray([1.5, 2.0]), jnp.asarray([0.5, 1.0])
    with pytest.raises(NotImplementedError):
        jax.vjp(lax.igamma_grad_a, a, x)
    with pytest.raises(NotImplementedError, match="igamma_grad_a"):
        jaxprop.vjp(lax.igamma_grad_a, a, x)
    # so the second derivative of igamma w.r.t. a fails in both
    inner = lambda grad: lambda a: jnp.sum(grad(lambda a: jnp.sum(sp.gammainc(a, x)))(a))
    with pytest.raises(NotImplementedError):
        jax.grad(inner(jax.grad))(a)
    with pytest.raises(NotImplementedError, match="igamma_grad_a"):
        jaxprop.grad(inner(jaxprop.grad))(a)


def test_betainc(dtype):
    a, b = arr([0.5, 2.0, 3.0], dtype), arr([1.5, 0.7, 4.0], dtype)
    x = arr([0.2, 0.5, 0.9], dtype)
    check_vjp(lambda x: sp.betainc(a, b, x), x, order=2, rtol=tol(dtype, 1e-3),
              atol=tol(dtype, 1e-3))
    with pytest.raises(ValueError, match="Betainc gradient"):
        jax.vjp(sp.betainc, a, b, x)
    _, pull = jaxprop.vjp(sp.betainc, a, b, x)
    with pytest.raises(ValueError, match="Betainc gradient"):
        pull(jnp.ones(3, dtype))


@pytest.mark.slow
def test_zeta(x64):
    x, q = jnp.asarray([2.0, 3.5, 5.0]), jnp.asarray([0.5, 1.5, 3.0])
    # jax.scipy.special.zeta is a custom_jvp (series for ∂x): jaxprop follows it
    check_vjp(sp.zeta, x, q, order=1, rtol=1e-8, atol=1e-8)
    check_vjp(lambda q: sp.zeta(x, q), q, order=2, rtol=1e-8, atol=1e-8)
    # the raw primitive: JAX has no rule; jaxprop gives the closed-form ∂q and refuses ∂x
    with pytest.raises(NotImplementedError):
        jax.grad(lambda q: jnp.sum(lax.zeta(x, q)))(q)
    gq = jaxprop.grad(lambda q: jnp.sum(lax.zeta(x, q)))(q)
    np.testing.assert_allclose(gq, jax.grad(lambda q: jnp.sum(sp.zeta(x, q)))(q), rtol=1e-10)
    with pytest.raises(ValueError, match="zeta gradient with respect to x"):
        jaxprop.grad(lambda x: jnp.sum(lax.zeta(x, q)))(x)


def test_zeta_primitive_finite_differences(x64):
    x, q = jnp.asarray([2.0, 3.5]), jnp.asarray([0.5, 1.5])
    f = lambda q: jnp.sum(jnp.sin(lax.zeta(x, q)))
    g = jaxprop.grad(f)(q)
    eps = 1e-6
    fd = [(f(q.at[i].add(eps)) - f(q.at[i].add(-eps))) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(g, fd, rtol=1e-6)
    h = jaxprop.grad(lambda q: jnp.sum(jaxprop.grad(f)(q)))(q)
    fd2 = [(jnp.sum(jaxprop.grad(f)(q.at[i].add(eps))) - jnp.sum(
        jaxprop.grad(f)(q.at[i].add(-eps)))) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(h, fd2, rtol=1e-5)


@pytest.mark.slow
def test_random_gamma():
    key = jax.random.key(0)
    a = jnp.asarray([0.5, 2.0, 3.0])
    check_vjp(lambda a: jax.random.gamma(key, a), a, order=1, rtol=1e-4, atol=1e-4)
    check_vjp(lambda a: jax.random.loggamma(key, a), a, order=1, rtol=1e-4, atol=1e-4)
    check_vjp(lambda a: jax.random.beta(key, a, 2.0), a, order=1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype_name", ["float32",
                                        pytest.param("float64", marks=pytest.mark.slow)])
def test_scipy_special_composites(dtype_name, request):
    if dtype_name == "float64":
        request.getfixturevalue("x64")
    dtype = jnp.dtype(dtype_name)
    x = arr([0.3, 1.2, 2.5], dtype)
    y = arr([0.7, 0.0, 1.4], dtype)
    t = tol(dtype, 2e-4)
    for f, args in [(sp.xlogy, (y, x)), (sp.xlog1py, (y, x)), (sp.betaln, (x, y + 0.5)),
                    (sp.kl_div, (x, y + 0.1)), (sp.rel_entr, (x, y + 0.1)),
                    (sp.logsumexp, (x,)), (sp.multigammaln, (x + 2.0, 2)),
                    (sp.boxcox, (x, y)), (sp.poch, (x, y))]:
        check_vjp(lambda *a: f(*a), *args, order=2, rtol=t, atol=t)


def test_special_under_jit():
    x = jnp.asarray([0.3, 1.2, 2.5])
    f = lambda x: jnp.sum(sp.gammaln(x) * sp.erf(x) + sp.i1e(x) * sp.digamma(x))
    np.testing.assert_allclose(jax.jit(jaxprop.grad(f))(x), jax.grad(f)(x), rtol=1e-5,
                               atol=1e-6)
    hess = jax.jit(jaxprop.hessian(f))(x)
    np.testing.assert_allclose(hess, jax.hessian(f)(x), rtol=1e-4, atol=1e-5)


# Functions built from many primitives, custom_jvp rules, scans and while loops (JAX's own
# first-order reverse mode works through all of them): order 1 against jax.vjp.
MORE = {
    "beta": (sp.beta, 2), "loggamma": (sp.loggamma, 1), "softmax": (sp.softmax, 1),
    "log_softmax": (sp.log_softmax, 1), "boxcox1p": (sp.boxcox1p, 2),
    "factorial": (sp.factorial, 1),
    "dawsn": (sp.dawsn, 1), "exp1": (sp.exp1, 1), "expi": (sp.expi, 1),
    "expn": (lambda x: sp.expn(2, x), 1), "fresnel": (sp.fresnel, 1), "sici": (sp.sici, 1),
    "spence": (sp.spence, 1), "hyp1f1": (lambda a, x: sp.hyp1f1(a, 1.5, x), 2),
    "hyp2f1": (lambda x: sp.hyp2f1(0.5, 1.0, 1.5, x), 1), "owens_t": (sp.owens_t, 2),
    "wofz": (lambda x: sp.wofz(x + 0.5j), 1), "comb": (lambda x, y: sp.comb(x + 3, y), 2),
}
FAST_MORE = {"beta", "loggamma", "softmax", "log_softmax", "boxcox1p", "factorial"}


@pytest.mark.parametrize("name", [n if n in FAST_MORE else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(MORE)])
def test_scipy_special_more(name):
    fn, nargs = MORE[name]
    args = (jnp.asarray([0.3, 0.6, 0.8]), jnp.asarray([1.3, 2.0, 0.4]))[:nargs]
    check_vjp(fn, *args, order=1, rtol=1e-4, atol=1e-4)
