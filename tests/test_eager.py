"""The eager fast paths: a compiled sweep per tape structure, deferred custom JVPs, and jitted
calls dispatched through JAX's C++ path. Each must give jax.grad's gradient on every call —
the first (per node), and the later ones (compiled) — and keep user Python where it belongs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop import eager
from jaxprop.api import _trace

CALLS = eager.WARMUP + 2  # enough calls of one structure to reach the compiled sweep


def normal(*shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def mlp_loss(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return jax.nn.logsumexp(x @ w + b, axis=-1).mean() + jax.nn.softplus(x).sum()


def mlp_params(sizes=(5, 7, 3)):
    keys = jax.random.split(jax.random.PRNGKey(1), len(sizes))
    return [(jax.random.normal(k, (m, n)), jnp.zeros(n) + 0.1)
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def assert_close(a, b, rtol=2e-6, atol=1e-6):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def sweeps(kind):
    return eager.STATS[kind]


def test_compiled_sweep_matches_jax_on_every_call():
    params, x = mlp_params(), normal(4, 5)
    expected = jax.grad(mlp_loss)(params, x)
    before = sweeps("compiled")
    for _ in range(CALLS):
        assert_close(jaxprop.grad(mlp_loss)(params, x), expected)
    assert sweeps("compiled") - before >= CALLS - eager.WARMUP


def test_new_values_same_structure_reuse_the_compiled_sweep():
    params = mlp_params()
    for i in range(CALLS):
        x = normal(4, 5, seed=i)
        assert_close(jaxprop.grad(mlp_loss)(params, x), jax.grad(mlp_loss)(params, x))
    before = sweeps("compiled")
    x = normal(4, 5, seed=99)
    assert_close(jaxprop.grad(mlp_loss)(params, x), jax.grad(mlp_loss)(params, x))
    assert sweeps("compiled") == before + 1


def test_vjp_fn_reused_with_several_cotangents():
    x = normal(3, 4)
    f = lambda x: jnp.tanh(x) @ x.T  # noqa: E731
    _, jax_fn = jax.vjp(f, x)
    _, fn = jaxprop.vjp(f, x)
    for i in range(CALLS):
        ct = normal(3, 3, seed=i)
        assert_close(fn(ct), jax_fn(ct))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def powered(x, power):
    return x ** power


@powered.defjvp
def _powered_jvp(power, primals, tangents):
    (x,), (t,) = primals, tangents
    return x ** power, power * x ** (power - 1) * t


def test_custom_jvp_static_arguments_are_part_of_the_structure():
    """A compiled sweep for power=2 must not be reused for power=3: the deferred JVP's key
    includes the custom_jvp function's static arguments."""
    x = normal(4) + 2.0
    for power in (2.0, 3.0, 2.0, 3.0):
        for _ in range(CALLS):
            got = jaxprop.grad(lambda x: powered(x, power).sum())(x)
            np.testing.assert_allclose(got, power * x ** (power - 1), rtol=1e-6)


def test_closure_over_a_python_value_changes_the_structure():
    x = normal(4)
    for scale in (1.0, 2.0, 1.0, 5.0):
        for _ in range(CALLS):
            got = jaxprop.grad(lambda x: jnp.sum(jnp.sin(x * scale)))(x)
            np.testing.assert_allclose(got, scale * jnp.cos(x * scale), rtol=1e-6)


def test_custom_vjp_bwd_runs_on_every_sweep():
    """custom_vjp's bwd is user Python: its node keeps the sweep per node."""
    calls = []

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    def fwd(x):
        return jnp.sin(x), jnp.cos(x)

    def bwd(c, ct):
        calls.append(1)
        return (2.0 * c * ct,)

    f.defvjp(fwd, bwd)
    x = normal(3)
    for _ in range(CALLS):
        np.testing.assert_allclose(jaxprop.grad(lambda x: f(x).sum())(x), 2 * jnp.cos(x),
                                   rtol=1e-6)
    assert len(calls) == CALLS


def test_hooks_run_on_every_sweep():
    seen = []

    def record(ct):
        seen.append(np.asarray(ct))
        return ct

    x = normal(3)
    for _ in range(CALLS):
        jaxprop.grad(lambda x: jnp.sum(jaxprop.hook(jnp.sin(x), record) ** 2))(x)
    assert len(seen) == CALLS
    np.testing.assert_allclose(seen[-1], 2 * jnp.sin(x), rtol=1e-6)


def test_module_level_hook_is_not_compiled_away():
    """Even a hook function with a stable identity (same structure each call) runs each time."""
    x = normal(3)
    before = len(_HOOK_CALLS)
    for _ in range(CALLS):
        jaxprop.grad(lambda x: jnp.sum(jaxprop.hook(jnp.sin(x), _count_hook)))(x)
    assert len(_HOOK_CALLS) - before == CALLS


_HOOK_CALLS: list[int] = []


def _count_hook(ct):
    _HOOK_CALLS.append(1)
    return ct


def test_while_loop_eager_falls_back_or_compiles_correctly():
    def f(x):
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1]) * 1.5),
                              (0, x))[1].sum()

    def unrolled(x):
        for _ in range(3):
            x = jnp.sin(x) * 1.5
        return x.sum()

    x = normal(3)
    for _ in range(CALLS):
        assert_close(jaxprop.grad(f)(x), jax.grad(unrolled)(x))


def test_scan_eager_compiled_sweep():
    def f(w, xs):
        return lax.scan(lambda h, x: (jnp.tanh(h @ w + x), h.sum()), jnp.zeros(3), xs)[0].sum()

    w, xs = normal(3, 3), normal(5, 3, seed=1)
    for _ in range(CALLS):
        assert_close(jaxprop.grad(f)(w, xs), jax.grad(f)(w, xs))


def test_inlining_and_overrides_keep_the_sweep_per_node():
    x = normal(3)
    f = lambda x: jnp.sum(jnp.sin(x))  # noqa: E731
    for _ in range(CALLS):
        jaxprop.grad(f)(x)
    before = sweeps("compiled")
    with jaxprop.inlining():
        assert_close(jaxprop.grad(f)(x), jax.grad(f)(x))
    with jaxprop.override("sin", lambda node, cts: [cts[0] * 3.0]):
        np.testing.assert_allclose(jaxprop.grad(f)(x), jnp.full(3, 3.0))
    assert sweeps("compiled") == before


def test_second_order_and_jit_are_unaffected():
    params, x = mlp_params(), normal(4, 5)
    for _ in range(CALLS):
        h = jaxprop.grad(lambda x: jnp.sum(jaxprop.grad(mlp_loss, argnums=1)(params, x) ** 2))
        j = jax.grad(lambda x: jnp.sum(jax.grad(mlp_loss, argnums=1)(params, x) ** 2))
        assert_close(h(x), j(x), rtol=2e-5, atol=1e-5)
        assert_close(jax.jit(jaxprop.grad(mlp_loss))(params, x), jax.grad(mlp_loss)(params, x))


def test_tape_skeletons_compare_by_structure():
    params = mlp_params()
    tapes = [_trace(mlp_loss, (params, normal(4, 5, seed=s)), False)[1].args[0]
             for s in (0, 1)]
    a, b = (t.skeleton() for t in tapes)
    assert a is not b and a == b and hash(a) == hash(b)
    assert jax.tree_util.tree_structure(tapes[0]) == jax.tree_util.tree_structure(tapes[1])
    sliced = _trace(lambda p, x: mlp_loss(p, x[:2]), (params, normal(4, 5)), False)[1]
    assert sliced.args[0].skeleton() != a  # one more primitive
    unhashable = _trace(lambda x: jnp.sum(x), (normal(2),), False)[1].args[0]
    unhashable.nodes[0].params = dict(unhashable.nodes[0].params, extra=[1])
    unhashable._skeleton = None
    assert unhashable.skeleton().key is None


@pytest.mark.parametrize("donate", [False, True])
def test_user_jit_with_donation_inside_eager_grad(donate):
    """Donation must not free an input the tape still holds for the sweep (it did before)."""
    g = jax.jit(lambda a, b: jnp.sin(a) * b, donate_argnums=(1,) if donate else ())
    x = normal(3)
    for _ in range(CALLS):
        got = jaxprop.grad(lambda x: jnp.sum(g(x, x * 2.0)))(x)
        want = jax.grad(lambda x: jnp.sum(jnp.sin(x) * x * 2.0))(x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_user_jit_with_compiler_options_inside_eager_grad():
    """A jitted call with options beyond the plain jit goes through JAX's ordinary bind."""
    g = jax.jit(lambda a: jnp.sin(a) * a, compiler_options={"xla_cpu_enable_fast_math": False},
                donate_argnums=0)
    x = normal(3)
    for _ in range(CALLS):
        got = jaxprop.grad(lambda x: jnp.sum(g(x * 1.0)))(x)
        want = jax.grad(lambda x: jnp.sum(jnp.sin(x) * x))(x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_eager_scan_body_defined_inside_the_loss_is_traced_once():
    """A scan body that is a fresh closure each call is one cached forward per structure."""
    from jaxprop.rules import control

    def loss(w, xs):
        def cell(h, x):  # a new function object every call, as in most models
            return jnp.tanh(h @ w + x), jnp.sum(h * x)
        h, ys = lax.scan(cell, jnp.zeros(4), xs)
        return h.sum() + ys.sum()

    w = normal(4, 4)
    loss(w, normal(6, 4))  # JAX's own tracing caches warm
    before = len(control._FORWARDS)
    for i in range(CALLS):
        xs = normal(6, 4, seed=i)
        assert_close(jaxprop.grad(loss)(w, xs), jax.grad(loss)(w, xs), rtol=1e-5)
    assert len(control._FORWARDS) == before + 1


def test_eager_scan_closing_over_python_constants():
    w, xs = normal(3, 3), normal(5, 3, seed=1)
    for scale in (0.5, 2.0, 0.5, 3.0):
        def loss(w, xs):
            step = lambda h, x: (jnp.sin(h @ w * scale + x), None)  # noqa: E731
            return lax.scan(step, jnp.ones(3), xs)[0].sum()
        for _ in range(CALLS):
            assert_close(jaxprop.grad(loss)(w, xs), jax.grad(loss)(w, xs), rtol=1e-5)


def test_jaxpr_keys_are_structural():
    from jaxprop import _jax

    def body(scale):
        return jax.make_jaxpr(lambda x, y: jnp.sin(x * scale) @ y)(normal(2, 2), normal(2, 2))

    assert body(2.0) is not body(2.0)
    assert _jax.jaxpr_key(body(2.0)) == _jax.jaxpr_key(body(2.0))
    assert _jax.jaxpr_key(body(2.0)) != _jax.jaxpr_key(body(3.0))
    other = jax.make_jaxpr(lambda x, y: jnp.cos(x * 2.0) @ y)(normal(2, 2), normal(2, 2))
    assert _jax.jaxpr_key(other) != _jax.jaxpr_key(body(2.0))


def test_per_example_gradients_under_eager_vmap_compile_the_sweep():
    """vmap over eager code still runs op by op: the sweep is compiled (and batched) there too,
    and jitted helpers dispatch as one node on batched values."""
    params = mlp_params()
    xs = normal(6, 4, 5)
    per_example = lambda g: jax.vmap(g(mlp_loss), in_axes=(None, 0))  # noqa: E731
    expected = per_example(jax.grad)(params, xs)
    before = sweeps("compiled")
    for _ in range(CALLS):
        assert_close(per_example(jaxprop.grad)(params, xs), expected, rtol=1e-5)
    assert sweeps("compiled") > before


def test_tapes_over_max_nodes_stay_per_node(monkeypatch):
    """A tape longer than eager.MAX_NODES (an eagerly unrolled long loop) is never compiled:
    every sweep runs per node, and still equals jax.grad."""
    params, x = mlp_params(), normal(4, 5)
    expected = jax.grad(mlp_loss)(params, x)
    monkeypatch.setattr(eager, "MAX_NODES", 1)
    before = sweeps("compiled"), sweeps("per_node")
    for _ in range(CALLS):
        assert_close(jaxprop.grad(mlp_loss)(params, x), expected)
    assert sweeps("compiled") == before[0] and sweeps("per_node") == before[1] + CALLS
