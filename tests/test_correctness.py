"""Regression tests for issue 13: cases where jaxprop disagreed with JAX (wrong or missing
gradients, crashes, messages). Each compares with JAX's own behaviour or values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from tests.rules.rulecheck import check, rand


def assert_same(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, **kw), a, b)


# -- wrong or missing gradients --------------------------------------------------------------
@pytest.mark.parametrize("shape,sizes,perm", [((2, 3), (3, 2), (1, 0)),
                                              ((2, 3, 4), (4, 6), (2, 0, 1))])
def test_reshape_with_dimensions(shape, sizes, perm):
    """lax.reshape(x, sizes, dimensions=perm) transposes first: the VJP undoes both."""
    x = rand(shape)
    f = lambda x: lax.reshape(x, sizes, dimensions=perm)
    ct = jnp.arange(np.prod(sizes), dtype=jnp.float32).reshape(sizes) + 1
    assert_same(jaxprop.vjp(f, x)[1](ct), jax.vjp(f, x)[1](ct))
    check(f, x)


def test_conv_with_empty_output_gives_zeros():
    """A VALID convolution whose kernel is longer than the input has no outputs: zeros."""
    f = lambda x, w: jnp.sum(lax.conv(x, w, (1,), "VALID"))
    args = jnp.ones((1, 1, 2)), jnp.ones((1, 1, 3))
    assert_same(jaxprop.grad(f, (0, 1))(*args), jax.grad(f, (0, 1))(*args))


def test_jacrev_of_complex_output_raises_as_jax():
    """jacrev of a complex output is not a real Jacobian: JAX's TypeError, not the real part."""
    f, x = lambda x: jnp.exp(1j * x), jnp.ones(2)
    with pytest.raises(TypeError) as theirs:
        jax.jacrev(f)(x)
    with pytest.raises(TypeError, match="use jax.vjp directly") as ours:
        jaxprop.jacrev(f)(x)
    assert str(ours.value) == str(theirs.value)
    assert_same(jaxprop.jacrev(f, holomorphic=True)(x + 0j), jax.jacrev(f, holomorphic=True)(x + 0j))


# -- crashes and unclear errors --------------------------------------------------------------
def test_python_scalar_cotangent():
    f = lambda x, i: x[i]
    ours = jaxprop.vjp(f, jnp.arange(3.0), 1)[1](1.0)
    theirs = jax.vjp(f, jnp.arange(3.0), 1)[1](1.0)
    assert_same(ours[0], theirs[0])
    assert ours[0].dtype == theirs[0].dtype


def _messages(call_ours, call_theirs, error=TypeError):
    with pytest.raises(error) as ours:
        call_ours()
    with pytest.raises(error) as theirs:
        call_theirs()
    return str(ours.value), str(theirs.value)


@pytest.mark.parametrize("n", [0, 2])
def test_vjp_fn_with_wrong_number_of_arguments(n):
    """JAX's message, naming the function and that one argument is expected; no internals."""
    x = jnp.ones(3)
    ours, theirs = _messages(lambda: jaxprop.vjp(jnp.sin, x)[1](*[x] * n),
                             lambda: jax.vjp(jnp.sin, x)[1](*[x] * n))
    assert "applied to sin" in ours and f"called with {n} arguments" in ours
    assert "_pullback" not in ours and "__call__" not in ours
    if n == 2:
        assert ours == theirs.replace("jax.vjp", "jaxprop.vjp")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16, jnp.complex64])
def test_cotangent_of_wrong_dtype_is_rejected(dtype):
    x, ct = jnp.ones(3), jnp.ones(3, dtype)
    ours, theirs = _messages(lambda: jaxprop.vjp(jnp.sin, x)[1](ct),
                             lambda: jax.vjp(jnp.sin, x)[1](ct), ValueError)
    assert ours == theirs


def test_cotangent_of_wrong_shape_is_rejected():
    x, ct = jnp.ones(2), jnp.ones(3)
    ours, theirs = _messages(lambda: jaxprop.vjp(jnp.sin, x)[1](ct),
                             lambda: jax.vjp(jnp.sin, x)[1](ct), ValueError)
    assert ours == theirs


def test_repeated_argnums_raise():
    """JAX fails on argnums=(0, 0); jaxprop says why instead of half a gradient."""
    f = lambda x, y: x * y
    for transform in (jaxprop.grad, jaxprop.jacrev):
        with pytest.raises(TypeError, match="more than once"):
            transform(f, (0, 0))(2.0, 3.0)
    with pytest.raises(TypeError):
        jax.grad(f, (0, 0))(2.0, 3.0)


@pytest.mark.parametrize("case", ["too_few_args", "aux_not_pair", "holomorphic_real",
                                  "object_dtype", "int_input"])
def test_misuse_messages_match_jax(case):
    """The same misuse gets JAX's wording (tracer type names aside)."""
    calls = {
        "too_few_args": lambda g: g.grad(lambda x, y: x * y, 1)(2.0),
        "aux_not_pair": lambda g: g.grad(lambda x: (x * 2, 1, 2), has_aux=True)(2.0),
        "holomorphic_real": lambda g: g.jacrev(lambda x: x * 2, holomorphic=True)(jnp.ones(2)),
        "object_dtype": lambda g: g.grad(lambda x: 1.0)(np.array([1.0], dtype=object)),
        "int_input": lambda g: g.jacrev(lambda x: x * 2)(jnp.ones(2, jnp.int32)),
    }
    ours, theirs = _messages(lambda: calls[case](jaxprop), lambda: calls[case](jax))
    if case == "aux_not_pair":
        ours, theirs = ours.split(" with value")[0], theirs.split(" with value")[0]
    assert ours == theirs


# -- symbolic zeros through unused loop carries and branch outputs ---------------------------
def _unused_scan_carry(x):
    step = lambda c, xi: (c + xi, jnp.tanh(xi))
    return jnp.sum(lax.scan(step, jnp.sqrt(x), jnp.ones((3, 2)))[1])


def _unused_fori_carry(x):
    body = lambda i, c: (c[0] + 1.0, c[1] * 2.0)
    return lax.fori_loop(0, 3, body, (jnp.sqrt(x), x))[1].sum()


def _unused_scan_carry_of_two(x):
    step = lambda c, xi: ((c[0] + xi, c[1] * 2), jnp.tanh(xi))
    return lax.scan(step, (jnp.sqrt(x), x), jnp.ones((3, 2)))[0][1].sum()


def _unused_cond_output(x):
    return lax.cond(jnp.sum(x) >= 0, lambda y: (y, x * 2), lambda y: (y, x * 3), jnp.sqrt(x))[1].sum()


def _unused_jit_output(x):
    return jax.jit(lambda y, x: (y, 2 * x))(jnp.sqrt(x), x)[1].sum()


@pytest.mark.parametrize("f", [_unused_scan_carry, _unused_fori_carry, _unused_scan_carry_of_two,
                               _unused_cond_output, _unused_jit_output])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_no_nan_through_unused_outputs(f, mode):
    """A value whose uses all get zero cotangent gets a symbolic zero, as in JAX: it must not
    meet sqrt's infinite derivative at 0 (0·∞ = NaN)."""
    wrap = jax.jit if mode == "jit" else (lambda g: g)
    x = jnp.zeros(2)
    ours, theirs = wrap(jaxprop.grad(f))(x), wrap(jax.grad(f))(x)
    assert not np.isnan(np.asarray(ours)).any()
    assert_same(ours, theirs)


def test_no_tracer_leak_under_checkpoint_in_jit():
    """JAX caches jax.checkpoint's jaxpr, which remembers the trace it was traced under (a
    finished jaxprop trace): that trace must hold neither its parent nor its values."""
    inner = lambda y: jax.nn.relu(1.0 * y) * jnp.sin(y)
    f = lambda x: jaxprop.vjp(jax.checkpoint(inner), x)
    with jax.check_tracer_leaks():
        y, f_vjp = jax.jit(f)(1.0)
        g = jax.jit(lambda x: jaxprop.grad(jax.checkpoint(inner))(x))(1.0)
    assert_same(f_vjp(1.0), jax.vjp(inner, 1.0)[1](1.0))
    assert_same(g, jax.grad(inner)(1.0))


def test_custom_jvp_not_linear_in_tangent_names_rule_and_primitive():
    """JAX: no transpose rule for 'max'. jaxprop says the same, plus which rule and where."""
    @jax.custom_jvp
    def clipped_sin(x):
        return jnp.sin(x)

    @clipped_sin.defjvp
    def clipped_sin_jvp(primals, tangents):
        return clipped_sin(primals[0]), jnp.cos(primals[0]) * jnp.maximum(tangents[0], 0.0)

    with pytest.raises(NotImplementedError) as theirs:
        jax.grad(clipped_sin)(1.0)
    for transform in (lambda f: f, jax.jit):
        with pytest.raises(NotImplementedError, match="custom_jvp rule of clipped_sin") as ours:
            transform(jaxprop.grad(clipped_sin))(1.0)
        assert str(ours.value).startswith(str(theirs.value))
        assert "test_correctness.py" in str(ours.value)


@pytest.mark.parametrize("define", ["defjvp", "defjvps"])
def test_custom_jvp_reading_python_state_is_followed_eagerly(define):
    """JAX's eager grad runs a custom JVP rule on every call; a compiled eager sweep must not
    freeze the Python state the rule reads."""
    state = {"s": 1.0}
    scaled_sin = jax.custom_jvp(jnp.sin)
    if define == "defjvp":
        scaled_sin.defjvp(lambda p, t: (jnp.sin(p[0]), state["s"] * jnp.cos(p[0]) * t[0]))
    else:
        scaled_sin.defjvps(lambda t, ans, x: state["s"] * jnp.cos(x) * t)
    f = lambda x: scaled_sin(x) * 2.0
    for s in [1.0, 1.0, 1.0, 1.0, 2.0, 3.0]:
        state["s"] = s
        assert_same(jaxprop.grad(f)(0.5), jax.grad(f)(0.5))


def test_jax_custom_jvp_rules_still_compile_eagerly():
    """jax.nn.relu's rule is JAX's own (a function of its arguments): compiled sweeps stay."""
    from jaxprop import eager
    f = lambda x: jnp.sum(jax.nn.relu(x) * jax.nn.softplus(x))
    before = eager.STATS["compiled"]
    for _ in range(eager.WARMUP + 2):
        jaxprop.grad(f)(jnp.arange(3.0) - 1)
    assert eager.STATS["compiled"] > before


# -- beyond the named cases ------------------------------------------------------------------
def test_backward_ops_carry_the_forward_name_scope():
    """Like jax.grad's transpose(jvp(scope)), each backward op says which forward op it
    belongs to: transpose(<scope>)/<primitive>, in the jaxpr and in the HLO's locations."""
    def f(x):
        with jax.named_scope("layer1"):
            y = jnp.sin(x) * 2
        with jax.named_scope("layer2"):
            return jnp.sum(jnp.tanh(y))

    x = jnp.ones(3)
    eqns = jax.make_jaxpr(jaxprop.grad(f))(x).jaxpr.eqns
    stacks = {(e.primitive.name, str(e.source_info.name_stack)) for e in eqns}
    assert ("cos", "transpose(layer1)/sin") in stacks
    assert ("sub", "transpose(layer2)/tanh") in stacks
    hlo = jax.jit(jaxprop.grad(f)).lower(x).as_text(debug_info=True)
    assert "transpose(layer1)/sin/cos" in hlo
    theirs = {str(e.source_info.name_stack) for e in jax.make_jaxpr(jax.grad(f))(x).jaxpr.eqns}
    assert "transpose(jvp(layer1))" in theirs   # what jax.grad's carry, for comparison


# -- variadic reduce --------------------------------------------------------------------------
def _argmax_pair(a, b):
    """(value, carried) pairs: keep the one with the larger value (the first on ties)."""
    (av, ac), (bv, bc) = a, b
    take_a = av >= bv
    return jnp.where(take_a, av, bv), jnp.where(take_a, ac, bc)


def _sum_and_product(a, b):
    return a[0] + b[0], a[1] * b[1]


@pytest.mark.parametrize("shape,axes", [((5, 3), (0,)), ((2, 3, 4), (0, 2))])
@pytest.mark.parametrize("reducer", [_argmax_pair, _sum_and_product])
def test_variadic_reduce(shape, axes, reducer):
    """lax.reduce over two operands: a max carrying a second value, and a sum with a
    product; values and second order equal JAX's."""
    inits = (-jnp.inf, 0.0) if reducer is _argmax_pair else (0.0, 1.0)
    f = lambda x, y: lax.reduce((x, y), inits, reducer, axes)
    x, y = rand(shape, seed=1), rand(shape, seed=2)
    cts = (rand(f(x, y)[0].shape, seed=3), rand(f(x, y)[1].shape, seed=4))
    theirs = jax.jit(lambda x, y, cts: jax.vjp(f, x, y)[1](cts))(x, y, cts)  # eager: slow
    assert_same(jaxprop.vjp(f, x, y)[1](cts), theirs)


@pytest.mark.slow
@pytest.mark.parametrize("reducer", [_argmax_pair, _sum_and_product])
def test_variadic_reduce_second_order(reducer):
    inits = (-jnp.inf, 0.0) if reducer is _argmax_pair else (0.0, 1.0)
    check(lambda x, y: lax.reduce((x, y), inits, reducer, (0,)), rand((5, 3), seed=1),
          rand((5, 3), seed=2))


def test_variadic_reduce_carrying_an_index():
    """max with its (integer) index: the cotangent goes to the maximal element, ties to the
    one the reducer keeps."""
    f = lambda x: lax.reduce((x, lax.broadcasted_iota(jnp.int32, x.shape, 0)),
                             (-jnp.inf, 0), _argmax_pair, (0,))[0]
    x = jnp.array([[1.0, 5.0], [3.0, 5.0], [0.0, 1.0]])
    ct = jnp.array([1.0, 2.0])
    picked = lambda x: x[jnp.argmax(x, axis=0), jnp.arange(2)]  # JAX has no rule for f
    assert_same(jaxprop.vjp(f, x)[1](ct), jax.vjp(picked, x)[1](ct))
    assert_same(jax.jit(jaxprop.grad(lambda x: f(x) @ ct))(x), jax.grad(lambda x: picked(x) @ ct)(x))


# -- jax.checkpoint with a policy: recompute what jax.grad recomputes ------------------------
def _three_layers(x, W):
    for _ in range(3):
        x = jnp.sin(jnp.dot(x, W, precision=lax.Precision.HIGHEST))
    return x


_DOTS = jax.checkpoint_policies.checkpoint_dots
_X0 = jnp.ones((5,))


def _checkpoint_alone(W):
    return jax.checkpoint(_three_layers, policy=_DOTS)(_X0, W)


def _checkpoint_inside_scan(W):
    body = lambda x, _: (jax.checkpoint(_three_layers, policy=_DOTS)(x, W), None)
    return lax.scan(body, _X0, None, length=2)[0]


def _checkpoint_inside_cond(W):
    return lax.cond(W.sum() > 0, lambda W: jax.checkpoint(_three_layers, policy=_DOTS)(_X0, W),
                    lambda W: W[0], W)


def _count(vjp, f, W, ct, name):
    """How many ``name`` equations the program of forward and pullback runs."""
    def count(jaxpr):
        from jax.extend.core import jaxprs_in_params
        return sum((e.primitive.name == name)
                   + sum(count(sub) for sub in jaxprs_in_params(e.params)) for e in jaxpr.eqns)
    return count(jax.make_jaxpr(lambda W, ct: vjp(f, W)[1](ct))(W, ct).jaxpr)


def _checkpoint_around_scan(W):
    body = lambda x, _: (_three_layers(x, W), None)
    return jax.checkpoint(lambda W: lax.scan(body, _X0, None, length=2)[0], policy=_DOTS)(W)


def _checkpoint_around_cond(W):
    return jax.checkpoint(lambda W: lax.cond(W.sum() > 0, lambda W: _three_layers(_X0, W),
                                             lambda W: W[0], W), policy=_DOTS)(W)


@pytest.mark.parametrize("f", [_checkpoint_alone, _checkpoint_inside_scan,
                               _checkpoint_inside_cond, _checkpoint_around_scan,
                               _checkpoint_around_cond])
def test_checkpoint_policy_recomputes_what_jax_does(f):
    """Forward and pullback run as many sin (recomputed forward) and dot_general (saved by
    the policy, not recomputed) as jax.vjp's: the last sin, which no rule reads, is not
    recomputed, and around a scan or cond the policy applies inside its body. (Around a
    scan jaxprop keeps each step's carry, so it recomputes one sin fewer than JAX.)"""
    W = rand((5, 5)) * 0.3
    y = f(W)
    assert_same(jaxprop.vjp(f, W)[1](y), jax.vjp(f, W)[1](y))
    for name in ("sin", "cos", "dot_general"):
        n_ours, n_jax = _count(jaxprop.vjp, f, W, y, name), _count(jax.vjp, f, W, y, name)
        if f is _checkpoint_around_scan and name == "sin":
            assert n_ours == n_jax - 1
        else:
            assert n_ours == n_jax, name


@pytest.mark.slow
@pytest.mark.parametrize("f", [_checkpoint_around_scan, _checkpoint_around_cond])
def test_checkpoint_policy_around_control_flow_second_order(f):
    check(f, rand((5, 5)) * 0.3)
    check(jax.jit(f), rand((5, 5)) * 0.3)


# -- found by jaxprop.fuzz (seed 7011): a scan carry that does not read its own input ---------
@pytest.mark.parametrize("body", [
    lambda w: (lambda c, x: (w[0, 0] * 2.0, x)),               # consts only (hoisted whole)
    lambda w: (lambda c, x: (jnp.sin(w[0, 0]) + x, x)),        # consts and xs, not the carry
    lambda w: (lambda c, x: (jnp.sort(w, axis=1)[0, 0] * x, c)),   # carry passed to ys only
])
@pytest.mark.parametrize("jit", [False, True])
def test_scan_carry_that_ignores_its_input_still_passes_its_cotangent_on(body, jit):
    w = jnp.asarray([[0.3, -1.2], [0.7, 0.1], [2.0, -0.4]])
    xs = jnp.linspace(0.5, 1.5, 4)

    def f(w, c0):
        c, ys = lax.scan(body(w), c0, xs, reverse=True)
        return jnp.sin(c) + jnp.sum(ys)

    ours = jaxprop.grad(f, (0, 1))
    ours = jax.jit(ours) if jit else ours
    for a, b in zip(ours(w, 0.3), jax.grad(f, (0, 1))(w, 0.3)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    second = lambda g: lambda w: jnp.sum(jnp.cos(g(f, 0)(w, 0.3)))
    np.testing.assert_allclose(second(jaxprop.grad)(w) if not jit else
                               jax.jit(jaxprop.grad(second(jaxprop.grad)))(w),
                               second(jax.grad)(w) if not jit else
                               jax.grad(second(jax.grad))(w), rtol=1e-5, atol=1e-6)
