"""Hooks, rule overrides, straight-through, gradient reversal, clipping, feedback alignment."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop
from jaxprop.testing import check_vjp

X = jnp.array([-1.5, -0.2, 0.3, 2.0])


def model(x, fn):
    h = jnp.tanh(x) * 3.0
    h = jaxprop.hook(h, fn)
    return jnp.sum(jnp.sin(h) + h ** 2)


def plain(x):
    return model(x, lambda ct: None)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_hook_that_doubles_a_cotangent_doubles_the_gradient(mode):
    g = jaxprop.grad(lambda x: model(x, lambda ct: 2 * ct))
    g = jax.jit(g) if mode == "jit" else g
    np.testing.assert_allclose(g(X), 2 * jax.grad(plain)(X), rtol=1e-6)


def test_hook_sees_the_total_cotangent_of_a_value_used_twice():
    seen = []

    def f(x):
        h = jaxprop.hook(x * 2.0, lambda ct: seen.append(ct))
        return jnp.sum(h * 3.0 + h ** 2)           # ∂/∂h = 3 + 2h

    g = jaxprop.grad(f)(X)
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], 3.0 + 4.0 * X, rtol=1e-6)
    np.testing.assert_allclose(g, jax.grad(f)(X), rtol=1e-6)   # None: ct unchanged


def test_hook_replaces_what_flows_below_only():
    def f(x, y):
        h = jaxprop.hook(x * y, lambda ct: jnp.zeros_like(ct))
        return jnp.sum(h + y)                       # y also reaches the loss directly

    gx, gy = jaxprop.grad(f, argnums=(0, 1))(X, X)
    np.testing.assert_array_equal(gx, 0.0)
    np.testing.assert_array_equal(gy, 1.0)


def test_hook_never_called_without_a_cotangent():
    calls = []
    f = lambda x: jnp.sum(x) + 0 * jnp.sum(jax.lax.stop_gradient(  # noqa: E731
        jaxprop.hook(x, lambda ct: calls.append(1))))
    jaxprop.grad(f)(X)
    assert calls == []


def test_hook_under_vmap_and_jax_grad():
    f = lambda x: jnp.sin(jaxprop.hook(x, lambda ct: 2 * ct))  # noqa: E731
    xs = jnp.linspace(-1.0, 1.0, 5)
    np.testing.assert_allclose(jax.vmap(jaxprop.grad(f))(xs), 2 * jnp.cos(xs), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(xs), 2 * jnp.cos(xs), rtol=1e-6)
    check_vjp(lambda x: model(x, lambda ct: 2 * ct), X, order=2)


def test_hook_second_order():
    """The hooked value is x itself at both orders, so the hook scales each sweep: 3·3·f''."""
    f = lambda x: jnp.sin(jaxprop.hook(x, lambda ct: 3 * ct)) ** 2  # noqa: E731
    ours = jaxprop.grad(jaxprop.grad(f))(0.7)
    np.testing.assert_allclose(ours, 9 * jax.grad(jax.grad(lambda x: jnp.sin(x) ** 2))(0.7),
                               rtol=1e-5)
    np.testing.assert_allclose(ours, jax.grad(jax.grad(f))(0.7), rtol=1e-5)


def test_hook_pytree_and_bad_shape():
    f = lambda p: jnp.sum(jaxprop.hook(p, lambda ct: -ct)["a"] * p["b"])  # noqa: E731
    g = jaxprop.grad(f)({"a": X, "b": 2 * X})
    np.testing.assert_allclose(g["a"], -2 * X)
    np.testing.assert_allclose(g["b"], X)        # p["b"] used unhooked
    with pytest.raises(ValueError, match="shape"):
        jaxprop.grad(lambda x: jnp.sum(jaxprop.hook(x, lambda ct: ct[:2])))(X)


def test_gradient_reversal():
    f = lambda x, s: jnp.sum(jnp.exp(jaxprop.gradient_reversal(x, s)))  # noqa: E731
    np.testing.assert_allclose(jaxprop.grad(f)(X, 0.5), -0.5 * jnp.exp(X), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jaxprop.grad(f))(X, 0.5), -0.5 * jnp.exp(X), rtol=1e-6)
    np.testing.assert_allclose(jaxprop.value_and_grad(f)(X, 1.0)[0], jnp.sum(jnp.exp(X)))


def test_clip_gradient():
    w = jnp.array([-3.0, 0.2, 0.4, 9.0])
    f = lambda x: jnp.sum(jaxprop.clip_gradient(x, -1.0, 0.5) * w)  # noqa: E731
    np.testing.assert_allclose(jaxprop.grad(f)(X), [-1.0, 0.2, 0.4, 0.5])


def test_clip_gradient_norm():
    w = jnp.array([3.0, 0.0, 4.0, 0.0])
    f = lambda x: jnp.sum(jaxprop.clip_gradient_norm(x, 1.0) * w)  # noqa: E731
    np.testing.assert_allclose(jaxprop.grad(f)(X), [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
    small = lambda x: jnp.sum(jaxprop.clip_gradient_norm(x, 10.0) * 0.1)  # noqa: E731
    np.testing.assert_allclose(jaxprop.grad(small)(X), 0.1, rtol=1e-6)


# -- rule overrides -----------------------------------------------------------------------
pass_through = jaxprop.vjp_rule(lambda ct, out, x, y: ct, None)  # max(x, 0): ct to x


def relu_twice(x):
    a = jnp.maximum(x, 0.0)
    with jaxprop.override("max", pass_through):
        b = jnp.maximum(x, 0.0)
    return jnp.sum(a + 10 * b)


def test_override_applies_to_its_scope_only():
    expect = (X > 0) * 1.0 + 10.0
    np.testing.assert_allclose(jaxprop.grad(relu_twice)(X), expect)
    np.testing.assert_allclose(jax.jit(jaxprop.grad(relu_twice))(X), expect)
    np.testing.assert_allclose(jaxprop.grad(lambda x: jnp.sum(jnp.maximum(x, 0.0)))(X),
                               (X > 0) * 1.0)                 # restored afterwards
    with pytest.warns(jaxprop.ScopeWarning, match="not differentiated by jaxprop"):
        np.testing.assert_allclose(jax.grad(relu_twice)(X), (X > 0) * 11.0)  # JAX unaffected


def test_override_of_an_unknown_primitive_raises_with_close_matches():
    rule = jaxprop.vjp_rule(lambda ct, out, x: ct)
    with pytest.raises(ValueError, match="no primitive called 'tahn'.*'tanh'"):
        jaxprop.override("tahn", rule)
    with pytest.raises(ValueError, match="cannot replace the rule of 'scan'"):
        jaxprop.override({"scan": rule})
    assert jaxprop.registry.OVERRIDES == []


def test_override_counts_what_it_matched_and_warns_when_nothing_did():
    five = jaxprop.vjp_rule(lambda ct, out, x: 5 * ct)
    with jaxprop.override({"sin": five, "cos": five}) as o:
        g = jaxprop.grad(lambda x: jnp.sin(x) * 2.0)(0.3)
    assert float(g) == 10.0 and o.matched == {"sin": 1}
    assert "sin: 1 node(s)" in o.report() and "cos: 0 node(s)" in o.report()
    with pytest.warns(jaxprop.ScopeWarning, match="had no effect"):
        with jaxprop.override("sin", five) as unused:
            g = jax.grad(jnp.sin)(0.3)                # JAX's autodiff: the rule is not used
    np.testing.assert_allclose(g, jnp.cos(0.3), rtol=1e-6)
    assert "nothing matched" in unused.report()


def test_override_and_an_already_compiled_jit():
    five = jaxprop.vjp_rule(lambda ct, out, x: 5 * ct)
    step = jax.jit(jaxprop.grad(jnp.sin))
    step(0.3)                                          # compiled without the override
    with pytest.warns(jaxprop.ScopeWarning, match="compiled before the block"):
        with jaxprop.override("sin", five):
            g = step(0.3)                              # the cached program: ordinary rule
    np.testing.assert_allclose(g, jnp.cos(0.3), rtol=1e-6)
    fresh = jax.jit(jaxprop.grad(lambda x: jnp.sin(x)))
    with pytest.warns(jaxprop.ScopeWarning, match="entered outside the jax.jit"):
        with jaxprop.override("sin", five):
            assert float(fresh(0.3)) == 5.0            # traced in the block: baked in
    def jitted_first(x):                               # traced by jit before jaxprop
        with jaxprop.override("sin", five):
            return jnp.sin(x)

    with pytest.warns(jaxprop.ScopeWarning, match="jaxprop.grad\\(jax.jit\\(f\\)\\)"):
        np.testing.assert_allclose(jaxprop.grad(jax.jit(jitted_first))(0.3), jnp.cos(0.3),
                                   rtol=1e-6)
    inside = jax.jit(jaxprop.grad(jaxprop.override("sin", five)(jnp.sin)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # entered inside the jit: no warning
        assert float(inside(0.3)) == 5.0


def test_override_by_scope_changes_only_that_scope():
    """The override applies to tanh under named scope "block1" only; the expected gradient is
    jax.grad of the program with that tanh's derivative replaced (here by 1)."""
    def model(x):
        with jax.named_scope("block1"):
            a = jnp.tanh(x) * 2.0
        with jax.named_scope("block2"):
            b = jnp.tanh(a)
        return jnp.sum(b)

    def explicit(x):                                   # tanh of block1 with derivative 1
        t = jnp.tanh(x)
        a = (x + jax.lax.stop_gradient(t - x)) * 2.0
        return jnp.sum(jnp.tanh(a))

    identity = jaxprop.vjp_rule(lambda ct, out, x: ct)
    for wrap in (lambda f: f, jax.jit):
        g = wrap(jaxprop.grad(jaxprop.override("tanh", identity, scope="block1")(model)))(X)
        np.testing.assert_allclose(g, jax.grad(explicit)(X), rtol=1e-5)
    with pytest.warns(jaxprop.ScopeWarning, match="name scope matching 'nowhere'"):
        jaxprop.grad(jaxprop.override("tanh", identity, scope="nowhere")(model))(X)


def test_override_as_decorator_nested_and_node_rule():
    mul_rule = jaxprop.registry.lookup("mul")

    def double_mul(node, cts):
        return [2 * ct if ct is not None else None for ct in mul_rule(node, cts)]

    f = jaxprop.override({"mul": double_mul})(lambda x: jnp.sum(x * x))
    np.testing.assert_allclose(jaxprop.grad(f)(X), 4 * X, rtol=1e-6)
    with jaxprop.override("sin", jaxprop.vjp_rule(lambda ct, out, x: 5 * ct)):
        with jaxprop.override("sin", jaxprop.vjp_rule(lambda ct, out, x: 7 * ct)):
            inner = jaxprop.grad(jnp.sin)(0.3)
        outer = jaxprop.grad(jnp.sin)(0.3)
    assert (float(inner), float(outer)) == (7.0, 5.0)
    np.testing.assert_allclose(jaxprop.grad(jnp.sin)(0.3), jnp.cos(0.3))
    with pytest.raises(TypeError):
        jaxprop.override("sin")
    assert jaxprop.registry.OVERRIDES == []


def test_straight_through():
    q = jaxprop.straight_through(jnp.round)
    f = lambda x: jnp.sum(q(x) * jnp.arange(4.0))  # noqa: E731
    np.testing.assert_array_equal(q(X), jnp.round(X))
    for g in (jaxprop.grad(f), jax.jit(jaxprop.grad(f)), jax.grad(f)):
        np.testing.assert_array_equal(g(X), jnp.arange(4.0))
    wide = jaxprop.straight_through(lambda x: jnp.sign(x) * jnp.ones((3, 1)))  # (3, 4)
    np.testing.assert_array_equal(jaxprop.grad(lambda x: jnp.sum(wide(x)))(X), 3 * jnp.ones(4))


def test_feedback_alignment():
    x = jax.random.normal(jax.random.key(0), (5, 3))
    w = jax.random.normal(jax.random.key(1), (3, 4))
    B = jax.random.normal(jax.random.key(2), (3, 4))
    loss = lambda x, w: jnp.sum(jnp.tanh(jaxprop.feedback_alignment(x, w, B)) ** 2)  # noqa
    dy = 2 * jnp.tanh(x @ w) * (1 - jnp.tanh(x @ w) ** 2)
    gx, gw = jaxprop.grad(loss, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, dy @ B.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, x.T @ dy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss(x, w), jnp.sum(jnp.tanh(x @ w) ** 2), rtol=1e-6)
    jx, jw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(jx, gx, rtol=1e-5, atol=1e-6)

    def via_override(x, w):
        with jaxprop.override("dot_general", jaxprop.feedback_rule(B)):
            h = x @ w
        return jnp.sum(jnp.tanh(h) ** 2)

    ox, ow = jax.jit(jaxprop.grad(via_override, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(ox, gx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ow, gw, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_feedback_alignment_experiment_quick():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "experiments/feedback_alignment.py", "--quick"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    accs = [float(line.split()[-1]) for line in run.stdout.splitlines() if "accuracy" in line]
    assert len(accs) == 2 and accs[0] > 0.5 and accs[1] > 0.2   # both learn (chance is 0.1)
