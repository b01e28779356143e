"""conv_general_dilated against jax.vjp at orders 1 and 2: layouts, strides, padding,
dilations, feature/batch groups, 1D/2D/3D, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import jaxprop
from jaxprop.testing import check_vjp


def rand(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed + sum(shape))
    return jnp.asarray(rng.normal(size=shape), dtype)


def conv(**kw):
    return lambda x, w: lax.conv_general_dilated(x, w, **kw)


# (lhs shape, rhs shape, conv keyword arguments); default layouts are NC…/OI…/NC….
CASES = {
    "1d_valid": ((2, 3, 7), (4, 3, 3), dict(window_strides=(1,), padding="VALID")),
    "1d_same_stride2": ((2, 3, 8), (4, 3, 3), dict(window_strides=(2,), padding="SAME")),
    "1d_all_dilations": ((2, 3, 8), (4, 3, 3), dict(window_strides=(2,), padding=((1, 2),),
                                                   lhs_dilation=(2,), rhs_dilation=(2,))),
    "1d_negative_pad": ((2, 4, 8), (6, 2, 3), dict(window_strides=(3,), padding=((-1, 2),),
                                                   feature_group_count=2)),
    "1d_stride_leftover": ((1, 2, 10), (3, 2, 3), dict(window_strides=(4,), padding="VALID")),
    "1d_batch_groups": ((4, 3, 8), (6, 3, 2), dict(window_strides=(1,), padding=((2, 0),),
                                                  rhs_dilation=(3,), batch_group_count=2)),
    "1d_batch_groups_strided": ((6, 2, 9), (6, 2, 3), dict(window_strides=(2,), padding=((1, 1),),
                                                          lhs_dilation=(2,),
                                                          batch_group_count=3)),
    "1d_depthwise": ((2, 4, 7), (8, 1, 3), dict(window_strides=(1,), padding="SAME",
                                               feature_group_count=4)),
    "1d_kernel_wider_than_input": ((1, 2, 2), (3, 2, 4), dict(window_strides=(1,),
                                                             padding=((2, 3),))),
    "2d_nchw": ((2, 3, 6, 5), (4, 3, 3, 2), dict(window_strides=(1, 2), padding="SAME")),
    "2d_nhwc_hwio": ((2, 5, 6, 3), (3, 2, 3, 4), dict(
        window_strides=(2, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "2d_mixed_layouts": ((5, 2, 3, 6), (3, 4, 2, 2), dict(
        window_strides=(1, 1), padding=((1, 0), (0, 2)), rhs_dilation=(2, 1),
        dimension_numbers=("HNCW", "IOHW", "NWHC"))),
    "2d_asymmetric_all": ((2, 4, 7, 6), (6, 2, 3, 2), dict(
        window_strides=(2, 3), padding=((2, -1), (0, 1)), lhs_dilation=(1, 2),
        rhs_dilation=(2, 1), feature_group_count=2)),
    "2d_batch_groups_nhwc": ((4, 5, 5, 3), (2, 2, 3, 4), dict(
        window_strides=(1, 2), padding="VALID", batch_group_count=2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "2d_transposed_conv": ((1, 2, 4, 4), (3, 2, 3, 3), dict(
        window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2))),
    "3d_ncdhw": ((1, 2, 4, 5, 3), (3, 2, 2, 3, 2), dict(
        window_strides=(1, 2, 1), padding="SAME", rhs_dilation=(1, 1, 2))),
    "3d_ndhwc_groups": ((2, 4, 3, 5, 4), (2, 2, 2, 2, 6), dict(
        window_strides=(2, 1, 1), padding=((1, 0), (0, 0), (1, 1)), feature_group_count=2,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_grid(name):
    lhs_shape, rhs_shape, kw = CASES[name]
    check_vjp(conv(**kw), rand(lhs_shape), rand(rhs_shape, seed=1), order=2,
              rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["2d_asymmetric_all"] + [
    pytest.param(n, marks=pytest.mark.slow)
    for n in ["1d_all_dilations", "1d_batch_groups", "2d_nhwc_hwio", "3d_ncdhw"]])
def test_conv_float64(name, x64):
    lhs_shape, rhs_shape, kw = CASES[name]
    check_vjp(conv(**kw), rand(lhs_shape, jnp.float64), rand(rhs_shape, jnp.float64, 1),
              order=2, finite_differences=True, rtol=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_conv_low_precision(dtype):
    lhs_shape, rhs_shape, kw = CASES["2d_nchw"]
    check_vjp(conv(**kw), rand(lhs_shape, dtype), rand(rhs_shape, dtype, 1), order=2,
              rtol=6e-2, atol=6e-2)


def test_conv_complex(x64):
    lhs_shape, rhs_shape, kw = CASES["2d_asymmetric_all"]
    x = rand(lhs_shape, jnp.float64) + 1j * rand(lhs_shape, jnp.float64, 5)
    w = rand(rhs_shape, jnp.float64, 1) - 0.5j * rand(rhs_shape, jnp.float64, 7)
    check_vjp(conv(**kw), x, w, order=2)


def test_conv_preferred_element_type():
    x, w = rand((2, 3, 6), jnp.bfloat16), rand((4, 3, 3), jnp.bfloat16, 1)
    f = conv(window_strides=(1,), padding="SAME", preferred_element_type=jnp.float32)
    check_vjp(f, x, w, order=2, rtol=6e-2, atol=6e-2)


def test_conv_one_operand_constant_and_jit():
    x, w = rand((2, 3, 6, 6)), rand((4, 3, 3, 3), seed=1)
    f = lambda x: jnp.sum(jnp.tanh(lax.conv(x, w, (2, 2), "SAME")) ** 2)
    np.testing.assert_allclose(jax.jit(jaxprop.grad(f))(x), jax.grad(f)(x), rtol=1e-4,
                               atol=1e-5)
    g = lambda w: jnp.sum(lax.conv_transpose(x, w, (2, 2), "SAME",
                                             dimension_numbers=("NCHW", "OIHW", "NCHW")) ** 2)
    check_vjp(g, w, order=2, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 2),
       st.integers(-1, 2), st.integers(0, 2), st.sampled_from([(1, 1), (2, 1), (1, 2)]),
       st.integers(2, 4))
def test_conv_random_1d(stride, lhs_dil, rhs_dil, k, lo, hi, groups, length):
    """Random strides/padding/dilations/groups: order 1 and 2 against JAX."""
    fg, bg = groups
    n_in = (length - 1) * lhs_dil + 1 + lo + hi
    if n_in < (k - 1) * rhs_dil + 1:
        hi += (k - 1) * rhs_dil + 1 - n_in
    lhs = rand((2 * bg, 2 * fg, length), seed=stride)
    rhs = rand((2 * fg * bg, 2, k), seed=lo + 3)
    f = conv(window_strides=(stride,), padding=((lo, hi),), lhs_dilation=(lhs_dil,),
             rhs_dilation=(rhs_dil,), feature_group_count=fg, batch_group_count=bg)
    check_vjp(f, lhs, rhs, order=2, rtol=1e-4, atol=1e-4)


def test_conv_per_example_grads_vmap():
    """vmap of jaxprop.grad over examples (the rules batch like any lax code)."""
    xs, w = rand((3, 1, 2, 5, 5)), rand((4, 2, 3, 3), seed=1)

    def loss(w, x):
        y = lax.conv_general_dilated(x, w, (1, 2), ((1, 1), (0, 1)), rhs_dilation=(1, 2))
        return jnp.sum(jnp.tanh(y))

    ours = jax.vmap(jaxprop.grad(loss), in_axes=(None, 0))(w, xs)
    np.testing.assert_allclose(ours, jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, xs),
                               rtol=1e-4, atol=1e-5)
