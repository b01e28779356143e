"""Window-reduction (pooling) rules against jax.vjp, at orders 1 and 2.

JAX has no VJP for max/min pooling with window dilation, nor for the generic ``reduce_window``
primitive: there the reference is an equivalent program JAX can differentiate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from rulecheck import check, rand
from jaxprop.testing import random_like

# window geometries: strides, padding, base and window dilation
GEOMETRIES = {
    "valid": dict(window_dimensions=(2, 2), window_strides=(1, 1), padding="VALID"),
    "same_strided": dict(window_dimensions=(3, 2), window_strides=(2, 1), padding="SAME"),
    "big_window": dict(window_dimensions=(4, 5), window_strides=(1, 1), padding="VALID"),
    "explicit_pad": dict(window_dimensions=(2, 3), window_strides=(2, 2),
                         padding=((1, 1), (0, 1))),
    "base_dilated": dict(window_dimensions=(2, 2), window_strides=(1, 2),
                         padding=((1, 0), (0, 1)), base_dilation=(2, 1)),
    "window_dilated": dict(window_dimensions=(2, 3), window_strides=(2, 2),
                           padding=((1, 2), (0, 1)), base_dilation=(2, 1),
                           window_dilation=(1, 2)),
    "stride_gt_window": dict(window_dimensions=(1, 2), window_strides=(3, 1),
                             padding=((0, 0), (2, 1)), base_dilation=(1, 3),
                             window_dilation=(2, 1)),
}
NO_DILATION = [k for k, g in GEOMETRIES.items() if g.get("window_dilation", (1, 1)) == (1, 1)]
FEW = ["same_strided", "base_dilated", "window_dilated"]   # for the slower combinations
REDUCERS = {"sum": (0.0, lax.add), "max": (-jnp.inf, lax.max), "min": (jnp.inf, lax.min)}


def pool(name, geometry):
    init, op = REDUCERS[name]
    return lambda x: lax.reduce_window(x, np.asarray(init, x.dtype), op,
                                       **GEOMETRIES[geometry])


def unrolled_pool(reduce, init, geometry):
    """The same pooling as a max/min/sum over stacked strided slices (a JAX-differentiable
    reference; for max it splits ties, so use it on tie-free inputs)."""
    g = GEOMETRIES[geometry]

    def f(x):
        out_shape = jax.eval_shape(lambda: lax.reduce_window(jnp.zeros(x.shape, x.dtype), 0.0, lax.add, **g)).shape
        base = g.get("base_dilation", (1, 1))
        wd = g.get("window_dilation", (1, 1))
        xp = lax.pad(x, np.asarray(init, x.dtype),
                     [(lo, hi, b - 1) for (lo, hi), b in zip(g["padding"], base)])
        slices = []
        for i in range(g["window_dimensions"][0]):
            for j in range(g["window_dimensions"][1]):
                start = (i * wd[0], j * wd[1])
                limit = tuple(s + (o - 1) * st + 1
                              for s, o, st in zip(start, out_shape, g["window_strides"]))
                slices.append(lax.slice(xp, start, limit, g["window_strides"]))
        return reduce(jnp.stack(slices), axis=0)
    return f


def test_primitive_names():
    x = jnp.ones((4, 4))
    names = {n: jax.make_jaxpr(pool(n, "valid"))(x).jaxpr.eqns[-1].primitive.name
             for n in REDUCERS}
    assert names == {"sum": "reduce_window_sum", "max": "reduce_window_max",
                     "min": "reduce_window_min"}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_reduce_window_sum(geometry):
    check(pool("sum", geometry), rand((5, 6), jnp.float32), order=2)


@pytest.mark.parametrize("geometry", FEW)
def test_reduce_window_sum_x64(geometry, x64):
    check(pool("sum", geometry), rand((4, 7), jnp.float64), order=2)


@pytest.mark.parametrize("geometry", NO_DILATION)
@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_pool(name, geometry):
    check(pool(name, geometry), rand((5, 6), jnp.float32), order=2)


@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_pool_x64(name, x64):
    check(pool(name, "base_dilated"), rand((5, 6), jnp.float64), order=2)


@pytest.mark.parametrize("geometry", ["valid", "same_strided", "explicit_pad"])
@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_pool_ties_go_to_first(name, geometry):
    """JAX (XLA's select-and-scatter) gives a tied window's ct to its first extremum.

    Order 1 only: at ties JAX's own second order is not the derivative of its first (its JVP,
    select_and_gather_add, picks a tied element in XLA's reduction order, not the first);
    jaxprop's second order is the exact transpose of its first.
    """
    x = jnp.asarray([[1.0, 2, 2, 0, 2], [2, 0, 2, 2, 1], [1, 1, 1, 2, 2], [0, 2, 0, 2, 1]])
    check(pool(name, geometry), x, order=1)
    check(pool(name, geometry), jnp.zeros((4, 5)), order=1)


@pytest.mark.parametrize("geometry", ["window_dilated", "stride_gt_window"])
@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_pool_window_dilation(name, geometry):
    """JAX cannot differentiate these; compare with the unrolled program on tie-free input."""
    x = rand((5, 6), jnp.float32)
    reduce = jnp.max if name == "max" else jnp.min
    ref = unrolled_pool(reduce, REDUCERS[name][0], geometry)
    np.testing.assert_array_equal(pool(name, geometry)(x), ref(x))
    ct = random_like(ref(x), 1)
    np.testing.assert_allclose(jaxprop.vjp(pool(name, geometry), x)[1](ct)[0],
                               jax.vjp(ref, x)[1](ct)[0], rtol=1e-6)


def test_pooling_layers_bfloat16():
    x = rand((1, 6, 6, 2), jnp.bfloat16)
    avg = lambda x: lax.reduce_window(x, np.asarray(0, x.dtype), lax.add, (1, 2, 2, 1),
                                      (1, 2, 2, 1), "VALID") / 4
    mx = lambda x: lax.reduce_window(x, np.asarray(-np.inf, x.dtype), lax.max,
                                     (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
    check(avg, x, order=2)
    check(mx, x, order=2)


def test_empty_and_jit():
    check(pool("sum", "valid"), jnp.zeros((0, 4)), order=2)
    check(pool("max", "valid"), jnp.zeros((3, 0)), order=2)
    x = rand((5, 6), jnp.float32)
    f = lambda x: jnp.sum(jnp.sin(pool("max", "same_strided")(x)) * pool("sum", "same_strided")(x))
    np.testing.assert_allclose(jax.jit(jaxprop.grad(f))(x), jax.grad(f)(x), rtol=1e-5,
                               atol=1e-6)


def test_vmap_of_grad():
    xs = rand((2, 5, 6), jnp.float32)
    f = lambda x: jnp.sum(pool("max", "same_strided")(x) ** 2)
    np.testing.assert_allclose(jax.vmap(jaxprop.grad(f))(xs), jax.vmap(jax.grad(f))(xs),
                               rtol=1e-6)


# -- the generic reduce_window primitive (a reducer lax has no special primitive for) --------
@pytest.mark.parametrize("geometry", ["valid"] + FEW)
def test_generic_reduce_window(geometry, dtype):
    g = GEOMETRIES[geometry]
    x = jnp.abs(rand((5, 6), dtype)) + 0.5
    prod = lambda x: lax.reduce_window(x, jnp.asarray(1, x.dtype), lax.mul, **g)
    prod_ref = lambda x: jnp.exp(lax.reduce_window(jnp.log(x), np.asarray(0, x.dtype),
                                                   lax.add, **g))
    shifted = lambda x: lax.reduce_window(x, jnp.asarray(2, x.dtype), lax.add, **g)
    shifted_ref = lambda x: lax.reduce_window(x, np.asarray(0, x.dtype), lax.add, **g) + 2
    assert jax.make_jaxpr(prod)(x).jaxpr.eqns[-1].primitive.name == "reduce_window"
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    for f, ref in [(prod, prod_ref), (shifted, shifted_ref)]:
        ct = random_like(ref(x), 3)
        np.testing.assert_allclose(jaxprop.vjp(f, x)[1](ct)[0], jax.vjp(ref, x)[1](ct)[0],
                                   rtol=tol, atol=tol)
        second = lambda grad, fn: grad(lambda x: jnp.sum(jnp.sin(
            grad(lambda x: jnp.sum(fn(x) * ct))(x))))(x)
        np.testing.assert_allclose(second(jaxprop.grad, f), second(jax.grad, ref),
                                   rtol=10 * tol, atol=10 * tol)


def test_generic_reduce_window_two_operands():
    x, y = rand((4, 5), jnp.float32, 1), rand((4, 5), jnp.float32, 2)
    g = GEOMETRIES["explicit_pad"]

    def f(x, y):
        return lax.reduce_window((x, y), (jnp.float32(1), jnp.float32(0)),
                                 lambda a, b: (a[0] * b[0], a[1] + b[1]), **g)

    def ref(x, y):
        return (unrolled_pool(jnp.prod, 1.0, "explicit_pad")(x),
                lax.reduce_window(y, 0.0, lax.add, **g))

    assert jax.make_jaxpr(f)(x, y).jaxpr.eqns[-1].primitive.name == "reduce_window"
    ct = random_like(ref(x, y), 4)
    for a, b in zip(jaxprop.vjp(f, x, y)[1](ct), jax.vjp(ref, x, y)[1](ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
