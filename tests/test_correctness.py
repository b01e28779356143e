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
