"""Gradients of intermediate values: jaxprop.tag and grad_and_tags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop

KEY = jax.random.key(0)
PARAMS = {"w1": jax.random.normal(KEY, (3, 5)) * 0.5,
          "w2": jax.random.normal(jax.random.key(1), (5, 2)) * 0.5}
X = jax.random.normal(jax.random.key(2), (4, 3))


def mlp(params, x, eps=None):
    """A two-layer net; ``eps`` are the zero perturbations JAX users add by hand."""
    eps = eps or {"h1": 0.0, "h2": 0.0}
    h1 = jaxprop.tag(jnp.tanh(x @ params["w1"]), "h1") + eps["h1"]
    h2 = jaxprop.tag(h1 @ params["w2"], "h2") + eps["h2"]
    return jnp.sum(jax.nn.log_softmax(h2) * jnp.array([1.0, 0.0]))


def by_perturbation():
    zeros = {"h1": jnp.zeros((4, 5)), "h2": jnp.zeros((4, 2))}
    return jax.grad(mlp, argnums=(0, 2))(PARAMS, X, zeros)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_tag_gradients_equal_zero_perturbation_gradients(mode):
    f = jaxprop.grad_and_tags(mlp)
    grads, tags = (jax.jit(f) if mode == "jit" else f)(PARAMS, X)
    want_grads, want_tags = by_perturbation()
    assert set(tags) == {"h1", "h2"}
    for k in ("h1", "h2"):
        np.testing.assert_allclose(tags[k], want_tags[k], rtol=1e-5, atol=1e-6)
    for k in PARAMS:
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-5, atol=1e-6)


def test_tags_are_no_ops_elsewhere():
    value = mlp(PARAMS, X)
    np.testing.assert_allclose(jax.jit(mlp)(PARAMS, X), value, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(mlp, (None, 0))(PARAMS, X[:, None])[0],
                               mlp(PARAMS, X[:1]), rtol=1e-6)
    g_jax = jax.grad(mlp)(PARAMS, X)
    g_ours = jaxprop.grad(mlp)(PARAMS, X)
    for k in PARAMS:
        np.testing.assert_allclose(g_ours[k], g_jax[k], rtol=1e-5, atol=1e-6)


def test_value_and_has_aux():
    f = lambda w, x: (jnp.sum(jaxprop.tag(w * x, "h") ** 2), x.shape)  # noqa: E731
    (value, aux), (g, tags) = jaxprop.value_and_grad_and_tags(f, has_aux=True)(2.0, X)
    assert aux == X.shape
    np.testing.assert_allclose(value, jnp.sum((2 * X) ** 2), rtol=1e-6)
    np.testing.assert_allclose(tags["h"], 4 * X, rtol=1e-6)
    (g2, tags2), aux2 = jaxprop.grad_and_tags(f, has_aux=True)(2.0, X)
    np.testing.assert_allclose(g2, g, rtol=1e-6)
    np.testing.assert_allclose(tags2["h"], tags["h"])


def test_tag_of_an_input_gives_the_saliency_map():
    f = lambda params, x: mlp(params, jaxprop.tag(x, "x"))  # noqa: E731
    _, tags = jaxprop.grad_and_tags(f)(PARAMS, X)
    np.testing.assert_allclose(tags["x"], jax.grad(mlp, argnums=1)(PARAMS, X),
                               rtol=1e-5, atol=1e-6)
    _, tags = jax.jit(jaxprop.grad_and_tags(f))(PARAMS, X)
    np.testing.assert_allclose(tags["x"], jax.grad(mlp, argnums=1)(PARAMS, X),
                               rtol=1e-5, atol=1e-6)


def test_pytree_tag_and_unused_tag_is_zero():
    def f(w):
        t = jaxprop.tag({"a": w * 2.0, "b": w * 3.0, "n": 7}, "t")
        unused = jaxprop.tag(w * 5.0, "unused")
        del unused
        return jnp.sum(t["a"] ** 2)

    g, tags = jaxprop.grad_and_tags(f)(X)
    np.testing.assert_allclose(tags["t"]["a"], 4 * X, rtol=1e-6)
    np.testing.assert_array_equal(tags["t"]["b"], jnp.zeros_like(X))
    assert tags["t"]["n"] is None
    np.testing.assert_array_equal(tags["unused"], jnp.zeros_like(X))
    np.testing.assert_allclose(g, 8 * X, rtol=1e-6)


def test_tags_inside_jitted_functions():
    layer = jax.jit(lambda w, x: jaxprop.tag(jnp.sin(x * w), "s"))
    f = lambda w, x: jnp.sum(layer(w, x) ** 2)  # noqa: E731
    _, tags = jaxprop.grad_and_tags(f)(1.5, X)
    np.testing.assert_allclose(tags["s"], 2 * jnp.sin(1.5 * X), rtol=1e-6)


def test_duplicate_tag_names_are_an_error():
    def f(w):
        return jnp.sum(jaxprop.tag(w, "h") * jaxprop.tag(2 * w, "h"))

    with pytest.raises(ValueError, match="more than one value"):
        jaxprop.grad_and_tags(f)(X)


def test_gradient_of_a_tag_gradient():
    f = lambda w, x: jnp.sum(jaxprop.tag(x * w, "h") ** 3)  # noqa: E731  ∂L/∂h = 3h²
    second = jaxprop.grad(lambda w: jnp.sum(jaxprop.grad_and_tags(f)(w, X)[1]["h"]))(0.5)
    np.testing.assert_allclose(second, jnp.sum(6 * X * X * 0.5), rtol=1e-5)


def test_tags_under_vmap():
    f = lambda w, x: jnp.sum(jaxprop.tag(jnp.sin(w * x), "h") ** 2)  # noqa: E731
    _, tags = jax.vmap(jaxprop.grad_and_tags(f), (None, 0))(0.7, X)
    np.testing.assert_allclose(tags["h"], 2 * jnp.sin(0.7 * X), rtol=1e-6)


def scanned(w, xs, eps=None):
    """A tanh RNN; ``eps`` perturbs each step's state (the JAX way to get ∂L/∂state)."""
    eps = jnp.zeros_like(xs) if eps is None else eps

    def body(c, xe):
        x, e = xe
        c = jaxprop.tag(jnp.tanh(c * w + x), "c") + e
        return c, c ** 2
    return jnp.sum(jax.lax.scan(body, 0.3, (xs, eps))[1] * jnp.arange(1.0, 4.0))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_tags_inside_a_scan_body_give_a_per_step_stack(mode):
    xs = jnp.array([0.1, -0.4, 0.3])
    f = jaxprop.grad_and_tags(scanned)
    g, tags = (jax.jit(f) if mode == "jit" else f)(0.5, xs)
    want_g, want_c = jax.grad(scanned, argnums=(0, 2))(0.5, xs, jnp.zeros(3))
    np.testing.assert_allclose(tags["c"], want_c, rtol=1e-5)     # shape (3,): one per step
    np.testing.assert_allclose(g, want_g, rtol=1e-5)


@pytest.mark.parametrize("positive", [True, False])
def test_tags_inside_a_traced_cond_branch(positive):
    def f(w, x, eps=0.0):
        a = lambda x: (jaxprop.tag(jnp.sin(x * w), "s") + eps) * 2.0  # noqa: E731
        b = lambda x: jnp.cos(x * w) + 0.0 * eps  # noqa: E731
        return jnp.sum(jax.lax.cond(x[0] > 0, a, b, x))

    x = jnp.array([1.0, 2.0]) * (1 if positive else -1)
    g, tags = jax.jit(jaxprop.grad_and_tags(f))(0.3, x)
    want_g, want_s = jax.grad(f, argnums=(0, 2))(0.3, x, jnp.zeros(2))
    np.testing.assert_allclose(tags["s"], want_s)                 # zeros if b ran
    np.testing.assert_allclose(g, want_g, rtol=1e-5)


def test_scope_tag_gives_the_gradients_of_what_a_scope_sends_out():
    def model(params, x, eps=0.0):
        with jax.named_scope("block1"):
            h = jnp.tanh(x @ params["w1"])
        h = h + eps                                   # the JAX way: a zero perturbation
        return jnp.sum(jax.nn.log_softmax(h @ params["w2"]) * jnp.array([1.0, 0.0]))

    f = jaxprop.scope_tag("block1", "block1")(model)
    for wrap in (lambda f: f, jax.jit):
        grads, tags = wrap(jaxprop.grad_and_tags(f))(PARAMS, X)
        want = jax.grad(model, argnums=2)(PARAMS, X, jnp.zeros((4, 5)))
        assert len(tags["block1"]) == 1
        np.testing.assert_allclose(tags["block1"][0], want, rtol=1e-5, atol=1e-7)


def test_tags_inside_an_eager_while_loop_give_one_gradient_per_iteration():
    def f(w, eps=None):
        eps = jnp.zeros(3) if eps is None else eps

        def body(c):
            i, h = c
            return i + 1, jaxprop.tag(jnp.tanh(h * w), "h") + eps[i]
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, 0.5))[1] ** 2

    def unrolled(w, eps):                 # JAX has no reverse mode for while_loop
        h = 0.5
        for i in range(3):
            h = jnp.tanh(h * w) + eps[i]
        return h ** 2

    g, tags = jaxprop.grad_and_tags(f)(0.8)
    np.testing.assert_allclose(f(0.8), unrolled(0.8, jnp.zeros(3)), rtol=1e-6)
    want_g, want_h = jax.grad(unrolled, argnums=(0, 1))(0.8, jnp.zeros(3))
    np.testing.assert_allclose(tags["h"], want_h, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-5)
