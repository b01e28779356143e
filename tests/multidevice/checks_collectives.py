"""Collectives and shard_map on 8 simulated CPU devices: jaxprop's gradients equal JAX's.

Run by tests/test_multidevice.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before JAX starts).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

import jaxprop

assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

MESH = jax.make_mesh((8,), ("i",), axis_types=(AxisType.Auto,))
N = 8


def rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


W = rand((3,), 0)
X = rand((8 * N, 3), 1)          # sharded over 'i': (8, 3) per device


def close(a, b, tol=2e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                         rtol=tol, atol=tol), a, b)


# -- per-device bodies: (w replicated, x sharded) -> one output, and its out_spec ------------
def _shift(y):
    return lax.ppermute(y, "i", [(k, (k + 1) % N) for k in range(N)])


BODIES = {
    "psum": (lambda w, x: lax.psum(jnp.sin(x * w), "i"), P()),
    "psum_scalar": (lambda w, x: lax.psum(jnp.sum(jnp.sin(x * w)), "i"), P()),
    "pmean": (lambda w, x: lax.pmean(jnp.sin(x * w), "i"), P()),
    "all_gather": (lambda w, x: lax.all_gather(jnp.sin(x * w), "i"), P("i")),
    "all_gather_tiled": (lambda w, x: lax.all_gather(jnp.sin(x * w), "i", tiled=True), P("i")),
    "all_gather_axis1": (lambda w, x: lax.all_gather(jnp.sin(x * w), "i", axis=1, tiled=True),
                         P("i")),
    "psum_scatter": (lambda w, x: lax.psum_scatter(jnp.sin(x * w), "i"), P("i")),
    "psum_scatter_tiled": (lambda w, x: lax.psum_scatter(jnp.sin(x * w), "i", tiled=True),
                           P("i")),
    "ppermute": (lambda w, x: _shift(jnp.sin(x * w)) * x, P("i")),
    "ppermute_partial": (lambda w, x: lax.ppermute(jnp.sin(x * w), "i", [(0, 1), (2, 5)]),
                         P("i")),
    "all_to_all_tiled": (lambda w, x: lax.all_to_all(jnp.sin(x * w), "i", 0, 1, tiled=True),
                         P("i")),
    "all_to_all_same_axis": (lambda w, x: lax.all_to_all(jnp.sin(x * w), "i", 0, 0), P("i")),
    "axis_index": (lambda w, x: jnp.sin(x * w) * lax.axis_index("i"), P("i")),
    "replicated_out": (lambda w, x: jnp.sin(w) * 2.0, P()),
}
VMA_ONLY = {
    "all_gather_invariant": (lambda w, x: lax.all_gather(jnp.sin(x * w), "i", to="invarying"),
                             P()),
    "pcast": (lambda w, x: lax.pcast(jnp.sin(w), "i", to="varying") * x, P("i")),
}


def _cases(check_vma):
    return {**BODIES, **(VMA_ONLY if check_vma else {})}


def mapped(body, out_spec, check_vma):
    return jax.shard_map(body, mesh=MESH, in_specs=(P(), P("i")), out_specs=out_spec,
                         check_vma=check_vma)


def outside_loss(body, out_spec, check_vma):
    def loss(w, x):
        y = mapped(body, out_spec, check_vma)(w, x)
        return jnp.sum(jnp.cos(y) * y)
    return loss


OUTSIDE = [(name, vma) for vma in (True, False) for name in _cases(vma)]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name,check_vma", OUTSIDE)
def test_gradient_outside_the_map(name, check_vma, jit):
    loss = outside_loss(*_cases(check_vma)[name], check_vma)
    wrap = jax.jit if jit else (lambda f: f)
    expected = wrap(jax.grad(loss, argnums=(0, 1)))(W, X)
    close(wrap(jaxprop.grad(loss, argnums=(0, 1)))(W, X), expected)


def inside_grads(grad, body, check_vma):
    """Per-device gradients of the local loss sum(sin(body)), stacked over devices."""
    def per_device(w, x):
        gw, gx = grad(lambda w, x: jnp.sum(jnp.sin(body(w, x))), argnums=(0, 1))(w, x)
        return gw[None], gx
    return jax.shard_map(per_device, mesh=MESH, in_specs=(P(), P("i")),
                         out_specs=(P("i"), P("i")), check_vma=check_vma)


@pytest.mark.parametrize("name,check_vma", OUTSIDE)
def test_gradient_inside_the_body(name, check_vma):
    body, _ = _cases(check_vma)[name]
    expected = jax.jit(inside_grads(jax.grad, body, check_vma))(W, X)
    close(jax.jit(inside_grads(jaxprop.grad, body, check_vma))(W, X), expected)


def _received(w, x):
    """[y_j[d] for each device j] on device d (8, 3): the untiled all_to_all exchange of
    y = sin(x * w) written with all_gather, which JAX can differentiate."""
    y = lax.all_gather(jnp.sin(x * w), "i")                  # (8 devices, 8, 3)
    return jnp.take(y, lax.axis_index("i"), axis=1)


ALL_TO_ALL_UNTILED = {  # body, the same values via all_gather
    "split0_concat1": (lambda w, x: lax.all_to_all(jnp.sin(x * w), "i", 0, 1),
                       lambda w, x: _received(w, x).T),
    "split1_concat0": (lambda w, x: lax.all_to_all(jnp.sin(x * w).T, "i", 1, 0), _received),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("name", list(ALL_TO_ALL_UNTILED))
def test_all_to_all_untiled_beyond_jax(name, check_vma, jit):
    """JAX 0.10 transposes an untiled all_to_all with split_axis != concat_axis to a
    cotangent of the wrong shape (jax.grad raises "Expected cotangent type"); jaxprop's
    equals jax.grad of the same exchange written with all_gather."""
    body, reference = ALL_TO_ALL_UNTILED[name]
    with pytest.raises(ValueError, match="Expected cotangent type"):
        jax.grad(outside_loss(body, P("i"), check_vma))(W, X)
    wrap = jax.jit if jit else (lambda f: f)
    expected = wrap(jax.grad(outside_loss(reference, P("i"), check_vma), argnums=(0, 1)))(W, X)
    close(wrap(jaxprop.grad(outside_loss(body, P("i"), check_vma), argnums=(0, 1)))(W, X),
          expected)
