"""Randomness passes through jaxprop: keys and random bits are integers (no nodes), noise
drawn with a constant key is a constant, and differentiated parameters that *use* the noise
(reparameterisation, dropout, Gumbel-softmax) get JAX's gradients; ``random_gamma``'s
implicit reparameterisation (rules/special.py) is checked here in that setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop
from jaxprop.registry import registered
from jaxprop.testing import check_vjp
from jaxprop.tracer import inlining, run_traced

RNG = np.random.default_rng(3)
KEY = jax.random.key(0)


def normal(*shape, dtype="float32"):
    return jnp.asarray(RNG.normal(size=shape), dtype)


def close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def reparam_loss(mu, log_sigma, key=KEY):
    """x = μ + σ ε with ε ~ N(0, 1) drawn from a constant key."""
    x = mu + jnp.exp(log_sigma) * jax.random.normal(key, mu.shape)
    return jnp.sum(jnp.tanh(x) ** 2)


def dropout_loss(w, x, key=KEY, rate=0.3):
    h = jnp.tanh(x @ w)
    keep = jax.random.bernoulli(key, 1 - rate, h.shape)
    return jnp.sum(jnp.where(keep, h / (1 - rate), 0.0) ** 2)


def test_reparameterised_normal():
    mu, ls = normal(4), normal(4) * 0.1
    close(jaxprop.grad(reparam_loss, argnums=(0, 1))(mu, ls),
          jax.grad(reparam_loss, argnums=(0, 1))(mu, ls))
    for order in (1, 2):
        check_vjp(reparam_loss, mu, ls, order=order, rtol=1e-5, atol=1e-5)


def test_dropout():
    w, x = normal(3, 4), normal(5, 3)
    close(jaxprop.grad(dropout_loss)(w, x), jax.grad(dropout_loss)(w, x))
    check_vjp(dropout_loss, w, x, order=2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_key_as_argument_passes_through(make_key):
    """Typed and legacy uint32 keys, split inside, not differentiated (argnums=0)."""
    def loss(mu, key):
        k1, k2 = jax.random.split(key)
        k3 = jax.random.fold_in(k2, 7)
        return reparam_loss(mu, mu * 0.1, k1) + jnp.sum(mu * jax.random.uniform(k3, mu.shape))
    mu, key = normal(3), make_key(42)
    close(jaxprop.grad(loss)(mu, key), jax.grad(loss)(mu, key))
    value, grads = jaxprop.value_and_grad(loss)(mu, key)
    close(value, loss(mu, key))


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_key_as_differentiated_input_gets_float0(make_key):
    """vjp over (params, key): the key's cotangent is float0 zeros, as in jax.vjp."""
    mu, key = normal(3), make_key(1)
    check_vjp(lambda mu, key: reparam_loss(mu, mu, key), mu, key)
    _, pull = jaxprop.vjp(lambda mu, key: reparam_loss(mu, mu, key), mu, key)
    _, ct_key = pull(jnp.ones(()))
    assert ct_key.dtype == jax.dtypes.float0


def test_traced_distribution_parameters():
    """uniform(minval, maxval) and gumbel-softmax with differentiated parameters."""
    lo, width, logits = normal(4), jnp.abs(normal(4)) + 0.5, normal(5)
    check_vjp(lambda lo, w: jax.random.uniform(KEY, (4,), minval=lo, maxval=lo + w), lo, width,
              order=2, rtol=1e-5, atol=1e-5)
    gumbel_softmax = lambda z: jax.nn.softmax((z + jax.random.gumbel(KEY, z.shape)) / 0.5)
    check_vjp(gumbel_softmax, logits, order=2, rtol=1e-5, atol=1e-5)
    check_vjp(lambda z: z * jax.random.categorical(KEY, z, shape=(5,)), logits)


@pytest.mark.skipif("erf_inv" not in registered(), reason="erf_inv rule not registered yet")
def test_truncated_normal_bounds():
    f = lambda lo, hi: jax.random.truncated_normal(KEY, lo, hi, (3,))
    check_vjp(f, jnp.full(3, -1.0), jnp.full(3, 1.5), rtol=1e-4, atol=1e-4)


def test_gamma_implicit_reparameterisation():
    """random_gamma's rule: ∂x/∂a = random_gamma_grad(a, x) (also beta and dirichlet)."""
    a = jnp.asarray([0.5, 1.0, 3.0])
    check_vjp(lambda a: jax.random.gamma(KEY, a), a, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_loggamma_and_dirichlet():
    a = jnp.asarray([0.5, 1.0, 3.0])
    check_vjp(lambda a: jax.random.loggamma(KEY, a), a, rtol=1e-4, atol=1e-4)
    check_vjp(lambda a: jax.random.dirichlet(KEY, a), a, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_gamma_float64(x64):
    a = jnp.asarray([0.7, 2.0], jnp.float64)
    check_vjp(lambda a: jax.random.gamma(KEY, a, dtype=jnp.float64), a, rtol=1e-8, atol=1e-8)


def test_random_under_jit_and_vmap_over_keys():
    mu = normal(3)
    keys = jax.random.split(jax.random.key(5), 4)
    loss = lambda mu, key: reparam_loss(mu, 0.5 * mu, key)
    close(jax.jit(jaxprop.grad(loss))(mu, keys[0]), jax.grad(loss)(mu, keys[0]))
    close(jax.vmap(jaxprop.grad(loss), (None, 0))(mu, keys),
          jax.vmap(jax.grad(loss), (None, 0))(mu, keys))


def test_no_nodes_for_random_bits():
    """Sampling with a constant key records nothing: only the ops on μ are on the tape."""
    f = lambda mu: mu + jax.random.normal(KEY, mu.shape)
    with inlining():  # record jnp's jitted helpers primitive by primitive
        trace, _, _ = run_traced(f, [normal(3)])
    traced = [n.name for n in trace.nodes]
    assert traced == ["add"], traced


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_training_step_returns_new_key_as_aux(make_key):
    """The usual pattern: split inside, return the new key as aux, untouched."""
    def loss(p, key):
        key, sub = jax.random.split(key)
        return jnp.sum((p * jax.random.normal(sub, p.shape)) ** 2), key
    p = normal(3)
    (v, k), g = jaxprop.value_and_grad(loss, has_aux=True)(p, make_key(0))
    (v2, k2), g2 = jax.value_and_grad(loss, has_aux=True)(p, make_key(0))
    close((v, g), (v2, g2))
    assert k.dtype == k2.dtype
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(k2))


def test_grad_of_a_key_is_an_error_like_jax():
    f = lambda tree: jnp.sum(tree["p"] * jax.random.normal(tree["key"], (3,)))
    tree = {"p": normal(3), "key": jax.random.key(0)}
    with pytest.raises(TypeError, match="real- or complex-valued"):
        jax.grad(f)(tree)
    with pytest.raises(TypeError, match="real- or complex-valued"):
        jaxprop.grad(f)(tree)
