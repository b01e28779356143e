"""Explicit and Auto meshes on 8 simulated CPU devices: jaxprop.grad gives jax.grad's values
AND shardings (data parallel, FSDP with reshard, tensor parallel with out_sharding, ops that
make new arrays), nested jit(in_shardings=, out_shardings=) keeps jax.grad's placement and
collective count, and one gradient runs on several meshes and on one device.

Run by tests/test_mesh.py in a subprocess (8 devices need XLA_FLAGS before JAX starts).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxprop

SIZES = [16, 32, 32, 8]


def rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def init(sizes=SIZES):
    return [(rand((a, b), i) / np.sqrt(a), rand((b,), 10 + i) * 0.1)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]


def mlp(params, x, y):
    """Softmax cross-entropy of a tanh MLP (the main job's model, small)."""
    h = x
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    w, b = params[-1]
    logits = h @ w + b
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(logits * y, -1))


X, Y = rand((32, SIZES[0]), 20), jax.nn.one_hot(np.arange(32) % SIZES[-1], SIZES[-1])


def mesh(shape, names, kind):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def same_as_jax(f, *args, jit):
    """jaxprop.grad(f) equals jax.grad(f): values and the sharding of every leaf."""
    transform = jax.jit if jit else (lambda g: g)
    expected = transform(jax.grad(f))(*args)
    got = transform(jaxprop.grad(f))(*args)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-6)
        assert g.sharding == e.sharding, (g.sharding, e.sharding)
        assert jax.typeof(g).sharding == jax.typeof(e).sharding
    return got


KINDS = [AxisType.Explicit, AxisType.Auto]
# eager variants that dispatch op by op on 8 devices are slow on 2 cores: run with -m slow
JIT_OR_SLOW_EAGER = [pytest.param(False, marks=pytest.mark.slow), True]


@pytest.mark.parametrize("jit", JIT_OR_SLOW_EAGER)
@pytest.mark.parametrize("kind", KINDS)
def test_data_parallel(kind, jit):
    with jax.set_mesh(mesh((8,), ("data",), kind)):
        params = jax.device_put(init(), P())
        grads = same_as_jax(mlp, params, jax.device_put(X, P("data")),
                            jax.device_put(Y, P("data")), jit=jit)
    # and the single-device gradient
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(mlp)(init(), X, Y))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp(kind, jit):
    """Parameters sharded over 'data', gathered before use (reshard / a constraint)."""
    gather = ((lambda w: jax.sharding.reshard(w, P())) if kind == AxisType.Explicit
              else (lambda w: jax.lax.with_sharding_constraint(w, P())))

    def loss(params, x, y):
        return mlp([(gather(w), gather(b)) for w, b in params], x, y)

    with jax.set_mesh(mesh((8,), ("data",), kind)):
        params = [(jax.device_put(w, P("data")), jax.device_put(b, P("data")))
                  for w, b in init()]
        grads = same_as_jax(loss, params, jax.device_put(X, P("data")),
                            jax.device_put(Y, P("data")), jit=jit)
        if kind == AxisType.Explicit:
            assert all(jax.typeof(g).sharding.spec[0] == "data" for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("jit", JIT_OR_SLOW_EAGER)
def test_tensor_parallel_out_sharding(jit):
    """Megatron-style 2-D mesh; the matmuls say their output sharding (JAX asks for it)."""
    def loss(params, x, y):
        (w1, b1), (w2, b2), (w3, b3) = params
        h = jnp.tanh(jnp.matmul(x, w1, out_sharding=P("data", "model")) + b1)
        h = jnp.tanh(jnp.matmul(h, w2, out_sharding=P("data", None)) + b2)
        return mlp([(w3, b3)], h, y)

    with jax.set_mesh(mesh((2, 4), ("data", "model"), AxisType.Explicit)):
        (w1, b1), (w2, b2), (w3, b3) = init()
        params = [(jax.device_put(w1, P(None, "model")), jax.device_put(b1, P("model"))),
                  (jax.device_put(w2, P("model", None)), jax.device_put(b2, P())),
                  (jax.device_put(w3, P()), jax.device_put(b3, P()))]
        same_as_jax(loss, params, jax.device_put(X, P("data")), jax.device_put(Y, P("data")),
                    jit=jit)


@pytest.mark.parametrize("jit", JIT_OR_SLOW_EAGER)
def test_new_arrays_say_their_sharding(jit):
    """Rules that make arrays (zeros of unused inputs, broadcasts, reductions, casts, iota,
    einsum with batch axes) under an Explicit mesh give JAX's shardings."""
    def loss(w, v, unused, x):
        z = (jnp.zeros_like(w) + w) * jnp.arange(w.shape[1], dtype=w.dtype)
        s = jnp.sum(z, axis=0) + jnp.mean(x, axis=0).sum()
        t = jnp.broadcast_to(s, (4,) + s.shape).astype(jnp.bfloat16).astype(jnp.float32)
        e = jnp.einsum("bi,bij->bj", x[:, :4], v)
        return jnp.sum(t * 2.0) + jnp.sum(jnp.einsum("bi,ij->bj", x, w) ** 2) + jnp.sum(e ** 2)

    with jax.set_mesh(mesh((2, 4), ("data", "model"), AxisType.Explicit)):
        w = jax.device_put(rand((16, 8), 1), P(None, "model"))
        v = jax.device_put(rand((32, 4, 8), 2), P("data", None, "model"))
        unused = jax.device_put(rand((8, 8), 3), P("data", "model"))
        x = jax.device_put(X, P("data"))
        g, e = jaxprop.grad(loss, argnums=(0, 1, 2)), jax.grad(loss, argnums=(0, 1, 2))
        g, e = (jax.jit(g), jax.jit(e)) if jit else (g, e)
        for a, b in zip(g(w, v, unused, x), e(w, v, unused, x)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
            assert a.sharding == b.sharding, (a.sharding, b.sharding)


def _scan_rnn(w, x):
    w = jax.sharding.reshard(w, P())
    h0 = jnp.zeros((x.shape[0], 8), out_sharding=P("data", None))
    h, ys = jax.lax.scan(lambda h, xt: (jnp.tanh(h @ w + xt), jnp.sum(h ** 2)), h0,
                         jnp.swapaxes(x, 0, 1))
    return jnp.sum(h) + jnp.sum(ys)


PROGRAMS = {  # w: (8, 8) P(None, 'model'); x: (16, 6, 8) P('data')
    "scan_rnn": _scan_rnn,
    "embedding": lambda w, x: jnp.sum(
        w.at[jnp.argmax(x, -1)].get(out_sharding=P("data", None, "model")) ** 2),
    "attention": lambda w, x: jnp.sum(jax.nn.softmax(jnp.einsum(
        "bti,bsi->bts", x @ w, x @ w, out_sharding=P("data", None, None)), -1)),
    "conv": lambda w, x: jnp.sum(jax.lax.conv_general_dilated(
        x, jnp.stack([w, w, w]), (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"),
        out_sharding=P("data", None, "model")) ** 2),
    "max_pool": lambda w, x: jnp.sum(jax.lax.reduce_window(
        x @ w, -jnp.inf, jax.lax.max, (1, 2, 1), (1, 2, 1), "VALID")),
    "cond": lambda w, x: jax.lax.cond(jnp.sum(x) > 0, lambda: jnp.sum((x @ w) ** 2),
                                      lambda: jnp.sum(x @ w)),
    "layernorm_remat": lambda w, x: jnp.sum(jax.checkpoint(lambda w, x: jnp.sin(
        ((x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)) @ w))(
        w, x)),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_programs_on_a_2d_explicit_mesh(name):
    with jax.set_mesh(mesh((2, 4), ("data", "model"), AxisType.Explicit)):
        w = jax.device_put(rand((8, 8), 0), P(None, "model"))
        x = jax.device_put(rand((16, 6, 8), 1), P("data"))
        same_as_jax(PROGRAMS[name], w, x, jit=True)


def collectives(compiled_text):
    return {op: len(re.findall(op + r"(-start)?\(", compiled_text))
            for op in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute",
                       "all-to-all")}


def test_nested_jit_keeps_in_and_out_shardings():
    """jit(f, in_shardings=, out_shardings=) inside the loss: the gradient (and an SGD step
    built on it) has jax.grad's shardings and the compiled step its collectives."""
    m = mesh((8,), ("data",), AxisType.Auto)
    rep, row, col = (NamedSharding(m, P()), NamedSharding(m, P("data")),
                     NamedSharding(m, P(None, "data")))
    layer = jax.jit(lambda w, x: jnp.tanh(x @ w), in_shardings=(rep, row), out_shardings=row)

    def loss(ws, x):
        for w in ws:
            x = layer(w, x)
        return jnp.mean(x ** 2)

    ws = [jax.device_put(rand((64, 64), i) / 8, col) for i in range(3)]
    x = jax.device_put(rand((64, 64), 9), row)
    results = {}
    for grad in (jax.grad, jaxprop.grad):
        step = jax.jit(lambda ws, x, grad=grad: (
            lambda gs: ([w - 0.1 * g for w, g in zip(ws, gs)], gs))(grad(loss)(ws, x)))
        new, gs = step(ws, x)
        results[grad] = (gs, new, collectives(step.lower(ws, x).compile().as_text()))
    (e_g, e_new, e_ops), (g, new, ops) = results[jax.grad], results[jaxprop.grad]
    for a, b in zip(g + new, e_g + e_new):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
        assert a.sharding.spec == b.sharding.spec, (a.sharding, b.sharding)
    assert [a.sharding.spec for a in g] == [P()] * 3
    assert ops == e_ops, (ops, e_ops)


def test_one_gradient_on_several_meshes_and_one_device():
    """Nothing jaxprop caches is tied to the mesh current at the first gradient."""
    grad = jax.jit(jaxprop.grad(mlp))
    expected = jax.grad(mlp)(init(), X, Y)
    for shape, names in (((8,), ("data",)), ((4,), ("data",)), ((2, 4), ("data", "model"))):
        devices = jax.devices()[:int(np.prod(shape))]
        m = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names),
                          devices=devices)
        with jax.set_mesh(m):
            args = (jax.device_put(init(), P()), jax.device_put(X, P("data")),
                    jax.device_put(Y, P("data")))
            for a, b in zip(jax.tree.leaves(grad(*args)), jax.tree.leaves(expected)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    for got in (grad(init(), X, Y), jaxprop.grad(mlp)(init(), X, Y)):  # one device again
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_errors_as_jax():
    """A contraction over sharded axes without out_sharding fails in the forward, as in JAX."""
    with jax.set_mesh(mesh((8,), ("data",), AxisType.Explicit)):
        w = jax.device_put(rand((16, 4), 0), P("data"))
        x = jax.device_put(X, P(None, "data"))
        f = lambda w: jnp.sum(x @ w)
        for grad in (jax.grad, jaxprop.grad):
            with pytest.raises(Exception, match="ambiguous"):
                grad(f)(w)
