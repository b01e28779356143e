"""Fit Lotka–Volterra parameters through an adaptive Dormand–Prince solver (a lax.while_loop).

    python experiments/ode_fit.py            # jax.jit(jaxprop.value_and_grad(loss)) + optax Adam
    python experiments/ode_fit.py --eager    # the same without jax.jit (the loop runs unrolled)

The model is the predator–prey system

    dx/dt = α x − β x y,    dy/dt = δ x y − γ y,    (x, y)(0) = (1, 1),

with true parameters (α, β, γ, δ) = (1.5, 1, 3, 1). Observations are the true solution at
``--n-obs`` equally spaced times in (0, ``--t-end``], plus Gaussian noise (σ = ``--noise``,
fixed ``--seed``). The fit starts from parameters off by up to ±35 % and trains log(α, β, γ, δ)
with optax Adam (cosine-decayed learning rate) on the mean squared error at the observation
times. Everything runs in float64.

**The solver** is Dormand–Prince 5(4) written in plain JAX: seven stages (the last is the next
step's first, FSAL), the 5th-order solution is propagated, the embedded 4th-order one gives the
error estimate ``err = RMS((y5 − y4) / (atol + rtol · max(|y|, |y5|)))``. A step is accepted
when ``err ≤ 1``, else rejected and retried smaller. Hairer's PI controller sets the next step:
after an accepted step ``h ← h · clip(0.9 · err^−0.17 · err_prev^0.04, 0.2, 10)``, after a
rejected one ``h ← h · max(0.9 · err^−0.2, 0.2)``. The whole solve is ONE
``lax.while_loop`` whose iterations are attempted steps (accepted or rejected), so the trip count
depends on the parameters and is unknown until the loop ends — the case ``jax.grad`` refuses.

**Observation times are hit exactly**: a step that would pass the next observation time is
shortened to end on it (``h_try = min(h, t_obs − t)``), and when such a step is accepted the
state is written into the output buffer (``ys[i] = y``, ``t = t_obs[i]`` exactly). No
interpolation; after a shortened step the next proposal is at least the step the controller had
proposed (the shortening is not a verdict on the error), so steps stay long. The loop
stops after the last observation or after ``--max-steps`` attempts; an unfinished solve leaves
NaN in the output (the buffer starts as NaN), so the loss is NaN and the script stops with an
error instead of fitting a truncated trajectory.

**The gradient** is the exact derivative of this program, step-size controller included (the
step sizes depend on the parameters through ``err``). Three checks at the initial parameters:

1. *scan, same step*: the identical step function in a ``lax.scan`` of the known trip count
   (taken from the forward solve), differentiated by ``jax.grad`` — equal to float rounding;
2. *finite differences*: central differences of the adaptive loss in float64;
3. *replay, frozen steps*: a fixed-grid Dormand–Prince ``lax.scan`` over the accepted step sizes
   (no controller), differentiated by ``jax.grad``. Its forward equals the adaptive solve to
   rounding; its gradient differs by the controller's contribution (the steps held constant),
   which the summary prints (small at tight tolerances). This one is reported, not asserted.

Output: a summary (final parameters vs true, loss, accepted/rejected steps, gradient-check
errors, timings), ``--out``/metrics.json and the figure ``--plot`` (fitted vs true
trajectories with the observations, the loss curve, the accepted step sizes over time).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxprop

TRUE_PARAMS = np.array([1.5, 1.0, 3.0, 1.0])            # α, β, γ, δ
Y0 = np.array([1.0, 1.0])
NAMES = ("alpha", "beta", "gamma", "delta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eager", action="store_true",
                   help="differentiate without jax.jit: the while loop runs eagerly and jaxprop "
                        "unrolls it on its tape (slower; default: jax.jit(jaxprop.value_and_grad))")
    p.add_argument("--steps", type=int, default=200, help="Adam steps")
    p.add_argument("--lr", type=float, default=0.05,
                   help="Adam's initial learning rate on log-parameters (cosine decay to 0)")
    p.add_argument("--t-end", type=float, default=10.0, help="end of the observation window")
    p.add_argument("--n-obs", type=int, default=40, help="number of observation times")
    p.add_argument("--noise", type=float, default=0.1, help="std of the observation noise")
    p.add_argument("--rtol", type=float, default=1e-6, help="solver's relative tolerance")
    p.add_argument("--atol", type=float, default=1e-8, help="solver's absolute tolerance")
    p.add_argument("--h0", type=float, default=0.01, help="first step size tried")
    p.add_argument("--max-steps", type=int, default=4096,
                   help="most attempted steps per solve (an unfinished solve is an error)")
    p.add_argument("--fd-eps", type=float, default=1e-6,
                   help="step of the central finite differences (on log-parameters)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the initial guess")
    p.add_argument("--out", type=Path, default=Path("runs/ode_fit"),
                   help="folder for metrics.json")
    p.add_argument("--plot", type=Path, default=Path("experiments/results/ode_fit.png"),
                   help="where to save the figure")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p.parse_args(argv)


# -- the ODE and one Dormand–Prince step --------------------------------------------------------
def lotka_volterra(params: jax.Array):
    """f(y) = y ⊙ (r + M y) with r = (α, −γ), M = [[0, −β], [δ, 0]]: that is
    (x, y)' = (α x − β x y, δ x y − γ y)."""
    alpha, beta, gamma, delta = params
    r = jnp.stack([alpha, -gamma])
    m = jnp.stack([jnp.stack([0 * beta, -beta]), jnp.stack([delta, 0 * delta])])
    return lambda y: y * (r + m @ y)


# Dormand & Prince (1980): rows of the stage matrix A (row s gives stage s+1's input from
# stages 0..s), 5th-order weights B5 (the 7th stage is f at the 5th-order solution: it is the
# next step's first, FSAL) and the embedded 4th-order weights B4 of the error estimate.
A = [np.array(row) for row in (
    [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656])]
B5 = np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0])
B4 = np.array([5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])


def dopri5(f, y: jax.Array, k1: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Dormand–Prince step of size h from y, given k1 = f(y): the 5th-order solution y5,
    f(y5) (the next step's k1) and the error estimate y5 − y4 = h Σ (B5 − B4)_s k_s."""
    ks = [k1]
    for row in A:
        ks.append(f(y + h * (row @ jnp.stack(ks))))
    y5 = y + h * (B5[:6] @ jnp.stack(ks))
    ks.append(f(y5))
    return y5, ks[6], h * ((B5 - B4) @ jnp.stack(ks))


# -- the adaptive solve: one lax.while_loop over attempted steps ------------------------------
def initial_state(y0: jax.Array, params: jax.Array, n_obs: int, h0: float, history: int) -> dict:
    zero = jnp.zeros((), y0.dtype)
    state = {"t": zero, "y": y0, "k1": lotka_volterra(params)(y0), "h": zero + h0,
             "err_prev": zero + 1e-4, "ys": jnp.full((n_obs, y0.size), jnp.nan, y0.dtype),
             "i": jnp.int32(0), "accepted": jnp.int32(0), "rejected": jnp.int32(0)}
    if history:   # every attempt's t, h, accepted?, shortened?, for the plot and the replay check
        state["hist"] = {"t": jnp.zeros(history, y0.dtype), "h": jnp.zeros(history, y0.dtype),
                         "ok": jnp.zeros(history, bool), "hit": jnp.zeros(history, bool)}
    return state


def attempt(state: dict, params: jax.Array, t_obs: jax.Array, rtol: float, atol: float) -> dict:
    """One attempted step: shorten it to land on the next observation time, estimate the error,
    accept (advance, maybe record the observation) or reject, and pick the next step size."""
    t, y, h, i = state["t"], state["y"], state["h"], state["i"]
    t_next = t_obs[i]
    hit = h >= t_next - t
    h_try = jnp.where(hit, t_next - t, h)
    y5, k7, err_vec = dopri5(lotka_volterra(params), y, state["k1"], h_try)
    scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y5))
    err = jnp.maximum(jnp.sqrt(jnp.mean((err_vec / scale) ** 2)), 1e-10)
    ok = err <= 1.0
    grow = jnp.clip(0.9 * err ** -0.17 * state["err_prev"] ** 0.04, 0.2, 10.0)   # PI controller
    shrink = jnp.maximum(0.9 * err ** -0.2, 0.2)
    record = ok & hit
    new = dict(state,
               t=jnp.where(ok, jnp.where(hit, t_next, t + h_try), t),
               y=jnp.where(ok, y5, y), k1=jnp.where(ok, k7, state["k1"]),
               h=jnp.where(ok, jnp.maximum(h_try * grow, jnp.where(hit, h, 0.0)),
                           h_try * shrink),
               err_prev=jnp.where(ok, jnp.maximum(err, 1e-4), state["err_prev"]),
               ys=state["ys"].at[i].set(jnp.where(record, y5, state["ys"][i])),
               i=i + record.astype(i.dtype),
               accepted=state["accepted"] + ok.astype(i.dtype),
               rejected=state["rejected"] + (~ok).astype(i.dtype))
    if "hist" in state:
        n = state["accepted"] + state["rejected"]
        new["hist"] = {"t": state["hist"]["t"].at[n].set(t),
                       "h": state["hist"]["h"].at[n].set(h_try),
                       "ok": state["hist"]["ok"].at[n].set(ok),
                       "hit": state["hist"]["hit"].at[n].set(hit)}
    return new


def running(state: dict, n_obs: int, max_steps: int) -> jax.Array:
    return (state["i"] < n_obs) & (state["accepted"] + state["rejected"] < max_steps)


def solve(params: jax.Array, t_obs: jax.Array, cfg: argparse.Namespace,
          history: bool = False) -> dict:
    """Integrate from t = 0 to the last observation time; the final loop state (``ys`` holds
    the solution at ``t_obs``)."""
    n_obs = t_obs.shape[0]
    state = initial_state(jnp.asarray(Y0, params.dtype), params, n_obs, cfg.h0,
                          cfg.max_steps if history else 0)
    return lax.while_loop(partial(running, n_obs=n_obs, max_steps=cfg.max_steps),
                          partial(attempt, params=params, t_obs=t_obs, rtol=cfg.rtol,
                                  atol=cfg.atol),
                          state)


def loss(log_params: jax.Array, t_obs: jax.Array, obs: jax.Array, cfg: argparse.Namespace
         ) -> jax.Array:
    """Mean squared error between the solution and the observations at t_obs."""
    return jnp.mean((solve(jnp.exp(log_params), t_obs, cfg)["ys"] - obs) ** 2)


# -- references for the gradient check ---------------------------------------------------------
def loss_scan(log_params, t_obs, obs, cfg, trips: int):
    """The same loss, the same attempt() as a lax.scan of the known trip count (jax.grad can)."""
    params = jnp.exp(log_params)
    state = initial_state(jnp.asarray(Y0, params.dtype), params, t_obs.shape[0], cfg.h0, 0)
    step = partial(attempt, params=params, t_obs=t_obs, rtol=cfg.rtol, atol=cfg.atol)
    state, _ = lax.scan(lambda s, _: (step(s), None), state, length=trips)
    return jnp.mean((state["ys"] - obs) ** 2)


def loss_replay(log_params, obs, hs, hits):
    """Fixed-grid Dormand–Prince over the accepted step sizes hs (constants: no controller);
    the states after the steps flagged in hits are the observations."""
    f = lotka_volterra(jnp.exp(log_params))

    def step(y, h):
        y5, _, _ = dopri5(f, y, f(y), h)
        return y5, y5

    _, ys = lax.scan(step, jnp.asarray(Y0, obs.dtype), hs)
    return jnp.mean((ys[hits] - obs) ** 2)


def central_differences(fun, x: np.ndarray, eps: float) -> np.ndarray:
    """(f(x + eps e_k) − f(x − eps e_k)) / 2eps for each coordinate k."""
    return np.array([(fun(x + eps * e) - fun(x - eps * e)) / (2 * eps) for e in np.eye(x.size)])


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def gradient_checks(grad_fn, loss_fn, history_fn, x: np.ndarray, t_obs, obs, cfg) -> dict:
    """jaxprop's while-loop gradient ``grad_fn`` at x (log-parameters) against the scan rewrite,
    central finite differences of ``loss_fn`` and the frozen-step replay of the steps
    ``history_fn`` takes."""
    sol = history_fn(x)
    trips = int(sol["accepted"] + sol["rejected"])
    _, g = grad_fn(x)
    g_scan = jax.jit(jax.grad(lambda p: loss_scan(p, t_obs, obs, cfg, trips)))(x)
    fd = central_differences(loss_fn, x, cfg.fd_eps)
    ok = np.asarray(sol["hist"]["ok"][:trips])
    hs = jnp.asarray(np.asarray(sol["hist"]["h"][:trips])[ok])
    hits = np.flatnonzero(np.asarray(sol["hist"]["hit"][:trips])[ok])
    replay = jax.jit(jax.value_and_grad(lambda p: loss_replay(p, obs, hs, hits)))
    replay_loss, g_replay = replay(x)
    return {"grad": np.asarray(g).tolist(), "trips": trips,
            "scan_rel_err": rel_err(g, g_scan), "fd_rel_err": rel_err(g, fd),
            "replay_loss_rel_err": rel_err(replay_loss, loss_fn(x)),
            "replay_grad_rel_diff": rel_err(g, g_replay)}


# -- the fit -----------------------------------------------------------------------------------
SCAN_TOL, FD_TOL = 1e-10, 1e-6     # relative errors the gradient checks must stay under


def make_data(args: argparse.Namespace) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """Observation times, noisy observations of the true solution, the initial guess (log)."""
    rng = np.random.default_rng(args.seed)
    t_obs = jnp.linspace(0.0, args.t_end, args.n_obs + 1)[1:]
    clean = jax.jit(lambda p: solve(p, t_obs, args)["ys"])(jnp.asarray(TRUE_PARAMS))
    obs = clean + args.noise * rng.standard_normal(clean.shape)
    x0 = np.log(TRUE_PARAMS) + rng.uniform(-0.3, 0.3, TRUE_PARAMS.size)
    return t_obs, obs, x0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with jax.enable_x64(True):
        return fit(args)


def fit(args: argparse.Namespace) -> dict:
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    t_obs, obs, x0 = make_data(args)
    opt = optax.adam(optax.cosine_decay_schedule(args.lr, max(args.steps, 1)))

    def value_and_grad(x):
        return jaxprop.value_and_grad(loss)(x, t_obs, obs, args)

    loss_fn = jax.jit(lambda p: loss(p, t_obs, obs, args))                  # no gradient
    history_fn = jax.jit(lambda p: solve(jnp.exp(p), t_obs, args, history=True))
    if not args.eager:   # the gradient through the while loop, as one XLA program
        value_and_grad = jax.jit(value_and_grad)

    @jax.jit             # the optimiser step (no gradient in it: jit in both modes)
    def adam_update(x, g, opt_state):
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(x, updates), opt_state

    t0 = time.perf_counter()
    jax.block_until_ready(value_and_grad(x0))
    first_grad_s = time.perf_counter() - t0
    checks = gradient_checks(value_and_grad, loss_fn, history_fn, x0, t_obs, obs, args)
    say(f"gradient checks at the initial guess ({checks['trips']} attempted steps): "
        f"scan {checks['scan_rel_err']:.1e}, finite differences {checks['fd_rel_err']:.1e}")

    x, opt_state, losses = jnp.asarray(x0), opt.init(jnp.asarray(x0)), []
    t0 = time.perf_counter()
    for step in range(args.steps):
        value, g = value_and_grad(x)
        x, opt_state = adam_update(x, g, opt_state)
        losses.append(float(value))
        if not np.isfinite(losses[-1]):
            raise SystemExit(f"loss is {losses[-1]} at step {step}: a solve did not reach "
                             f"t = {args.t_end} within --max-steps {args.max_steps} "
                             "attempts (raise it), or diverged (lower --lr).")
        if step % max(1, args.steps // 10) == 0:
            say(f"step {step:4d}  loss {losses[-1]:.5f}  params "
                + " ".join(f"{v:.3f}" for v in np.exp(np.asarray(x))))
    train_s = time.perf_counter() - t0
    final_loss, sol = float(loss_fn(x)), history_fn(x)
    params = np.exp(np.asarray(x))
    metrics = {
        "mode": "eager" if args.eager else "jit",
        "args": {k: str(v) for k, v in vars(args).items()},
        "true_params": dict(zip(NAMES, TRUE_PARAMS.tolist())),
        "initial_params": dict(zip(NAMES, np.exp(x0).tolist())),
        "fitted_params": dict(zip(NAMES, params.tolist())),
        "max_param_rel_err": float(np.max(np.abs(params - TRUE_PARAMS) / TRUE_PARAMS)),
        "initial_loss": losses[0] if losses else final_loss, "final_loss": final_loss,
        "noise_variance": args.noise ** 2,
        "accepted_steps": int(sol["accepted"]), "rejected_steps": int(sol["rejected"]),
        "checks": checks,
        "checks_pass": checks["scan_rel_err"] < SCAN_TOL and checks["fd_rel_err"] < FD_TOL,
        "first_gradient_s": first_grad_s,
        "seconds_per_step": train_s / max(args.steps, 1), "total_s": 0.0, "losses": losses}
    if not args.no_plot:
        plot(args, t_obs, obs, x0, x, losses, sol)
    metrics["total_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(summary(metrics, args))
    if not metrics["checks_pass"]:
        raise SystemExit("gradient check FAILED (see above)")
    return metrics


def summary(m: dict, args: argparse.Namespace) -> str:
    c = m["checks"]
    rows = [f"ode_fit ({m['mode']}): Lotka–Volterra, {args.n_obs} observations, noise "
            f"{args.noise}, Dormand–Prince 5(4) rtol {args.rtol}, atol {args.atol}",
            "param   true    initial  fitted"]
    rows += [f"{n:6s}  {m['true_params'][n]:.3f}   {m['initial_params'][n]:.3f}    "
             f"{m['fitted_params'][n]:.3f}" for n in NAMES]
    rows += [f"loss {m['initial_loss']:.5f} -> {m['final_loss']:.5f} (noise variance "
             f"{m['noise_variance']:.5f}); largest parameter error {m['max_param_rel_err']:.1%}",
             f"solver at the fit: {m['accepted_steps']} accepted, {m['rejected_steps']} "
             "rejected steps",
             f"gradient vs jax.grad of the scan rewrite (same steps): rel. err "
             f"{c['scan_rel_err']:.1e} ({'ok' if c['scan_rel_err'] < SCAN_TOL else 'FAIL'})",
             f"gradient vs central finite differences: rel. err {c['fd_rel_err']:.1e} "
             f"({'ok' if c['fd_rel_err'] < FD_TOL else 'FAIL'})",
             f"frozen-step replay: loss rel. err {c['replay_loss_rel_err']:.1e}, gradient differs "
             f"by {c['replay_grad_rel_diff']:.1e} (the step-size controller's contribution)",
             f"time: first gradient {m['first_gradient_s']:.2f} s, "
             f"{1e3 * m['seconds_per_step']:.1f} ms per Adam step, total {m['total_s']:.1f} s"]
    return "\n".join(rows)


def plot(args, t_obs, obs, x0, x, losses, sol) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = jnp.linspace(0.0, args.t_end, 400)[1:]
    trajectory = jax.jit(lambda p: solve(p, dense, args)["ys"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, (name, color) in enumerate([("prey x", "tab:blue"), ("predator y", "tab:orange")]):
        ax1.plot(dense, trajectory(jnp.asarray(TRUE_PARAMS))[:, i], "--", color=color, lw=1,
                 label=f"{name}, true")
        ax1.plot(dense, trajectory(jnp.exp(jnp.asarray(x0)))[:, i], ":", color=color, lw=1,
                 alpha=0.6, label=f"{name}, initial guess")
        ax1.plot(dense, trajectory(jnp.exp(x))[:, i], color=color, lw=1.5, label=f"{name}, fitted")
        ax1.plot(t_obs, obs[:, i], "o", color=color, ms=3.5)
    ax1.set(xlabel="t", title="Lotka–Volterra: observations (dots), true, fitted")
    ax1.set_ylim(top=1.4 * float(jnp.max(obs)))
    ax1.legend(fontsize=7, ncol=2, loc="upper left")
    ax2.semilogy(losses, label="loss (MSE)")
    ax2.axhline(args.noise ** 2, color="gray", ls=":", label="noise variance")
    ax2.set(xlabel="Adam step", title="loss (jaxprop gradient through the while loop)")
    ax2.legend(fontsize=8)
    n = int(sol["accepted"] + sol["rejected"])
    t, h, ok, hit = (np.asarray(sol["hist"][k][:n]) for k in ("t", "h", "ok", "hit"))
    free = ok & ~hit
    ax3.semilogy(t[free], h[free], ".-", ms=3, lw=0.8,
                 label=f"accepted, controller's size ({free.sum()})")
    ax3.semilogy(t[ok & hit], h[ok & hit], "o", mfc="none", ms=3.5, color="gray",
                 label=f"accepted, shortened to an observation time ({(ok & hit).sum()})")
    ax3.semilogy(t[~ok], h[~ok], "x", color="tab:red", label=f"rejected ({(~ok).sum()})")
    ax3.set(xlabel="t (start of the step)", ylabel="step size h",
            title="Dormand–Prince steps at the fitted parameters")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
