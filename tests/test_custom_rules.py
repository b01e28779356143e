"""custom_jvp / custom_vjp in all their forms, and jax.nn functions that use them, vs JAX."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop.testing import check_vjp

RNG = np.random.default_rng(1)


def normal(*shape, scale=1.0):
    return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def assert_tree_close(a, b, rtol=2e-5, atol=2e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


# -- custom_jvp ---------------------------------------------------------------------------
@jax.custom_jvp
def wrong_sin(x):
    """sin, with a deliberately *different* JVP (3·cos x): honouring it is observable."""
    return jnp.sin(x)


@wrong_sin.defjvp
def _wrong_sin_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return wrong_sin(x), 3.0 * jnp.cos(x) * t


def test_custom_jvp_rule_is_honoured():
    x = normal(4)
    check_vjp(wrong_sin, x, order=2, finite_differences=False)   # deliberately not sin'
    np.testing.assert_allclose(jaxprop.grad(lambda x: wrong_sin(x).sum())(x), 3 * jnp.cos(x),
                               rtol=1e-6)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 2))
def scaled_apply(fn, x, power):
    return fn(x) ** power


@scaled_apply.defjvp
def _scaled_apply_jvp(fn, power, primals, tangents):
    (x,), (t,) = primals, tangents
    y = fn(x)
    return y ** power, power * y ** (power - 1) * jnp.cos(x) * t


def test_custom_jvp_nondiff_argnums():
    check_vjp(lambda x: scaled_apply(jnp.sin, x, 3), normal(3), order=2)


@jax.custom_jvp
def bilinear(x, y):
    return x * y


def _bilinear_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    out = 0.0
    if not isinstance(tx, jax.custom_derivatives.SymbolicZero):
        out = out + tx * y
    if not isinstance(ty, jax.custom_derivatives.SymbolicZero):
        out = out + x * ty
    return x * y, out


bilinear.defjvp(_bilinear_jvp, symbolic_zeros=True)


def test_custom_jvp_symbolic_zeros():
    x, y = normal(3), normal(3)
    check_vjp(bilinear, x, y, order=2)
    check_vjp(lambda x: bilinear(x, y), x, order=2)          # y's tangent is symbolic zero
    check_vjp(lambda y: bilinear(x, y) * y, y, order=2)


def closing_over(w, x):
    """A custom_jvp closing over ``w`` from an enclosing jit / vmap trace."""
    @jax.custom_jvp
    def g(x):
        return jnp.sin(w * x)

    @g.defjvp
    def g_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return g(x), 3.0 * w * jnp.cos(w * x) * t
    return g(x)


def test_custom_jvp_closure_over_outer_tracers():
    x, w, ws = normal(3), jnp.float32(0.7), jnp.array([0.3, 0.7, 1.1])
    grad_x = lambda w, x: jaxprop.grad(lambda x: closing_over(w, x).sum())(x)
    jax_grad_x = lambda w, x: jax.grad(lambda x: closing_over(w, x).sum())(x)
    assert_tree_close(jax.jit(grad_x)(w, x), jax_grad_x(w, x))
    assert_tree_close(jax.vmap(grad_x, (0, None))(ws, x), jax.vmap(jax_grad_x, (0, None))(ws, x))
    # (closing over a value being differentiated fails in JAX too: use closure_convert)


@jax.custom_jvp
def two_args(x, y):
    return jnp.sin(x) * y


two_args.defjvps(lambda tx, out, x, y: 2.0 * jnp.cos(x) * y * tx,   # per-argument rules
                 lambda ty, out, x, y: jnp.sin(x) * ty)


def test_custom_jvp_defjvps_and_under_jit():
    x, y = normal(3), normal(3)
    check_vjp(two_args, x, y, order=2, finite_differences=False)   # x's rule: 2·cos on purpose
    check_vjp(jax.jit(two_args), x, y, order=2, finite_differences=False)
    assert float(jax.jit(jaxprop.grad(jax.nn.relu))(0.0)) == 0.0


@jax.custom_jvp
def pytree_fn(params):
    return {"out": params["a"] * jnp.sin(params["b"]), "aux": (params["a"] ** 2,)}


@pytree_fn.defjvp
def _pytree_jvp(primals, tangents):
    (p,), (t,) = primals, tangents
    out = pytree_fn(p)
    return out, {"out": t["a"] * jnp.sin(p["b"]) + p["a"] * jnp.cos(p["b"]) * t["b"],
                 "aux": (2 * p["a"] * t["a"],)}


def test_custom_jvp_pytrees():
    check_vjp(pytree_fn, {"a": normal(2), "b": normal(2)}, order=2)


# -- custom_vjp ---------------------------------------------------------------------------
@jax.custom_vjp
def clip_gradient(x, lo):
    return x * lo


def _clip_fwd(x, lo):
    return x * lo, (lo, x)


def _clip_bwd(res, ct):
    lo, x = res
    return jnp.clip(ct * lo, -0.5, 0.5) + 0 * x, jnp.sum(ct * x)


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


def test_custom_vjp_rule_is_honoured():
    x, lo = normal(5), jnp.float32(2.0)
    check_vjp(clip_gradient, x, lo, order=2, finite_differences=False)  # clips on purpose
    g = jaxprop.grad(lambda x: clip_gradient(x, lo).sum())(x)
    assert float(jnp.max(jnp.abs(g))) <= 0.5 + 1e-6


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def power_nd(x, n):
    return x ** n


def _power_fwd(x, n):
    return x ** n, x


def _power_bwd(n, x, ct):
    return (ct * n * x ** (n - 1),)


power_nd.defvjp(_power_fwd, _power_bwd)


def test_custom_vjp_nondiff_argnums():
    check_vjp(lambda x: power_nd(x, 3), normal(3), order=2)


@jax.custom_vjp
def sym_zero_fn(x, y):
    return x * y, jnp.sin(x)


def _sz_fwd(x, y):
    assert hasattr(x, "value") and hasattr(x, "perturbed")   # symbolic_zeros=True wrapping
    return sym_zero_fn(x.value, y.value), (x.value, y.value)


def _sz_bwd(res, cts):
    x, y = res
    ct_xy, ct_sin = cts
    ct_x = jnp.zeros_like(x)
    ct_y = jnp.zeros_like(y)
    if not isinstance(ct_xy, jax.custom_derivatives.SymbolicZero):
        ct_x, ct_y = ct_x + ct_xy * y, ct_y + ct_xy * x
    if not isinstance(ct_sin, jax.custom_derivatives.SymbolicZero):
        ct_x = ct_x + ct_sin * jnp.cos(x)
    return ct_x, ct_y


sym_zero_fn.defvjp(_sz_fwd, _sz_bwd, symbolic_zeros=True)


def test_custom_vjp_symbolic_zeros():
    x, y = normal(3), normal(3)
    check_vjp(sym_zero_fn, x, y, order=2)
    check_vjp(lambda x: sym_zero_fn(x, y)[1], x, order=2)     # first output's ct is zero
    check_vjp(lambda y: sym_zero_fn(x, y)[0], y, order=2)


def test_custom_vjp_closure_convert():
    def f(w, x):
        def inner(x):
            return jnp.tanh(w * x)

        @jax.custom_vjp
        def g(x, *consts):
            return closed(x, *consts)

        closed, consts = jax.closure_convert(inner, x)

        def g_fwd(x, *consts):
            return closed(x, *consts), (x, consts)

        def g_bwd(res, ct):
            x, consts = res
            _, pull = jax.vjp(closed, x, *consts)   # the user's own bwd may use JAX
            return pull(ct)
        g.defvjp(g_fwd, g_bwd)
        return g(x, *consts)
    check_vjp(f, jnp.float32(0.7), normal(3), order=2)
    check_vjp(jax.jit(f), jnp.float32(0.7), normal(3))


@jax.custom_vjp
def pytree_vjp(p):
    return (p["a"] * p["b"], {"s": jnp.sum(p["a"])})


def _pv_fwd(p):
    return pytree_vjp(p), p


def _pv_bwd(p, cts):
    ct_ab, ct_s = cts
    return ({"a": ct_ab * p["b"] + ct_s["s"], "b": ct_ab * p["a"]},)


pytree_vjp.defvjp(_pv_fwd, _pv_bwd)


def test_custom_vjp_pytrees_and_none_cotangent():
    check_vjp(pytree_vjp, {"a": normal(3), "b": normal(3)}, order=2)

    @jax.custom_vjp
    def f(x, y):
        return x * y

    f.defvjp(lambda x, y: (x * y, y), lambda y, ct: (ct * y, None))   # y gets no gradient
    assert_tree_close(jaxprop.grad(f, argnums=(0, 1))(2.0, 3.0), jax.grad(f, (0, 1))(2.0, 3.0))


# -- inside scan and jit --------------------------------------------------------------------
@pytest.mark.parametrize("fn, exact", [(wrong_sin, False), (lambda x: clip_gradient(x, 1.5), False),
                                       (lambda x: power_nd(x, 2), None), (jax.nn.relu, None),
                                       (jax.nn.softplus, None)])
def test_custom_rules_inside_scan_and_jit(fn, exact):
    def f(w, xs):
        return lax.scan(lambda c, x: (fn(c * w + x), fn(c)), jnp.float32(0.2), xs)
    w, xs = jnp.float32(0.9), normal(4)
    check_vjp(f, w, xs, finite_differences=exact)   # wrong_sin, clip_gradient: not derivatives
    check_vjp(jax.jit(f), w, xs, finite_differences=exact)
    g = lambda w, xs: jnp.sum(f(w, xs)[1])
    assert_tree_close(jax.jit(jaxprop.grad(g))(w, xs), jax.grad(g)(w, xs))
    ws = jnp.array([0.5, 1.2])
    assert_tree_close(jax.vmap(jaxprop.grad(g), (0, None))(ws, xs),
                      jax.vmap(jax.grad(g), (0, None))(ws, xs))


def test_custom_jvp_inside_scan_order2():
    """Second order through a scan whose body has a custom_jvp. JAX's reverse-over-reverse
    (and forward-over-reverse) through scan disagree here with its own forward-over-forward
    and with the unrolled loop; jaxprop agrees with the latter two."""
    def f(w, xs):
        return lax.scan(lambda c, x: (wrong_sin(c * w + x), wrong_sin(c)), 0.2, xs)[1].sum()

    def unrolled(w, xs):
        c, total = 0.2, 0.0
        for x in xs:
            c, y = wrong_sin(c * w + x), wrong_sin(c)
            total = total + y
        return total
    w, xs = jnp.float32(0.9), normal(4)
    ours = jaxprop.hessian(f, argnums=(0, 1))(w, xs)
    assert_tree_close(ours, jax.jacfwd(jax.jacfwd(f, (0, 1)), (0, 1))(w, xs))
    assert_tree_close(ours, jax.hessian(unrolled, (0, 1))(w, xs))
    check_vjp(lambda w, xs: lax.scan(lambda c, x: (power_nd(c * w + x, 2), c), 0.2, xs),
              w, xs, order=2)


# -- jax.nn / jnp functions built on custom rules -------------------------------------------
EDGES = jnp.array([-2.0, -0.5, 0.0, 0.0, 1e-3, 0.7, 3.0], jnp.float32)
NN = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "softplus": jax.nn.softplus,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_erf": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "logsumexp": jax.nn.logsumexp,
    "logsumexp_axis": lambda x: jax.nn.logsumexp(jnp.stack([x, 2 * x]), axis=0),
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "logaddexp": lambda x: jnp.logaddexp(x, jnp.flip(x)),
    "logaddexp_self": lambda x: jnp.logaddexp(x, x),
    "norm": jnp.linalg.norm,
    "xlogy": lambda x: jax.scipy.special.xlogy(x, x * x),
}


@pytest.mark.parametrize("name", sorted(NN))
def test_nn_functions_order2(name):
    check_vjp(NN[name], EDGES, order=2)


def test_relu_at_zero_is_jax_value():
    assert float(jaxprop.grad(jax.nn.relu)(0.0)) == float(jax.grad(jax.nn.relu)(0.0)) == 0.0
    assert float(jaxprop.grad(jax.nn.relu6)(6.0)) == float(jax.grad(jax.nn.relu6)(6.0))


def test_norm_at_zero():
    z = jnp.zeros(3)
    assert_tree_close(jaxprop.grad(jnp.linalg.norm)(z), jax.grad(jnp.linalg.norm)(z))
    check_vjp(jnp.linalg.norm, z, order=2)
    check_vjp(lambda x: jnp.linalg.norm(x, axis=-1), jnp.zeros((2, 3)), order=2)


def test_nn_functions_x64(x64):
    x = np.linspace(-2.0, 2.0, 5)
    for name in ["softplus", "logsumexp", "logaddexp"]:
        check_vjp(NN[name], x, order=2)


# -- custom JVP rules whose tangent map uses control flow ----------------------------------
@jax.custom_jvp
def looped(x):
    return jnp.sin(x)


@looped.defjvp
def _looped_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return looped(x), lax.fori_loop(0, 3, lambda i, c: c * jnp.cos(x), t)   # a scan on t


@jax.custom_jvp
def branched(x):
    return jnp.sin(x)


@branched.defjvp
def _branched_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return branched(x), lax.cond(x.sum() > 0, lambda t: t * jnp.cos(x), lambda t: -t, t)


@jax.custom_jvp
def checkpointed(x):
    return jnp.sin(x)


@checkpointed.defjvp
def _checkpointed_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return checkpointed(x), jax.checkpoint(lambda t: t * jnp.cos(x))(t)


@pytest.mark.parametrize("fn", [looped, branched, checkpointed])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_custom_jvp_tangent_map_with_control_flow(fn, sign):
    x = sign * jnp.array([0.3, 0.5])
    fd = False if fn is branched else None      # branched's JVP is -t, not cos(x)·t, for x < 0
    check_vjp(fn, x, order=2, finite_differences=fd)
    check_vjp(jax.jit(fn), x, order=2, finite_differences=fd)
