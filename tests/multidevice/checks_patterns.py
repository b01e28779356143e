"""shard_map / pmap / vmap(axis_name) patterns on 8 simulated CPU devices, against JAX.

Run by tests/test_multidevice.py in a subprocess (8 devices need XLA_FLAGS before JAX starts).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

import jaxprop
from jaxprop.rules.collectives import NoCollectiveDerivative

MESH = jax.make_mesh((8,), ("i",), axis_types=(AxisType.Auto,))
MESH2 = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)


def rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


W, X = rand((3,), 0), rand((16, 3), 1)


def close(a, b, tol=2e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                         rtol=tol, atol=tol), a, b)


def both(make, *args, jit=True):
    """make(grad) -> function; jaxprop's result equals JAX's (eagerly, and jitted)."""
    expected = make(jax.grad)(*args)
    close(make(jaxprop.grad)(*args), expected)
    if jit:
        close(jax.jit(make(jaxprop.grad))(*args), expected)
    return expected


# -- the two traps of PARALLEL.md -------------------------------------------------------------
def per_device_psum_grad(check_vma):
    def make(grad):
        def body(x):
            return grad(lambda x: jnp.sum(jnp.sin(lax.psum(x * x, "i"))))(x)
        return jax.shard_map(body, mesh=MESH, in_specs=P("i"), out_specs=P("i"),
                             check_vma=check_vma)
    return make


def test_trap_psum_vs_psum_invariant():
    """Same code, per-device gradients 8x apart between check_vma=False (psum: its
    transpose sums the cotangents again) and check_vma=True (psum_invariant -> pvary)."""
    vma = both(per_device_psum_grad(True), X)
    plain = both(per_device_psum_grad(False), X)
    close(plain, 8 * vma, tol=1e-4)


def grad_then_pmean(check_vma):
    def make(grad):
        def body(w, x):
            g = grad(lambda w: jnp.mean((x @ w) ** 2))(w)
            return lax.pmean(g, "i")
        return jax.shard_map(body, mesh=MESH, in_specs=(P(), P("i")), out_specs=P(),
                             check_vma=check_vma)
    return make


def test_trap_grad_then_pmean_is_n_times_under_check_vma():
    single = jax.grad(lambda w: jnp.mean((X @ w) ** 2))(W)
    close(both(grad_then_pmean(True), W, X), 8 * single, tol=1e-4)
    close(both(grad_then_pmean(False), W, X), single, tol=1e-4)

    def idiom(grad):  # the JAX 0.10 idiom: differentiate the pmean'd loss
        def body(w, x):
            return grad(lambda w: lax.pmean(jnp.mean((x @ w) ** 2), "i"))(w)
        return jax.shard_map(body, mesh=MESH, in_specs=(P(), P("i")), out_specs=P())
    close(both(idiom, W, X), single, tol=1e-4)


# -- data parallel: gradient outside == single device -----------------------------------------
@pytest.mark.parametrize("check_vma", [True, False])
def test_data_parallel_loss_outside_equals_single_device(check_vma):
    def loss(w, x):
        local = jax.shard_map(lambda w, x: lax.pmean(jnp.mean(jnp.tanh(x @ w) ** 2), "i"),
                              mesh=MESH, in_specs=(P(), P("i")), out_specs=P(),
                              check_vma=check_vma)
        return local(w, x)
    single = jax.grad(lambda w: jnp.mean(jnp.tanh(X @ w) ** 2))(W)
    close(jaxprop.grad(loss)(W, X), single, tol=1e-5)
    close(jax.jit(jaxprop.grad(loss))(W, X), jax.grad(loss)(W, X))


# -- pmap and the deprecated experimental shard_map --------------------------------------------
def test_pmap_gradient_outside_and_inside():
    xs = X.reshape(8, 2, 3)

    def outside(w):
        per = jax.pmap(lambda x, w: lax.psum(jnp.sum(jnp.sin(x * w)), "i"), axis_name="i",
                       in_axes=(0, None))(xs, w)
        return jnp.sum(per ** 2)
    close(jaxprop.grad(outside)(W), jax.grad(outside)(W))
    close(jax.jit(jaxprop.grad(outside))(W), jax.grad(outside)(W))

    def inside(grad):
        return jax.pmap(lambda x: grad(lambda x: jnp.sum(jnp.sin(lax.psum(x * x, "i"))))(x),
                        axis_name="i")
    both(inside, xs, jit=False)


def test_experimental_shard_map():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.shard_map import shard_map

    def loss(w, x):
        f = shard_map(lambda w, x: lax.psum(jnp.sum(jnp.cos(x * w)), "i"), mesh=MESH,
                      in_specs=(P(), P("i")), out_specs=P())
        return f(w, x) ** 2
    close(jaxprop.grad(loss, argnums=(0, 1))(W, X), jax.grad(loss, argnums=(0, 1))(W, X))


# -- vmap with axis_name ----------------------------------------------------------------------
VMAP_BODIES = {
    "psum": lambda x: jnp.sin(lax.psum(x, "i")) * x,
    "pmean": lambda x: lax.pmean(jnp.sin(x), "i") * x,
    "all_gather": lambda x: jnp.sum(lax.all_gather(jnp.sin(x), "i") ** 2, 0),
    "ppermute": lambda x: lax.ppermute(jnp.sin(x), "i", [(k, (k + 1) % 8) for k in range(8)]),
    "psum_scatter": lambda x: lax.psum_scatter(jnp.sin(x), "i", tiled=True),
    "axis_index": lambda x: jnp.sin(x) * lax.axis_index("i"),
}


@pytest.mark.parametrize("name", list(VMAP_BODIES))
def test_vmap_axis_name_gradient_outside(name):
    f = VMAP_BODIES[name]
    xs = X[:8] if name != "psum_scatter" else rand((8, 16), 2)
    loss = lambda xs: jnp.sum(jnp.cos(jax.vmap(f, axis_name="i")(xs)))
    close(jaxprop.grad(loss)(xs), jax.grad(loss)(xs))
    close(jax.jit(jaxprop.grad(loss))(xs), jax.grad(loss)(xs))


@pytest.mark.parametrize("name", list(VMAP_BODIES))
def test_vmap_axis_name_gradient_inside(name):
    f = VMAP_BODIES[name]
    xs = X[:8] if name != "psum_scatter" else rand((8, 16), 2)
    make = lambda grad: jax.vmap(grad(lambda x: jnp.sum(jnp.cos(f(x)))), axis_name="i")
    both(make, xs)


# -- second order, closures, 2-D meshes, nested maps ------------------------------------------
@pytest.mark.parametrize("check_vma", [True, False])
def test_second_order_outside(check_vma):
    def loss(w, x):
        f = jax.shard_map(lambda w, x: lax.psum(jnp.sum(jnp.sin(x * w) ** 2), "i"), mesh=MESH,
                          in_specs=(P(), P("i")), out_specs=P(), check_vma=check_vma)
        return f(w, x)
    hvp = lambda grad: lambda w, x: grad(lambda w: jnp.sum(grad(loss)(w, x) * x[0]))(w)
    both(hvp, W, X)


@pytest.mark.parametrize("check_vma", [True, False])
def test_second_order_inside(check_vma):
    def make(grad):
        def body(w, x):
            g = lambda w: grad(lambda w: jnp.sum(jnp.sin(lax.psum(x * w, "i")) ** 2))(w)
            return grad(lambda w: jnp.sum(g(w) ** 2))(w)[None]
        return jax.shard_map(body, mesh=MESH, in_specs=(P(), P("i")), out_specs=P("i"),
                             check_vma=check_vma)
    both(make, W, X)


def test_closed_over_differentiated_value():
    def loss(w, x):
        f = jax.shard_map(lambda x: lax.psum(jnp.sum(jnp.sin(x * w)), "i"), mesh=MESH,
                          in_specs=P("i"), out_specs=P())
        return f(x)
    close(jaxprop.grad(loss, argnums=(0, 1))(W, X), jax.grad(loss, argnums=(0, 1))(W, X))
    close(jax.jit(jaxprop.grad(loss, argnums=(0, 1)))(W, X),
          jax.grad(loss, argnums=(0, 1))(W, X))


@pytest.mark.parametrize("check_vma", [True, False])
def test_two_dimensional_mesh(check_vma):
    x = rand((4, 8), 3)

    def loss(w, x):
        def body(w, x):
            y = jnp.sin(x * w)
            y = lax.psum(y, "a") * y
            return lax.all_gather(y, "b", tiled=True, axis=1)
        f = jax.shard_map(body, mesh=MESH2, in_specs=(P(None, "b"), P("a", "b")),
                          out_specs=P("a", "b"), check_vma=check_vma)
        return jnp.sum(jnp.cos(f(w, x)))
    w = rand((1, 8), 4)
    close(jaxprop.grad(loss, argnums=(0, 1))(w, x), jax.grad(loss, argnums=(0, 1))(w, x))
    close(jax.jit(jaxprop.grad(loss, argnums=(0, 1)))(w, x),
          jax.grad(loss, argnums=(0, 1))(w, x))


def test_partial_manual_axes():
    def loss(w, x):
        f = jax.shard_map(lambda w, x: lax.psum(jnp.sin(x * w), "a"), mesh=MESH2,
                          in_specs=(P(), P("a")), out_specs=P(), axis_names={"a"})
        return jnp.sum(f(w, x) ** 2)
    x = rand((4, 8), 5)
    w = rand((8,), 6)
    close(jax.jit(jaxprop.grad(loss, argnums=(0, 1)))(w, x),
          jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x))


def test_scan_and_jit_inside_the_body():
    def loss(w, x):
        def body(w, x):
            step = lambda c, xi: (jnp.tanh(c * w + xi), c)
            c, _ = lax.scan(step, x[0] * 0.0, x)
            return jax.jit(lambda c: lax.psum(jnp.sum(c ** 2), "i"))(c)
        return jax.shard_map(body, mesh=MESH, in_specs=(P(), P("i")), out_specs=P())(w, x)
    close(jaxprop.grad(loss, argnums=(0, 1))(W, X), jax.grad(loss, argnums=(0, 1))(W, X))
    close(jax.jit(jaxprop.grad(loss, argnums=(0, 1)))(W, X),
          jax.grad(loss, argnums=(0, 1))(W, X))


def test_eager_gradient_inside_an_eager_body():
    both(per_device_psum_grad(True), X, jit=False)


# -- errors as JAX gives them -----------------------------------------------------------------
@pytest.mark.parametrize("prim", [lax.pmax, lax.pmin])
def test_pmax_pmin_have_no_gradient(prim):
    def loss(x):
        return jax.shard_map(lambda x: jnp.sum(prim(x, "i")), mesh=MESH, in_specs=P("i"),
                             out_specs=P())(x)
    with pytest.raises(NotImplementedError, match="Differentiation rule"):
        jax.grad(loss)(X)
    with pytest.raises(NoCollectiveDerivative, match="all_gather"):
        jaxprop.grad(loss)(X)
    stopped = lambda x: loss(lax.stop_gradient(x)) + jnp.sum(x)  # fine under stop_gradient
    close(jaxprop.grad(stopped)(X), jax.grad(stopped)(X))


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None, ""


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unknown_axis_name_and_collective_outside_a_map(jit):
    """The same error as jax.grad (JAX 0.10.2 itself raises a bare AssertionError for an
    axis name missing from the shard_map's mesh, and NameError outside any map)."""
    wrap = jax.jit if jit else (lambda f: f)
    bad_axis = lambda x: jax.shard_map(lambda x: lax.psum(x, "j"), mesh=MESH,
                                       in_specs=P("i"), out_specs=P())(x).sum()
    outside = lambda x: lax.psum(x, "i").sum()
    for f in (bad_axis, outside):
        expected, message = _raised(lambda: wrap(jax.grad(f))(X))
        assert expected is not None
        got, got_message = _raised(lambda: wrap(jaxprop.grad(f))(X))
        assert got is expected and got_message == message
    assert "unbound axis name: i" in _raised(lambda: jaxprop.grad(outside)(X))[1]


def test_pbroadcast_rule_matches_jax_transpose():
    """pbroadcast lowers on GPU only (and JAX's vmap batcher for it fails), so on CPU the
    backward program's collectives are compared with jax.grad's: psum of ct on the source."""
    def make(grad):
        def body(x):
            return grad(lambda x: jnp.sin(lax.pbroadcast(x[0], "i", 3)))(x)
        return jax.jit(jax.shard_map(body, mesh=MESH, in_specs=P("i"), out_specs=P("i")))

    def collectives(jaxpr):
        names = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("pbroadcast", "psum", "psum_invariant", "pvary",
                                      "axis_index", "select_n"):
                names.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                names += collectives(sub)
        return names

    x = X[:8, 0]   # a scalar per device: JAX's transpose handles scalars only
    ours = collectives(jax.make_jaxpr(make(jaxprop.grad))(x).jaxpr)
    theirs = collectives(jax.make_jaxpr(make(jax.grad))(x).jaxpr)
    assert sorted(ours) == sorted(theirs), (ours, theirs)
    assert "pbroadcast" in ours and "axis_index" in ours and "select_n" in ours
