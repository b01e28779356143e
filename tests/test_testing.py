"""jaxprop.testing: hypothesis strategies, and property-testing a user's own custom VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jaxprop
from jaxprop.testing import arrays, check_vjp, pytrees, shapes


@given(shapes(min_dims=1, max_dims=3, min_side=0, max_side=3))
def test_shapes_respect_bounds(shape):
    assert 1 <= len(shape) <= 3 and all(0 <= d <= 3 for d in shape)


@given(arrays(jnp.float32, shapes(max_dims=2), min_value=-2.0, max_value=1.0))
def test_arrays_are_finite_in_range(x):
    assert x.dtype == jnp.float32 and isinstance(x, jax.Array)
    assert np.all(np.isfinite(x)) and np.all((x >= -2.0) & (x <= 1.0))


@given(arrays(jnp.float32, (6,), min_value=-1.0, max_value=1.0, exclude=(0.0,)))
def test_arrays_exclude_values(x):
    assert np.all(np.abs(x) >= 1e-2 - 1e-7)


@given(arrays(jnp.complex64, (2, 2)))
def test_complex_arrays(x):
    assert x.dtype == jnp.complex64 and x.shape == (2, 2)


@given(pytrees(max_leaves=4))
def test_pytrees_hold_arrays(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    assert 1 <= len(leaves) <= 4 and all(leaf.dtype == jnp.float32 for leaf in leaves)


@given(pytrees(arrays(shape=(3,)), max_leaves=3))
def test_rules_on_pytrees(tree):
    check_vjp(lambda t: jax.tree_util.tree_map(lambda v: jnp.tanh(v) * v, t), tree, order=2)


# -- the README example: a user property-tests their own custom VJP ------------------------
def make_softclip(factor):
    """2·tanh(x) with a hand-written VJP (2 − y²/2)·ct; ``factor`` 2 is right, 1 is a bug."""

    @jax.custom_vjp
    def softclip(x):
        return 2.0 * jnp.tanh(x)

    softclip.defvjp(lambda x: (softclip(x), softclip(x)),
                    lambda y, ct: (ct * (2.0 - y * y / factor),))
    return softclip


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # x64 for all draws
@given(arrays(jnp.float64, shapes(max_dims=1), min_value=-3.0, max_value=3.0))
def test_user_custom_vjp_matches_finite_differences(x64, x):
    softclip = make_softclip(2.0)
    assert x.dtype == jnp.float64
    check_vjp(softclip, x, order=1, finite_differences=True)       # first order vs FD
    np.testing.assert_allclose(jaxprop.grad(lambda v: softclip(v).sum())(x),
                               jax.grad(lambda v: 2 * jnp.tanh(v).sum())(x), rtol=1e-10)


def test_a_wrong_custom_vjp_is_caught(x64):
    with pytest.raises(AssertionError, match="finite differences"):
        check_vjp(make_softclip(1.0), jnp.linspace(-2.0, 2.0, 5), finite_differences=True)
