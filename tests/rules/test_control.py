"""Control flow: scan, cond/switch, while, remat2 and pass-through primitives vs jax.vjp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.extend.core import jaxprs_in_params

import jaxprop
from jaxprop.testing import check_vjp

RNG = np.random.default_rng(0)


def normal(*shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(RNG.normal(size=shape) * scale, dtype)


def assert_tree_close(a, b, rtol=2e-5, atol=2e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


def check_transforms(f, *args, batched=0):
    """jit(grad f) and vmap(grad f) (over args[batched]) equal JAX's."""
    assert_tree_close(jax.jit(jaxprop.grad(f))(*args), jax.grad(f)(*args))
    stacked = jnp.stack([args[batched], 0.5 * args[batched], -args[batched]])
    axes = tuple(0 if i == batched else None for i in range(len(args)))
    assert_tree_close(jax.vmap(jaxprop.grad(f, argnums=batched), axes)(*args[:batched], stacked,
                                                                       *args[batched + 1:]),
                      jax.vmap(jax.grad(f, argnums=batched), axes)(*args[:batched], stacked,
                                                                   *args[batched + 1:]))


# -- scan ---------------------------------------------------------------------------------
def rnn(W, h0, xs, reverse=False):
    """Tuple carry with an int counter, ys mixing the two."""
    def body(carry, x):
        h, k = carry
        h = jnp.tanh(W @ h + x)
        return (h, k + 1), h * k.astype(h.dtype)
    (h, k), ys = lax.scan(body, (h0, 0), xs, reverse=reverse)
    return h, ys, k


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_rnn(reverse):
    W, h0, xs = normal(3, 3, scale=0.5), normal(3), normal(5, 3)
    check_vjp(lambda *a: rnn(*a, reverse=reverse), W, h0, xs, order=2)
    if reverse:
        check_vjp(jax.jit(lambda *a: rnn(*a, reverse=reverse)), W, h0, xs, order=2)


def test_scan_x64(x64):
    W, h0, xs = (np.asarray(RNG.normal(size=s)) for s in [(3, 3), (3,), (4, 3)])
    check_vjp(lambda *a: rnn(*a)[:2], W * 0.5, h0, xs, order=2, finite_differences=True)


def test_scan_bfloat16():
    W, h0, xs = normal(2, 2, dtype=jnp.bfloat16), normal(2, dtype=jnp.bfloat16), \
        normal(3, 2, dtype=jnp.bfloat16)
    check_vjp(rnn, W, h0, xs, rtol=5e-2, atol=5e-2)


def test_scan_carry_becomes_differentiated():
    """A carry that starts constant depends on w after one step (fixpoint over carries)."""
    def f(w, xs):
        def body(c, x):
            a, b = c
            return (b * w, a + x), a
        return lax.scan(body, (jnp.float32(1.0), jnp.float32(0.0)), xs)
    check_vjp(f, jnp.float32(0.9), normal(5), order=2)


def test_scan_consts_mixed():
    """Differentiated and constant consts, an int const, and an undifferentiated xs."""
    c_const, n = normal(3), jnp.int32(2)
    mask = jnp.asarray(RNG.normal(size=(4, 3)) > 0, jnp.float32)

    def f(w, xs):
        def body(c, x):
            x_, mask = x
            return jnp.sin(c * w + c_const) * n + x_ * mask, c * w
        return lax.scan(body, jnp.ones(3), (xs, mask))
    check_vjp(f, normal(3), normal(4, 3), order=2)


def test_scan_order3_and_static_fori():
    check_vjp(lambda x: lax.fori_loop(0, 4, lambda i, c: jnp.sin(c) * x + i, x),
              jnp.float32(0.4), order=3)


def test_lax_map_and_xs_only():
    xs, w = normal(4, 3), normal(3)
    check_vjp(lambda x, w: lax.map(lambda r: jnp.sin(r) * w, x), xs, w, order=2)


def test_nested_scan():
    def f(w, xs):
        def outer(c, x):
            def inner(d, y):
                return jnp.cos(d * y * w), d
            d, ds = lax.scan(inner, c, x)
            return d + c, ds
        return lax.scan(outer, jnp.float32(0.5), xs)
    check_vjp(f, jnp.float32(0.8), normal(3, 4), order=2)


@pytest.mark.parametrize("length", [0, 1, 3])
def test_scan_lengths_and_no_xs(length):
    check_vjp(lambda c: lax.scan(lambda c, _: (c * 2.0, c), c, None, length=length),
              normal(2), order=2)
    check_vjp(lambda c, xs: lax.scan(lambda c, x: (c * x, c), c, xs),
              normal(2), normal(length, 2), order=2)


def test_scan_unroll_and_ys_independent_of_inputs():
    def f(c, xs):
        return lax.scan(lambda c, x: (jnp.sin(c * x), (c, jnp.ones(2))), c, xs, unroll=2)
    check_vjp(f, normal(2), normal(5, 2), order=2)


def test_scan_under_jit_and_vmap():
    W, xs = normal(3, 3, scale=0.5), normal(4, 3)
    check_transforms(lambda W, xs: jnp.sum(rnn(W, jnp.ones(3), xs)[1] ** 2), W, xs)
    check_transforms(lambda W, xs: jnp.sum(rnn(W, jnp.ones(3), xs)[1] ** 2), W, xs, batched=1)


def test_scan_keeps_step_residuals_and_hoists_invariants():
    """The stacked residuals are per-step arrays (leading dim T); W is kept once, not T times."""
    T = 6
    W, h0, xs = normal(3, 3), normal(3), normal(T, 3)
    _, pullback = jaxprop.vjp(lambda W: rnn(W, h0, xs)[1], W)
    (node,) = [n for n in pullback.args[0].nodes if n.name == "scan"]
    stacked, fixed = node.residuals
    assert stacked and all(a.shape[0] == T for a in stacked)
    assert len(stacked) <= 3          # h before and after the step, k: not W·h, W·h + x, ys
    assert not any(a.shape == (T, 3, 3) for a in stacked)          # W is not stacked
    assert any(np.shape(a) == (3, 3) for a in jax.tree_util.tree_leaves(fixed))


def test_scan_hoists_loop_invariant_work():
    """W.T and 2·W read only consts: computed once outside the loop, never stacked."""
    T = 5

    def f(W, xs):
        def body(h, x):
            h = jnp.tanh(h @ W.T + x) * jnp.sum(2.0 * W)
            return h, h
        return lax.scan(body, jnp.ones(3), xs)
    W, xs = normal(3, 3, scale=0.3), normal(T, 3)
    check_vjp(f, W, xs, order=2)
    _, pullback = jaxprop.vjp(f, W, xs)
    nodes = pullback.args[0].nodes
    assert [n.name for n in nodes].index("scan") > [n.name for n in nodes].index("transpose")
    (scan_node,) = [n for n in nodes if n.name == "scan"]
    assert not any(np.ndim(a) == 3 for a in scan_node.residuals[0])     # no (T, 3, 3)
    eff = lambda W, xs: lax.scan(lambda c, x: (c + x * jnp.sin(W), jax.debug.print("")), 0.0, xs)
    check_vjp(eff, jnp.float32(0.5), normal(2))        # effects stay in the loop


# -- cond / switch --------------------------------------------------------------------------
def branchy(x, y):
    return lax.cond(x.sum() > 0, lambda a, b: (jnp.sin(a) * b, 1),
                    lambda a, b: (a * 2.0, 2), x, y)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cond(sign):
    x, y = sign * jnp.array([0.3, 0.2]), jnp.float32(1.5)
    check_vjp(branchy, x, y, order=2)
    check_vjp(jax.jit(branchy), x, y, order=2)
    check_transforms(lambda x, y: jnp.sum(branchy(x, y)[0]), x, y)


def switch3(i, x, w):
    return lax.switch(i, [jnp.sin, lambda v: jnp.cos(v) * w, lambda v: v * v], x)


@pytest.mark.parametrize("index", [-1, 1, 5])
def test_switch(index):
    """Out-of-range indices clamp, as in lax.switch."""
    check_vjp(lambda x, w: switch3(index, x, w), normal(3), jnp.float32(0.7), order=2)


def test_switch_traced_index():
    check_vjp(lambda x, w: jax.jit(switch3)(1, x, w), normal(3), jnp.float32(0.7), order=2)


def test_switch_batched_index():
    def f(i, x):
        return jnp.sum(lax.switch(i, [jnp.sin, jnp.cos, jnp.tanh], x * 2.0))
    idx, x = jnp.array([0, 1, 2, 1]), normal(4, 3)
    assert_tree_close(jax.vmap(jaxprop.grad(f, argnums=1))(idx, x),
                      jax.vmap(jax.grad(f, argnums=1))(idx, x))


def test_traced_cond_saves_residuals_instead_of_recomputing():
    """exp's rule reads its output: saved by the forward switch, exp is not evaluated again."""
    f = lambda x: jnp.sum(lax.cond(x.sum() > 0, jnp.exp, lambda v: v * 2.0, x))
    x = normal(3)
    jaxpr = str(jax.make_jaxpr(jaxprop.grad(f))(x))
    assert jaxpr.count("exp ") == 1 and jaxpr.count("cond[") == 2
    assert_tree_close(jax.jit(jaxprop.grad(f))(x), jax.grad(f)(x))


def test_cond_inside_scan():
    def f(w, xs):
        def body(c, x):
            c = lax.cond(x > 0, lambda c: jnp.sin(c * w), lambda c: c * x, c)
            return c, c
        return lax.scan(body, jnp.float32(0.5), xs)
    check_vjp(f, jnp.float32(1.3), normal(6), order=2)


# -- while ----------------------------------------------------------------------------------
def while_sin(x):
    body = lambda c: (jnp.sin(c[0]) * 1.5, c[1] + 1)
    return lax.while_loop(lambda c: c[1] < 4, body, (x, 0))[0]


def unrolled_sin(x):
    for _ in range(4):
        x = jnp.sin(x) * 1.5
    return x


def test_while_eager_matches_unrolled():
    """JAX has no reverse rule for while; jaxprop's equals JAX on the unrolled loop."""
    x = jnp.array([0.3, -0.2, 1.1])
    assert_tree_close(jaxprop.jacrev(while_sin)(x), jax.jacrev(unrolled_sin)(x))
    assert_tree_close(jaxprop.hessian(lambda x: while_sin(x).sum())(x),
                      jax.hessian(lambda x: unrolled_sin(x).sum())(x))


def test_fori_dynamic_bounds_eager():
    def f(x, n):
        return lax.fori_loop(0, n, lambda i, c: c * x + jnp.sin(c), jnp.ones_like(x)).sum()
    x = normal(3)
    unrolled = lambda x: f(x, 3)  # static bounds: a scan, which JAX can differentiate
    assert_tree_close(jaxprop.grad(f)(x, jnp.int32(3)), jax.grad(unrolled)(x))
    assert_tree_close(jaxprop.hessian(f)(x, jnp.int32(3)), jax.hessian(unrolled)(x))


def test_while_under_jit_and_vmap_is_differentiated():
    """A traced trip count (jit, vmap) is reversed from checkpoints (tests/rules/test_loops.py
    has the rest); the gradient equals JAX's on the loop with its trip count known."""
    f = lambda x, n: lax.fori_loop(0, n, lambda i, c: c * x, jnp.ones_like(x)).sum()
    x = normal(2)
    assert_tree_close(jax.jit(jaxprop.grad(f))(x, 3), jax.grad(lambda x: f(x, 3))(x))
    doubling = lambda x: lax.while_loop(lambda c: c < 10.0, lambda c: c * 2.0, x)
    assert_tree_close(jax.vmap(jaxprop.grad(doubling))(jnp.array([1.0, 3.0])),
                      jnp.array([16.0, 4.0]))


def test_while_under_jit_differentiated_only_in_predicate():
    """Only the predicate reads x: no gradient flows through the loop, so it just runs."""
    def f(x):
        n = lax.while_loop(lambda i: i.astype(x.dtype) < x, lambda i: i + 1, 0)
        return x * n.astype(x.dtype)
    assert_tree_close(jax.jit(jaxprop.grad(f))(jnp.float32(2.5)), 3.0)


# -- remat2 (jax.checkpoint) ----------------------------------------------------------------
POLICIES = [None, jax.checkpoint_policies.nothing_saveable,
            jax.checkpoint_policies.dots_saveable,
            jax.checkpoint_policies.everything_saveable,
            jax.checkpoint_policies.save_only_these_names("inner"),
            jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=["inner"], names_which_can_be_offloaded=[],
                offload_src="device", offload_dst="pinned_host")]


def block(W, x):
    return jnp.tanh(W @ checkpoint_name(jnp.sin(W @ x), "inner"))


@pytest.mark.parametrize("policy", POLICIES)
def test_remat(policy):
    W, x = normal(3, 3), normal(3)
    f = lambda W, x: jax.checkpoint(block, policy=policy)(W, jax.checkpoint(block)(W, x))
    check_vjp(f, W, x, order=2)
    check_vjp(jax.jit(f), W, x, order=2)
    if policy is None:
        check_transforms(lambda W, x: jnp.sum(f(W, x) ** 2), W, x, batched=1)


def _dots(f, *args):
    """How many dot_generals the program of ``f`` runs (nested programs included)."""
    def count(jaxpr):
        return sum((e.primitive.name == "dot_general")
                   + sum(count(sub) for sub in jaxprs_in_params(e.params)) for e in jaxpr.eqns)
    return count(jax.make_jaxpr(f)(*args).jaxpr)


@pytest.mark.parametrize("policy,saves_dots", [
    (jax.checkpoint_policies.dots_saveable, True),
    (jax.checkpoint_policies.everything_saveable, True),
    (jax.checkpoint_policies.nothing_saveable, False),
    (jax.checkpoint_policies.save_only_these_names("inner"), False)])
def test_remat_policy_decides_what_is_recomputed(policy, saves_dots):
    """jaxprop's backward recomputes what jax.grad's does: saved dots are not run again."""
    W, x = normal(8, 8), normal(8, 4)
    loss = lambda W, x: jnp.sum(jax.checkpoint(block, policy=policy)(W, x) ** 2)  # noqa: E731
    ours = _dots(jaxprop.value_and_grad(loss), W, x)
    assert ours == _dots(jax.value_and_grad(loss), W, x)
    plain = lambda W, x: jnp.sum(jax.checkpoint(block)(W, x) ** 2)  # noqa: E731
    recomputed = _dots(jaxprop.value_and_grad(plain), W, x)
    assert (ours < recomputed) if saves_dots else (ours == recomputed)


def test_remat_saves_fewer_residuals():
    W, x = normal(4, 4), normal(4)
    deep = lambda W, x: block(W, block(W, block(W, x)))

    def saved(f):
        _, pullback = jaxprop.vjp(f, W, x)
        tape = pullback.args[0]
        return len(tape.nodes), sum(np.size(a) for a in jax.tree_util.tree_leaves(tape))

    nodes_plain, size_plain = saved(deep)
    nodes_remat, size_remat = saved(jax.checkpoint(deep))
    assert nodes_remat == 1 < nodes_plain
    assert size_remat < size_plain
    assert_tree_close(jaxprop.grad(lambda W: jax.checkpoint(deep)(W, x).sum())(W),
                      jax.grad(lambda W: deep(W, x).sum())(W))


def test_remat_inside_scan():
    def f(W, xs):
        body = jax.checkpoint(lambda c, x: (jnp.tanh(W @ c + x), c.sum()))
        return lax.scan(body, jnp.ones(3), xs)
    check_vjp(f, normal(3, 3), normal(4, 3), order=2)


# -- pass-through -------------------------------------------------------------------------
def test_passthrough_primitives(capsys):
    def f(x):
        jax.debug.print("x={x}", x=x)
        jax.debug.callback(lambda v: None, x)
        a, k = lax.optimization_barrier((checkpoint_name(x * 2.0, "a"), 3))
        return jnp.sin(jax.device_put(a)) * k
    x = normal(3)
    check_vjp(f, x, order=2)
    check_vjp(jax.jit(f), x, order=2)
    assert "x=" in capsys.readouterr().out


def test_closed_call_and_nested_jit():
    inner = jax.jit(lambda x, w: jnp.sin(x * w))
    check_vjp(lambda x, w: jax.jit(lambda x: inner(x, w) * inner(w, x))(x), normal(3),
              jnp.float32(0.3), order=2)


def test_pure_callback_has_no_rule():
    f = lambda x: jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct((), jnp.float32), x)
    with pytest.raises(NotImplementedError, match="pure_callback"):
        jaxprop.grad(f)(jnp.float32(1.0))


def test_pullback_returned_from_jit():
    """Scan, cond and remat nodes are pytrees of arrays: the pullback crosses jit boundaries."""
    W, h0, xs = normal(3, 3, scale=0.5), normal(3), normal(5, 3)
    f = lambda W: (rnn(W, h0, xs)[1], branchy(W[0], 2.0)[0], jax.checkpoint(block)(W, h0))
    out, pullback = jax.jit(lambda W: jaxprop.vjp(f, W))(W)
    ct = jax.tree_util.tree_map(jnp.ones_like, out)
    expected = jax.vjp(f, W)[1](ct)
    assert_tree_close(pullback(ct), expected)
    assert_tree_close(jax.jit(lambda pb, ct: pb(ct))(pullback, ct), expected)
