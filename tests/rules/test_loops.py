"""Reverse mode through while loops with traced trip counts, and scans on a memory budget:
gradients equal jax.grad of the same loop written with its known trip count (a scan)."""

from math import comb

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop.checkpointing import recomputed_steps, step_counts


def assert_tree_close(got, want, tol=2e-5):
    """Same pytree structure, leaves equal to float32 rounding."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=tol, atol=tol)


def normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def run_for(body, init, trip_count):
    """The reference: ``body`` applied ``trip_count`` times, as a scan JAX differentiates."""
    return lax.scan(lambda c, _: (body(c), None), init, None, length=trip_count)[0]


def trips(cond, body, init):
    """The trip count of ``while cond: carry = body(carry)``, run eagerly."""
    n, carry = 0, init
    while bool(cond(carry)):
        carry, n = body(carry), n + 1
    return n


# -- a loop whose trip count the data decides, with a mixed pytree carry -------------------
def mixed_body(w):
    def body(c):
        i, done, x, y = c["i"], c["done"], c["x"], c["y"]
        x = jnp.tanh(x @ w) + 0.1 * y
        return dict(i=i + 1, done=done | (jnp.abs(x).sum() > 1e6), x=x,
                    y=y * jnp.float16(0.5).astype(y.dtype) + x[0])
    return body


def mixed_loss(w, x0, n):
    init = dict(i=jnp.int32(0), done=jnp.bool_(False), x=x0, y=jnp.float32(0.3))
    cond = lambda c: (c["i"] < n) & ~c["done"]
    out = lax.while_loop(cond, mixed_body(w), init)
    return (out["x"] ** 2).sum() + out["y"] + out["i"].astype(jnp.float32)


def mixed_reference(w, x0, n):
    init = dict(i=jnp.int32(0), done=jnp.bool_(False), x=x0, y=jnp.float32(0.3))
    out = run_for(mixed_body(w), init, n)
    return (out["x"] ** 2).sum() + out["y"] + out["i"].astype(jnp.float32)


def test_while_under_jit_matches_scan():
    """Trip counts 0, 1, C, C+1 and many times C, one compiled program; every argument
    differentiated; the backward re-evaluates the steps the Python schedule says."""
    w, x0 = normal(3, 3) * 0.7, normal(3, seed=1)
    with jaxprop.checkpoints(4), step_counts() as counts:
        grad = jax.jit(jaxprop.grad(mixed_loss, argnums=(0, 1)))
        for trip_count in (0, 1, 4, 5, 37):
            want = jax.grad(mixed_reference, argnums=(0, 1))(w, x0, trip_count)
            assert_tree_close(grad(w, x0, trip_count), want)
        jax.effects_barrier()
    assert counts == [{"trip_count": t, "recomputed": recomputed_steps(t, 4)}
                      for t in (0, 1, 4, 5, 37)]


@pytest.mark.slow
def test_ten_thousand_steps():
    w, x0 = normal(3, 3) * 0.7, normal(3, seed=1)
    with jaxprop.checkpoints(12):
        got = jax.jit(jaxprop.grad(mixed_loss, argnums=(0, 1)))(w, x0, 10_000)
    assert_tree_close(got, jax.grad(mixed_reference, argnums=(0, 1))(w, x0, 10_000), tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_recomputation_count_matches_schedule(n):
    """The compiled backward re-evaluates exactly the steps the Python schedule says, for
    budgets down to one carry; a loop that fits in its budget re-evaluates none."""
    f = lambda x, n_: lax.fori_loop(0, n_, lambda i, c: jnp.sin(c) * x, x).sum()
    grad = jax.jit(jaxprop.grad(f))
    trip_counts = (3, 8, 9, 100, 250)
    with jaxprop.checkpoints(n), step_counts() as counts:
        for t in trip_counts:
            assert_tree_close(grad(jnp.float32(0.9), t),
                              jax.grad(lambda x: f(x, t))(jnp.float32(0.9)))
        jax.effects_barrier()
    assert [c["recomputed"] for c in counts] == [recomputed_steps(t, n) for t in trip_counts]
    assert all(c["recomputed"] == 0 for c, t in zip(counts, trip_counts) if t <= n)


def revolve_recomputations(trip_count, n):
    """The fewest steps an *offline* schedule (trip count known in advance, Griewank's
    revolve) re-evaluates with one slot for x_0 and n − 1 more: r·T − binom(n+r, r−1) − T,
    r the least with binom(n−1+r, n−1) ≥ T."""
    r = 0
    while comb(n - 1 + r, n - 1) < trip_count:
        r += 1
    return r * trip_count - comb(n + r - 1, r - 1) - trip_count


@pytest.mark.parametrize("trip_count,n", [(30, 4), (200, 4), (1000, 10), (3000, 10),
                                          (1000, 32), (10000, 32)])
def test_online_schedule_is_close_to_offline_optimum(trip_count, n):
    """Not knowing T costs at most 40% more recomputation than revolve, which knows it."""
    assert recomputed_steps(trip_count, n) <= 1.4 * revolve_recomputations(trip_count, n)
    assert recomputed_steps(n, n) == 0 and recomputed_steps(n + 1, n) <= n


def test_data_dependent_stop_and_closure():
    """Stop when the value says so (Newton-like), with the body closing over x."""
    def f(x):
        return lax.while_loop(lambda c: c[0] < 50.0, lambda c: (c[0] * x + c[1], c[1] * 0.9),
                              (jnp.float32(1.0), x))[0]
    x = jnp.float32(1.7)
    n = trips(lambda c: c[0] < 50.0, lambda c: (c[0] * x + c[1], c[1] * 0.9), (1.0, x))
    ref = lambda x: run_for(lambda c: (c[0] * x + c[1], c[1] * 0.9), (jnp.float32(1.0), x), n)[0]
    with jaxprop.checkpoints(3):
        assert_tree_close(jax.jit(jaxprop.grad(f))(x), jax.grad(ref)(x))


# -- vmap: elements stop at different steps --------------------------------------------------
def doubling_body(c):
    return jnp.sin(c[0]) + c[0], c[1] * 2.0 + c[0]


def doubling(x):
    return lax.while_loop(lambda c: c[1] < 10.0, doubling_body, (x, x))[0]


def doubling_reference(x):
    n = trips(lambda c: c[1] < 10.0, doubling_body, (x, x))
    return run_for(doubling_body, (x, x), n)[0]


def test_vmap_of_grad_and_grad_of_vmap():
    xs = jnp.array([0.2, 1.0, 3.0, 12.0])
    want = jnp.stack([jax.grad(doubling_reference)(x) for x in xs])
    with jaxprop.checkpoints(2):
        assert_tree_close(jax.jit(jax.vmap(jaxprop.grad(doubling)))(xs), want)
        assert_tree_close(jax.jit(jaxprop.grad(lambda xs: jax.vmap(doubling)(xs).sum()))(xs),
                          want)


# -- nesting -----------------------------------------------------------------------------------
def test_nested_while_loops():
    def f(x, n, m):
        inner = lambda c: lax.fori_loop(0, m, lambda j, d: jnp.sin(d) * x + 0.1, c)
        return lax.fori_loop(0, n, lambda i, c: inner(c) * 0.9, x).sum()
    x = normal(2)
    ref = lambda x: f(x, 5, 3)  # static bounds: scans
    with jaxprop.checkpoints(2):
        got = jax.jit(jaxprop.grad(f))(x, 5, 3)
    assert_tree_close(got, jax.grad(ref)(x))


def test_scan_and_cond_and_checkpoint_inside_while():
    def body(x, c):
        c = lax.scan(lambda h, w: (jnp.tanh(h * w + x), None), c, jnp.arange(1.0, 4.0) * 0.3)[0]
        c = lax.cond(c.sum() > 0, lambda c: c * 1.1, lambda c: jnp.cos(c), c)
        return jax.checkpoint(lambda c: jnp.sin(c) * x)(c)
    f = lambda x, n: lax.fori_loop(0, n, lambda i, c: body(x, c), x).sum()
    x = normal(3)
    with jaxprop.checkpoints(3):
        got = jax.jit(jaxprop.grad(f))(x, 7)
    assert_tree_close(got, jax.grad(lambda x: f(x, 7))(x))


def test_while_inside_scan_and_cond():
    def f(x, n):
        def step(c, w):
            c = lax.fori_loop(0, n, lambda i, d: jnp.sin(d * w) + x, c)
            return lax.cond(w > 0.5, lambda c: c * 2.0, lambda c: c, c), c.sum()
        c, ys = lax.scan(step, x, jnp.array([0.2, 0.7, 0.4]))
        return c.sum() + ys.sum()
    x = normal(2)
    with jaxprop.checkpoints(2):
        got = jax.jit(jaxprop.grad(f))(x, 3)
    assert_tree_close(got, jax.grad(lambda x: f(x, 3))(x))


# -- memory ------------------------------------------------------------------------------------
def temp_bytes(fun, *args):
    return jax.jit(fun).lower(*args).compile().memory_analysis().temp_size_in_bytes


W32, X32 = jnp.eye(32) * 0.5, jnp.ones((4, 32))


def loss_while(w, n):
    body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ w))
    return lax.while_loop(lambda c: c[0] < n, body, (0, X32))[1].sum()


def loss_scan(w, n):
    return lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), X32).sum()


def test_memory_stays_flat_as_trip_count_grows():
    """10 → 10⁵ steps: the while loop's compiled temp memory stays the same; jax.grad of the
    scan form grows with the trip count."""
    memory = {}
    for n in (10, 100_000):
        memory["while", n] = temp_bytes(jaxprop.grad(lambda w: loss_while(w, n)), W32)
        memory["scan", n] = temp_bytes(jax.grad(lambda w: loss_scan(w, n)), W32)
    assert memory["while", 100_000] <= 1.05 * memory["while", 10]
    assert memory["scan", 100_000] > 1000 * memory["scan", 10]


@pytest.mark.slow
def test_scan_budget_memory():
    """A 10⁵-step scan under checkpoints(8, scans=True) needs what a 10-step one does."""
    with jaxprop.checkpoints(8, scans=True):
        budgeted = temp_bytes(jaxprop.grad(lambda w: loss_scan(w, 100_000)), W32)
    assert budgeted <= 2 * temp_bytes(jax.grad(lambda w: loss_scan(w, 10)), W32)


# -- second order ----------------------------------------------------------------------------
@pytest.mark.slow
def test_second_order_through_while():
    f = lambda x, n: lax.fori_loop(0, n, lambda i, c: jnp.sin(c) * x + c * 0.5, x)
    x, n = jnp.float32(0.8), 6
    with jaxprop.checkpoints(2):
        got = jax.jit(jaxprop.grad(jaxprop.grad(f)))(x, n)
    assert_tree_close(got, jax.grad(jax.grad(lambda x: f(x, n)))(x))


# -- scans on a memory budget ------------------------------------------------------------------
def rnn(params, xs):
    w, u = params
    def step(h, x):
        h = jnp.tanh(h @ w + x @ u)
        return h, (h ** 2).sum()
    h, ys = lax.scan(step, jnp.zeros(w.shape[0]), xs)
    return h.sum() + ys.sum()


@pytest.mark.parametrize("reverse", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_scan_with_checkpoint_budget(reverse):
    params, xs = (normal(4, 4) * 0.5, normal(3, 4, seed=2)), normal(30, 3, seed=3)
    f = lambda p, xs: rnn(p, xs[::-1]) if not reverse else jnp.sum(lax.scan(
        lambda h, x: (jnp.tanh(h @ p[0] + x @ p[1]), h.sum()), jnp.zeros(4), xs,
        reverse=True)[1])
    with jaxprop.checkpoints(4, scans=True), step_counts() as counts:
        got = jax.jit(jaxprop.grad(f, argnums=(0, 1)))(params, xs)
        jax.effects_barrier()
    assert_tree_close(got, jax.grad(f, argnums=(0, 1))(params, xs))
    assert counts and counts[0]["recomputed"] == recomputed_steps(30, 4)


@pytest.mark.slow
def test_scan_budget_without_xs_reversed():
    """A scan with no xs, stacking ys, run in reverse, under a budget."""
    def f(x):
        carry, ys = lax.scan(lambda c, _: (jnp.sin(c) * x, c ** 2), x, None, length=9,
                             reverse=True)
        return carry.sum() + (ys * jnp.arange(9.0)[:, None]).sum()
    x = normal(2)
    with jaxprop.checkpoints(2, scans=True):
        assert_tree_close(jax.jit(jaxprop.grad(f))(x), jax.grad(f)(x))
