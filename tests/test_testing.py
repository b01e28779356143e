"""jaxprop.testing: hypothesis strategies, and property-testing a user's own custom VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jaxprop
from jaxprop.testing import (arrays, check_vjp, gradcheck, gradgradcheck, property_settings,
                             pytrees, shapes, user_rules)


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


# -- correct by construction: finite differences by default where JAX cannot judge -----------
def test_wrong_custom_vjp_fails_by_default_in_float32():
    """Both jax.vjp and jaxprop call the user's rule, so only finite differences can see the
    bug; check_vjp turns them on by itself (float32, no x64: a coarse but sufficient check)."""
    x = jnp.linspace(-2.0, 2.0, 5)
    assert not jax.config.jax_enable_x64
    assert user_rules(make_softclip(1.0), x) and not user_rules(jax.nn.relu, x)
    check_vjp(make_softclip(2.0), x, order=2)                 # the right rule passes
    with pytest.raises(AssertionError, match="finite differences disagree with the VJP"):
        check_vjp(make_softclip(1.0), x)
    check_vjp(make_softclip(1.0), x, finite_differences=False)  # the old blind spot


def test_wrong_custom_vjp_fails_by_default_in_float64(x64):
    x = jnp.linspace(-2.0, 2.0, 5, dtype=jnp.float64)
    check_vjp(make_softclip(2.0), x, order=2)
    with pytest.raises(AssertionError, match="evaluated in float64"):
        check_vjp(make_softclip(1.0), x)


@jax.custom_vjp
def cube(x):
    return x ** 3


# right first derivative, but its backward hides x from differentiation: 2nd order is 0
cube.defvjp(lambda x: (cube(x), x), lambda x, ct: (3 * ct * jax.lax.stop_gradient(x) ** 2,))


def test_gradgradcheck_sees_a_backward_that_cannot_be_differentiated():
    x = jnp.array([0.5, -1.0, 2.0])
    gradcheck(cube, x)                                         # first order is right
    with pytest.raises(AssertionError, match="second-order VJP"):
        gradgradcheck(cube, x)
    with pytest.raises(AssertionError, match="second-order VJP"):
        check_vjp(cube, x, order=2)                            # also by default
    gradgradcheck(lambda v: jnp.sin(v) * v, x)


def test_jaxprop_rule_without_a_jax_rule_is_judged_by_finite_differences():
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    def primitive(name, fn):
        p = Primitive(name)
        p.def_impl(fn)
        p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
        mlir.register_lowering(p, mlir.lower_fun(fn, multiple_results=False))
        return p

    softsign = lambda x: x / (1 + jnp.abs(x))  # noqa: E731
    right = primitive("test_softsign_right", softsign)
    wrong = primitive("test_softsign_wrong", softsign)
    jaxprop.defvjp("test_softsign_right", lambda ct, out, x: ct / (1 + jnp.abs(x)) ** 2)
    jaxprop.defvjp("test_softsign_wrong", lambda ct, out, x: ct / (1 + jnp.abs(x)))
    x = jnp.array([-1.5, 0.5, 2.0])
    check_vjp(right.bind, x)
    with pytest.raises(AssertionError, match="finite differences disagree"):
        check_vjp(wrong.bind, x)
    with pytest.raises(AssertionError, match="JAX cannot differentiate"):
        check_vjp(right.bind, x, finite_differences=False)


def test_finite_differences_say_where_they_cannot_judge():
    with pytest.raises(ValueError, match="no floating-point input"):
        check_vjp(lambda i: i * 2, jnp.arange(3), finite_differences=True)
    with pytest.raises(AssertionError, match="not finite within"):
        gradcheck(lambda x: jnp.log(x), jnp.array([0.0, 1.0]))
    softclip = make_softclip(2.0)                  # a user rule, but only an integer input
    with pytest.warns(UserWarning, match="finite differences cannot either"):
        check_vjp(lambda i: softclip(i * 0.5), jnp.arange(3))


def test_float64_strategy_without_x64_is_an_error():
    @given(arrays(jnp.float64, (2,)))
    def draws(x):
        pass

    with pytest.raises(ValueError, match="need x64"):
        draws()
    with jax.enable_x64(True):
        draws()                                                # fine with x64


def test_property_settings_have_no_deadline():
    s = property_settings(max_examples=3)
    assert s.deadline is None and s.max_examples == 3
    calls = []

    @property_settings(max_examples=2, derandomize=True)
    @given(arrays(shape=(2,)))
    def slow_first_example(x):
        if not calls:
            import time
            time.sleep(0.3)                                    # beyond Hypothesis' 200 ms
        calls.append(x)

    slow_first_example()
    assert len(calls) >= 1
