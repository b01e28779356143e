"""Decompositions and solves (cholesky, triangular_solve, lu, qr, eigh, svd, eig,
tridiagonal_solve, custom_linear_solve) against jax.vjp at orders 1 and 2."""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest
from jax import lax

import jaxprop
from jaxprop.registry import registered
from jaxprop.testing import check_vjp

RNG = np.random.default_rng(0)
TOL = {jnp.dtype("float32"): 2e-3, jnp.dtype("float64"): 1e-9,
       jnp.dtype("complex64"): 2e-3, jnp.dtype("complex128"): 1e-9}
needs_complex = pytest.mark.skipif(
    not {"conj", "real", "imag", "complex"} <= registered(),
    reason="complex elementwise rules (conj/real/imag/complex) are not registered yet")


@pytest.fixture(params=["float32", pytest.param("float64", marks=pytest.mark.slow)])
def dtype(request):
    """float32, and float64 under x64 (slow: test_float64 covers every rule once)."""
    if request.param == "float64":
        request.getfixturevalue("x64")
    return jnp.dtype(request.param)


@pytest.fixture(params=["complex64", pytest.param("complex128", marks=pytest.mark.slow)])
def cdtype(request):
    if request.param == "complex128":
        request.getfixturevalue("x64")
    return jnp.dtype(request.param)


def check(f, *args, order=(1, 2), tol=None):
    tol = tol or TOL[jnp.result_type(args[0])]
    for k in order:
        check_vjp(f, *args, order=k, rtol=tol, atol=tol)


def normal(*shape, dtype="float32"):
    x = RNG.normal(size=shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * RNG.normal(size=shape)
    return jnp.asarray(x, dtype)


def spd(n, batch=(), dtype="float32"):
    """A @ Aᴴ + n I: symmetric (Hermitian) positive definite, well conditioned."""
    a = np.asarray(normal(*batch, n, n, dtype=dtype))
    return jnp.asarray(a @ np.conj(np.swapaxes(a, -1, -2)) + n * np.eye(n), dtype)


def triangular(n, lower, batch=(), dtype="float32"):
    a = np.asarray(normal(*batch, n, n, dtype=dtype)) + 3 * np.eye(n)
    return jnp.asarray(np.tril(a) if lower else np.triu(a), dtype)


def distinct_spectrum(n, dtype="float32"):
    """Q diag(1, 2, …, n) Qᵀ: symmetric with well-separated eigenvalues."""
    q, _ = np.linalg.qr(RNG.normal(size=(n, n)))
    return jnp.asarray(q @ np.diag(np.arange(1.0, n + 1)) @ q.T, dtype)


# -- triangular_solve -------------------------------------------------------------------------
FLAGS = [(True, True, False, False), (False, False, True, False), (True, False, False, True),
         (False, True, True, True)]
ALL_FLAGS = [(ls, lo, t, u) for ls in (True, False) for lo in (True, False)
             for t in (False, True) for u in (False, True)]


@pytest.mark.parametrize("left_side,lower,transpose_a,unit_diagonal", FLAGS + [
    pytest.param(*f, marks=pytest.mark.slow) for f in ALL_FLAGS if f not in FLAGS])
def test_triangular_solve_flags(dtype, left_side, lower, transpose_a, unit_diagonal):
    a = triangular(3, lower, dtype=dtype)
    b = normal(3, 2, dtype=dtype) if left_side else normal(2, 3, dtype=dtype)
    check(lambda a, b: lax.linalg.triangular_solve(
        a, b, left_side=left_side, lower=lower, transpose_a=transpose_a,
        unit_diagonal=unit_diagonal), a, b)


@pytest.mark.slow
def test_triangular_solve_batched_and_vector():
    dtype = jnp.float32
    a, b = triangular(4, True, batch=(2,), dtype=dtype), normal(2, 4, 3, dtype=dtype)
    check(lambda a, b: lax.linalg.triangular_solve(a, b, left_side=True, lower=True), a, b)
    a1, v = triangular(3, False, dtype=dtype), normal(3, dtype=dtype)
    check(lambda a, v: jsl.solve_triangular(a, v, lower=False, trans="T"), a1, v)


def test_triangular_solve_reads_only_its_triangle():
    """The garbage triangle gets a zero cotangent (JAX masks it too)."""
    a = triangular(3, True) + jnp.triu(jnp.ones((3, 3)), 1) * 7.0
    b = normal(3, 2)
    check(lambda a, b: lax.linalg.triangular_solve(a, b, left_side=True, lower=True), a, b)
    g = jaxprop.grad(lambda a: lax.linalg.triangular_solve(a, b, left_side=True,
                                                           lower=True).sum())(a)
    assert np.all(np.triu(np.asarray(g), 1) == 0)


@needs_complex
@pytest.mark.parametrize("transpose_a,conjugate_a", [
    (False, False), (True, True), pytest.param(True, False, marks=pytest.mark.slow),
    pytest.param(False, True, marks=pytest.mark.slow)])
def test_triangular_solve_complex(cdtype, transpose_a, conjugate_a):
    a, b = triangular(3, True, dtype=cdtype), normal(3, 2, dtype=cdtype)
    check(lambda a, b: lax.linalg.triangular_solve(
        a, b, left_side=True, lower=True, transpose_a=transpose_a, conjugate_a=conjugate_a),
        a, b)


# -- cholesky ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,batch", [(3, ()), pytest.param(1, (), marks=pytest.mark.slow),
                                     pytest.param(3, (2,), marks=pytest.mark.slow)])
def test_cholesky(dtype, n, batch):
    check(jnp.linalg.cholesky, spd(n, batch, dtype=dtype))


def test_cholesky_unsymmetrized_primitive(dtype):
    """The primitive alone: JAX's cotangent is not symmetrised, and neither is ours."""
    check(lambda a: lax.linalg.cholesky(a, symmetrize_input=False), spd(3, dtype=dtype))


@pytest.mark.slow
def test_cholesky_then_solve(dtype):
    a, b = spd(4, dtype=dtype), normal(4, 2, dtype=dtype)
    check(lambda a, b: jsl.cho_solve(jsl.cho_factor(a, lower=True), b), a, b)


def nonfinite_like_jax(f, *args):
    """Where JAX's gradient is inf/nan (singular input), ours is too, and finite entries agree."""
    ours = np.asarray(jaxprop.grad(f)(*args), np.float64)
    theirs = np.asarray(jax.grad(f)(*args), np.float64)
    assert not np.isfinite(theirs).all()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    ok = np.isfinite(theirs)
    np.testing.assert_allclose(ours[ok], theirs[ok], rtol=1e-4, atol=1e-5)


def test_cholesky_not_positive_definite_gives_nan_like_jax():
    nonfinite_like_jax(lambda a: jnp.linalg.cholesky(a).sum(), -spd(3))


def test_singular_solve_and_lu_like_jax():
    a = jnp.asarray([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 1.0, 1.0]])
    nonfinite_like_jax(lambda a: jnp.linalg.solve(a, jnp.ones(3)).sum(), a)
    nonfinite_like_jax(lambda a: jnp.sum(lax.linalg.lu(a)[0] ** 2), a)


@needs_complex
def test_cholesky_complex(cdtype):
    check(jnp.linalg.cholesky, spd(3, dtype=cdtype))


# -- lu, solve, inverse, determinants -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 3), pytest.param((2, 3, 3), marks=pytest.mark.slow),
                                   pytest.param((4, 3), marks=pytest.mark.slow),
                                   pytest.param((3, 4), marks=pytest.mark.slow)])
def test_lu_packed_output(dtype, shape):
    """lax.linalg.lu: (lu, pivots, permutation); the integer outputs get float0 cotangents."""
    check(lax.linalg.lu, normal(*shape, dtype=dtype))


def test_lu_non_square():
    check(lax.linalg.lu, normal(4, 3))


@pytest.mark.slow
def test_lu_wide():
    check(lax.linalg.lu, normal(3, 4))


@pytest.mark.slow
def test_lu_scipy_factors(dtype):
    check(jsl.lu, normal(3, 3, dtype=dtype))
    check(jsl.lu_factor, normal(3, 3, dtype=dtype))


def test_solve_and_inverse(dtype):
    a, b = normal(3, 3, dtype=dtype) + 3 * jnp.eye(3, dtype=dtype), normal(3, dtype=dtype)
    check(jnp.linalg.solve, a, b)
    check(jnp.linalg.inv, a)


@pytest.mark.slow
def test_solve_and_inverse_batched(dtype):
    a = normal(3, 3, dtype=dtype) + 3 * jnp.eye(3, dtype=dtype)
    check(jnp.linalg.solve, a, normal(3, 2, dtype=dtype))
    check(jnp.linalg.inv, spd(3, (2,), dtype=dtype))


@pytest.mark.slow
def test_lu_solve(dtype):
    a, b = normal(3, 3, dtype=dtype) + 3 * jnp.eye(3, dtype=dtype), normal(3, 2, dtype=dtype)
    check(lambda a, b: jsl.lu_solve(jsl.lu_factor(a), b), a, b)


def test_det_slogdet(dtype):
    a = normal(3, 3, dtype=dtype) + 2 * jnp.eye(3, dtype=dtype)
    check(jnp.linalg.det, a)
    check(lambda a: jnp.linalg.slogdet(a), a)


def test_det_singular_matches_jax(dtype):
    """det of a singular matrix: JAX's custom rule gives finite values; we follow it."""
    a = jnp.asarray([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, 1.0, 0.0]], dtype)
    check(jnp.linalg.det, a, order=(1,))


@pytest.mark.parametrize("ord_", [2, "nuc", pytest.param("fro", marks=pytest.mark.slow),
                                  pytest.param(-2, marks=pytest.mark.slow),
                                  pytest.param(1, marks=pytest.mark.slow)])
def test_matrix_norms(ord_):
    check(lambda a: jnp.linalg.norm(a, ord_), normal(4, 3))


@pytest.mark.slow
def test_pinv_lstsq_matrix_power(dtype):
    a, b = normal(4, 3, dtype=dtype), normal(4, dtype=dtype)
    check(jnp.linalg.pinv, a)
    check(lambda a, b: jnp.linalg.lstsq(a, b)[0], a, b)
    check(lambda a: jnp.linalg.matrix_power(a, -2), spd(3, dtype=dtype))


def test_custom_linear_solve_user_defined():
    dtype = jnp.float32
    """A user's custom_linear_solve: non-symmetric, with a transpose_solve, wrt A and b."""
    def f(a, b):
        matvec = lambda x: a @ x
        solve = lambda _, y: jnp.linalg.solve(lax.stop_gradient(a), y)
        tsolve = lambda _, y: jnp.linalg.solve(lax.stop_gradient(a).T, y)
        return lax.custom_linear_solve(matvec, b, solve, tsolve)
    a, b = normal(3, 3, dtype=dtype) + 3 * jnp.eye(3, dtype=dtype), normal(3, dtype=dtype)
    check(f, a, b)


@pytest.mark.slow
def test_custom_linear_solve_symmetric_with_aux(dtype):
    def f(a, b):
        matvec = lambda x: a @ x
        solve = lambda _, y: (jnp.linalg.solve(lax.stop_gradient(a), y), jnp.sum(y))
        x, aux = lax.custom_linear_solve(matvec, b, solve, symmetric=True, has_aux=True)
        return x * 2.0, aux
    a, b = spd(3, dtype=dtype), normal(3, dtype=dtype)
    check(lambda a, b: f(a, b)[0], a, b)


def test_conjugate_gradient_through_while_loop():
    """cg's solve is a while loop, but custom_linear_solve makes it differentiable."""
    a, b = spd(3), normal(3)
    f = lambda a, b: jax.scipy.sparse.linalg.cg(lambda x: a @ x, b, tol=1e-10)[0]
    check(f, a, b, tol=1e-2)


def test_solve_under_jit_and_vmap():
    a, b = spd(3, (2,)), normal(2, 3)
    loss = lambda a, b: jnp.sum(jnp.linalg.solve(a, b) ** 2)
    np.testing.assert_allclose(jax.jit(jaxprop.grad(loss))(a[0], b[0]),
                               jax.grad(loss)(a[0], b[0]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(jaxprop.grad(loss))(a, b), jax.vmap(jax.grad(loss))(a, b),
                               rtol=1e-4, atol=1e-5)


# -- eigh -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, pytest.param(1, marks=pytest.mark.slow),
                               pytest.param(2, marks=pytest.mark.slow)])
def test_eigh(dtype, n):
    check(jnp.linalg.eigh, distinct_spectrum(n, dtype))


def test_eigh_outputs_separately():
    a = distinct_spectrum(3, "float32")
    check(lambda a: jnp.linalg.eigh(a)[0], a)
    check(lambda a: jnp.linalg.eigh(a)[1], a)
    check(jnp.linalg.eigvalsh, a)


@pytest.mark.slow
def test_eigh_batched_and_upper(dtype):
    a = jnp.stack([distinct_spectrum(3, dtype), 2 * distinct_spectrum(3, dtype)])
    check(jnp.linalg.eigh, a)
    check(lambda a: jnp.linalg.eigh(a, UPLO="U"), a)


def test_eigh_degenerate_eigenvalues():
    """Repeated eigenvalues: eigenvalue gradients are finite; eigenvector ones are not (JAX)."""
    a = jnp.eye(3)
    check(jnp.linalg.eigvalsh, a)
    loss = lambda a: jnp.sum(jnp.linalg.eigh(a)[1])
    ours, theirs = np.asarray(jaxprop.grad(loss)(a)), np.asarray(jax.grad(loss)(a))
    assert not np.isfinite(theirs).all()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))


@needs_complex
def test_eigh_complex(cdtype):
    q, _ = np.linalg.qr(np.asarray(normal(3, 3, dtype=cdtype)))
    a = jnp.asarray(q @ np.diag([1.0, 2.0, 4.0]) @ q.conj().T, cdtype)
    check(lambda a: jnp.linalg.eigvalsh(a), a)
    # eigenvector phases are arbitrary: test a phase-invariant function of them
    check(lambda a: jnp.abs(jnp.linalg.eigh(a)[1]) ** 2, a)


# -- svd ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3), (3, 4), pytest.param((3, 3), marks=pytest.mark.slow),
                                   pytest.param((2, 4, 3), marks=pytest.mark.slow)])
def test_svd(dtype, shape):
    check(lambda a: jnp.linalg.svd(a, full_matrices=False), normal(*shape, dtype=dtype))


@pytest.mark.parametrize("shape", [(4, 3), pytest.param((3, 4), marks=pytest.mark.slow)])
def test_singular_values_only(shape):
    check(lambda a: jnp.linalg.svd(a, compute_uv=False), normal(*shape))


def test_svd_full_matrices():
    check(lambda a: jnp.linalg.svd(a, full_matrices=True), normal(3, 3))
    a = normal(4, 3)
    full = lambda a: jnp.linalg.svd(a, full_matrices=True)
    with pytest.raises(NotImplementedError):
        jax.vjp(full, a)[1](jax.tree.map(jnp.ones_like, full(a)))
    with pytest.raises(NotImplementedError):
        jaxprop.vjp(full, a)[1](jax.tree.map(jnp.ones_like, full(a)))


def test_svd_rank_deficient_singular_values():
    """Singular values of a rank-1 matrix: finite gradients (zero s handled as in JAX)."""
    u, v = normal(4, 1), normal(1, 3)
    check(lambda a: jnp.linalg.svd(a, compute_uv=False), u @ v, order=(1,))


@needs_complex
def test_svd_complex(cdtype):
    check(lambda a: jnp.linalg.svd(a, compute_uv=False), normal(4, 3, dtype=cdtype))


# -- qr -------------------------------------------------------------------------------------------
QR_CASES = [("reduced", (4, 3)), ("reduced", (3, 4)), ("complete", (4, 3))]
QR_MORE = [(m, s) for m in ("reduced", "complete", "r") for s in [(3, 3), (4, 3), (3, 4), (2, 4, 3)]
           if (m, s) not in QR_CASES]


@pytest.mark.parametrize("mode,shape", QR_CASES + [pytest.param(*c, marks=pytest.mark.slow)
                                                   for c in QR_MORE])
def test_qr(mode, shape):
    check(lambda a: jnp.linalg.qr(a, mode=mode), normal(*shape))


@pytest.mark.slow
def test_qr_float64(x64):
    check(jnp.linalg.qr, normal(3, 3, dtype="float64"))
    check(lambda a: jnp.linalg.qr(a, mode="complete"), normal(4, 3, dtype="float64"),
          order=(1,))


def test_qr_pivoting():
    check(lambda a: jsl.qr(a, pivoting=True, mode="economic")[:2], normal(4, 3))


@needs_complex
@pytest.mark.parametrize("shape", [(4, 3), pytest.param((3, 3), marks=pytest.mark.slow),
                                   pytest.param((3, 4), marks=pytest.mark.slow)])
def test_qr_complex(cdtype, shape):
    check(lambda a: jnp.linalg.qr(a), normal(*shape, dtype=cdtype))


# -- eig (non-symmetric) ------------------------------------------------------------------------
@needs_complex
def test_eigvals(dtype):
    """Order 1 only: JAX's second derivative needs eigenvector derivatives (it raises)."""
    a = normal(3, 3, dtype=dtype) + jnp.diag(jnp.asarray([0.0, 3.0, 6.0], dtype))
    check(jnp.linalg.eigvals, a, order=(1,))


@needs_complex
def test_eig_vectors_opt_in(dtype):
    a = normal(3, 3, dtype=dtype) + jnp.diag(jnp.asarray([0.0, 3.0, 6.0], dtype))
    f = lambda a: lax.linalg.eig(a, compute_left_eigenvectors=False, enable_eigvec_derivs=True)
    check(f, a)
    g = lambda a: lax.linalg.eig(a, compute_left_eigenvectors=True, enable_eigvec_derivs=True)
    check(g, a, order=(1,))


def test_eig_vectors_without_opt_in_raises():
    a = normal(3, 3)
    f = lambda a: jnp.linalg.eig(a)[1]
    with pytest.raises(NotImplementedError):
        jaxprop.vjp(f, a)[1](jnp.ones((3, 3), jnp.complex64))


# -- tridiagonal_solve ----------------------------------------------------------------------------
@pytest.mark.slow  # test_float64 covers the rule in the default run
@pytest.mark.parametrize("n,k,batch", [(4, 2, ()), pytest.param(1, 1, (), marks=pytest.mark.slow),
                                       pytest.param(5, 3, (2,), marks=pytest.mark.slow)])
def test_tridiagonal_solve(dtype, n, k, batch):
    dl, du = normal(*batch, n, dtype=dtype), normal(*batch, n, dtype=dtype)
    d = normal(*batch, n, dtype=dtype) + 5
    b = normal(*batch, n, k, dtype=dtype)
    check(lax.linalg.tridiagonal_solve, dl, d, du, b)


# -- float64: every rule once, orders 1 and 2 (the dtype-parametrised sweeps are slow) ----------
F64_CASES = {
    "triangular_solve": (lambda a, b: lax.linalg.triangular_solve(a, b, left_side=True, lower=True,
                                                                  transpose_a=True),
                         lambda: (triangular(3, True, dtype="float64"), normal(3, 2, dtype="float64"))),
    "cholesky": (jnp.linalg.cholesky, lambda: (spd(3, dtype="float64"),)),
    "lu": (lax.linalg.lu, lambda: (normal(3, 3, dtype="float64"),)),
    "custom_linear_solve": (jnp.linalg.solve, lambda: (spd(3, dtype="float64"),
                                                      normal(3, dtype="float64"))),
    "eigh": (jnp.linalg.eigh, lambda: (distinct_spectrum(3, "float64"),)),
    "svd": (lambda a: jnp.linalg.svd(a, full_matrices=False), lambda: (normal(4, 3, dtype="float64"),)),
    "qr": (jnp.linalg.qr, lambda: (normal(4, 3, dtype="float64"),)),
    "tridiagonal_solve": (lax.linalg.tridiagonal_solve,
                          lambda: (normal(3, dtype="float64"), normal(3, dtype="float64") + 5,
                                   normal(3, dtype="float64"), normal(3, 2, dtype="float64"))),
}


@pytest.mark.parametrize("name", sorted(F64_CASES))
def test_float64(x64, name):
    f, make = F64_CASES[name]
    check(f, *make(), tol=1e-9)
