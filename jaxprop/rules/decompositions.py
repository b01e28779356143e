"""Matrix decompositions and solves: cholesky, triangular_solve, lu, qr, eigh, svd, eig,
tridiagonal_solve and custom_linear_solve (what ``jnp.linalg.solve`` / ``inv`` emit).

Each rule is the transpose of JAX's JVP for the primitive (JAX's conventions: the input is
*not* symmetrised by the primitive's rule, complex maps are transposed without conjugation,
``Xᴴ`` transposes to ``ctᴴ`` and ``real`` to the complex embedding). Notation in the
docstrings: ``ct_X`` is the upstream cotangent of output ``X``, ``Xᵀ`` a transpose, ``X̄``
the complex conjugate, ``∘`` an elementwise product, ``tril``/``triu`` triangular parts.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxprop import _jax
from jaxprop.registry import noderule
from jaxprop.rules._util import convert_like, instantiate
from jaxprop.sweep import backward
from jaxprop.tracer import run_traced

_HIGHEST = lax.Precision.HIGHEST


# -- small matrix helpers (batched over leading axes) ----------------------------------------
def _is_complex(x):
    return jnp.issubdtype(x.dtype, jnp.complexfloating)


def _T(x):
    """Transpose of the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def _conj(x):
    return jnp.conj(x) if _is_complex(x) else x


def _H(x):
    """Conjugate transpose."""
    return _conj(_T(x))


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _eye(n, dtype):
    return jnp.eye(n, dtype=dtype)


def _diag(v):
    """A batch of diagonal matrices from a batch of vectors."""
    return v[..., :, None] * _eye(v.shape[-1], v.dtype)


def _diagonal(x):
    """The diagonal of a batch of square matrices (a mask and a sum: no gather)."""
    return (x * _eye(x.shape[-1], x.dtype)).sum(-1)


def _tsolve(a, b, **flags):
    return lax.linalg.triangular_solve(a, b, **flags)


def _unpermute(ct, perm, axis):
    """Inverse of ``y = take(x, perm, axis)`` on a cotangent: sort ct by the key ``perm``.

    ``perm`` has shape (batch..., n) and indexes ``axis`` of ct; its batch axes lead ct's.
    """
    axis = axis % ct.ndim
    key = lax.broadcast_in_dim(perm, ct.shape, tuple(range(perm.ndim - 1)) + (axis,))
    return lax.sort((key, ct), dimension=axis, num_keys=1)[1]


# -- triangular_solve ------------------------------------------------------------------------
@noderule("triangular_solve")
def _triangular_solve(node, cts):
    """X = op(A)⁻¹B (left) or B op(A)⁻¹ (right): ct_B = op(A)⁻ᵀ ct solved the same way,
    ct_A = −mask(opᵀ(ct_B Xᵀ)) (left) or −mask(opᵀ(Xᵀ ct_B)) (right), mask = A's triangle."""
    (ct,), (a, b), x = cts, node.inputs, node.outputs[0]
    p = node.params
    want_a, want_b = node.wants
    ct_b = _tsolve(a, ct, left_side=p["left_side"], lower=p["lower"],
                   transpose_a=not p["transpose_a"], conjugate_a=p["conjugate_a"],
                   unit_diagonal=p["unit_diagonal"])
    ct_a = None
    if want_a:
        g = _mm(ct_b, _T(x)) if p["left_side"] else _mm(_T(x), ct_b)
        g = _T(g) if p["transpose_a"] else g
        g = _conj(g) if p["conjugate_a"] else g
        k = 1 if p["unit_diagonal"] else 0
        g = jnp.tril(g, -k) if p["lower"] else jnp.triu(g, k)
        ct_a = convert_like(-g, a.dtype)
    return [ct_a, convert_like(ct_b, b.dtype) if want_b else None]


# -- cholesky --------------------------------------------------------------------------------
@noderule("cholesky")
def _cholesky(node, cts):
    """Σ = LLᴴ, L̇ = L Φ(L⁻¹ Σ̇ L⁻ᴴ): ct_Σ = L⁻ᵀ Φ(Lᵀ ct_L) L̄⁻¹, Φ = tril with ½ diagonal."""
    ct, = cts
    L = jnp.tril(node.outputs[0])
    n = L.shape[-1]
    phi = jnp.tril(_mm(_T(L), ct)) * (1 - 0.5 * _eye(n, L.real.dtype))
    t = _tsolve(L, phi, left_side=True, lower=True, transpose_a=True)
    return [_tsolve(L, t, left_side=False, lower=True, conjugate_a=_is_complex(L))]


# -- lu --------------------------------------------------------------------------------------
def _lu_factors(lu):
    """Unit-lower L (m×m) and upper U (n×n) from the packed (m×n) LU output."""
    m, n = lu.shape[-2:]
    k = min(m, n)
    nb = lu.ndim - 2
    lower = jnp.tril(lu[..., :, :k] if k < n else lu, -1)
    if k < m:
        lower = jnp.pad(lower, [(0, 0)] * nb + [(0, 0), (0, m - k)])
    upper = jnp.triu(lu[..., :k, :] if k < m else lu)
    if k < n:
        upper = jnp.pad(upper, [(0, 0)] * nb + [(0, n - k), (0, 0)])
        upper = upper + jnp.pad(_eye(n - k, lu.dtype), [(k, 0), (k, 0)])
    return lower + _eye(m, lu.dtype), upper


@noderule("lu")
def _lu(node, cts):
    """PA = LU, LU̇ = L tril(W, −1) + triu(W) U with W = L⁻¹ Ȧ[perm] U⁻¹:
    ct_A = unpermute(L⁻ᵀ (tril(Lᵀ ct, −1) + triu(ct Uᵀ)) U⁻ᵀ); pivots get nothing."""
    ct = cts[0]
    if ct is None:
        return [None]
    lu, _, perm = node.outputs
    L, U = _lu_factors(lu)
    ct_w = jnp.tril(_mm(_T(L), ct), -1) + jnp.triu(_mm(ct, _T(U)))
    ct_w = _tsolve(U, ct_w, left_side=False, lower=False, transpose_a=True)
    ct_w = _tsolve(L, ct_w, left_side=True, lower=True, transpose_a=True, unit_diagonal=True)
    return [_unpermute(ct_w, perm, -2)]


# -- custom_linear_solve (jnp.linalg.solve / inv) -------------------------------------------
def _split(values, lengths):
    """Split the flat consts by the (matvec, vecmat, solve, transpose_solve) lengths."""
    out, i = [], 0
    for n in lengths:
        out.append(list(values[i:i + n]))
        i += n
    return out


@noderule("custom_linear_solve")
def _custom_linear_solve(node, cts):
    """x = A⁻¹b, ẋ = A⁻¹(ḃ − Ȧx): λ = A⁻ᵀ ct_x (a solve with the transposed jaxprs),
    ct_b = λ, ct_A = −(∂(A x)/∂A)ᵀ λ (the matvec's VJP, swept by jaxprop)."""
    lengths, jaxprs = node.params["const_lengths"], node.params["jaxprs"]
    if jaxprs.transpose_solve is None:
        raise TypeError("transpose_solve required for backwards mode automatic "
                        "differentiation of custom_linear_solve")
    n_consts = sum(lengths)
    consts, b = node.inputs[:n_consts], node.inputs[n_consts:]
    x = node.outputs[:len(b)]  # any aux outputs after x get no cotangent (as in JAX)
    matvec_c, vecmat_c, solve_c, tsolve_c = _split(consts, lengths)
    ct_x = [instantiate(ct, xi) for ct, xi in zip(cts[:len(b)], x)]
    lam = node.primitive.bind(*vecmat_c, *matvec_c, *tsolve_c, *solve_c, *ct_x,
                              const_lengths=lengths.transpose(), jaxprs=jaxprs.transpose())
    lam = lam[:len(b)]
    ct_consts = [None] * n_consts
    mv_slots = node.in_slots[:lengths.matvec]
    if any(s is not None for s in mv_slots):
        mv = jaxprs.matvec
        trace, tracers, out = run_traced(
            lambda *c: _jax.eval_jaxpr(mv.jaxpr, mv.consts, *c, *x), matvec_c)
        out_slots = [trace.unwrap(o)[1] for o in out]
        ct_mv = backward(trace.nodes, out_slots, [-l for l in lam], [t.slot for t in tracers])
        ct_consts[:lengths.matvec] = [ct if s is not None else None
                                      for ct, s in zip(ct_mv, mv_slots)]
    ct_b = [convert_like(l, bi.dtype) if s is not None else None
            for l, bi, s in zip(lam, b, node.in_slots[n_consts:])]
    return ct_consts + ct_b


# -- eigh ------------------------------------------------------------------------------------
def _reciprocal_gaps(w):
    """F_ij = 1/(w_j − w_i) off the diagonal, 0 on it."""
    eye = _eye(w.shape[-1], w.dtype)
    return 1 / (eye + w[..., None, :] - w[..., :, None]) - eye


@noderule("eigh")
def _eigh(node, cts):
    """A = V diag(w) Vᴴ: ct_A = V̄ (diag(ct_w) + F ∘ (Vᵀ ct_V)) Vᵀ, F_ij = 1/(w_j − w_i)."""
    subset = node.params.get("subset_by_index")
    (v, w), (ct_v, ct_w), a = node.outputs, cts, node.inputs[0]
    n = a.shape[-1]
    if not (subset is None or tuple(subset) == (0, n)):
        raise NotImplementedError("Derivatives not defined for partial eigen decomposition.")
    inner = jnp.zeros(v.shape, v.dtype)
    if ct_w is not None:
        inner = inner + _diag(ct_w.astype(v.dtype))
    if ct_v is not None:
        inner = inner + _reciprocal_gaps(w.astype(v.dtype)) * _mm(_T(v), ct_v)
    return [convert_like(_mm(_mm(_conj(v), inner), _T(v)), a.dtype)]


# -- svd -------------------------------------------------------------------------------------
@noderule("svd")
def _svd(node, cts):
    """A = U diag(s) Vᴴ, Ṡ = Uᴴ Ȧ V: ct_A = Ū ct_Ṡ Vᵀ with ct_Ṡ = diag(ct_s) + s_j(M₁ + M₁ᴴ)
    + ½(D − Dᴴ) + s_i(M₂ + M₂ᴴ), M₁ = F∘(Uᵀct_U), M₂ = F∘(Vᵀct_V), F_ij = 1/(s_j² − s_i²),
    D = diag(Uᵀct_U)/s; plus the components outside U's (V's) span when A is tall (wide)."""
    a, p = node.inputs[0], node.params
    m, n = a.shape[-2:]
    if p["compute_uv"]:
        if p["full_matrices"] and m != n:
            raise NotImplementedError(
                "Singular value decomposition JVP not implemented for full matrices")
        (s, U, Vt), (ct_s, ct_U, ct_Vt) = node.outputs, cts
    else:
        (s,), (ct_s,), ct_U, ct_Vt = node.outputs, cts, None, None
        s, U, Vt = node.primitive.bind(a, **{**p, "compute_uv": True, "full_matrices": False})
    dtype, k = U.dtype, s.shape[-1]
    V, sc = _H(Vt), s.astype(dtype)
    s_i, s_j = sc[..., :, None], sc[..., None, :]
    eye = _eye(k, s.dtype)
    F = (1 / ((s[..., None, :] + s[..., :, None]) * (s[..., None, :] - s[..., :, None]) + eye)
         - eye).astype(dtype)
    s_zero = (s == 0).astype(s.dtype)
    s_inv = (1 / (s + s_zero) - s_zero).astype(dtype)
    ct_S = jnp.zeros(s.shape + (k,), dtype)
    ct_A = jnp.zeros(a.shape, dtype)
    if ct_s is not None:
        ct_S = ct_S + _diag(ct_s.astype(dtype))
    if ct_U is not None:
        K1 = _mm(_T(U), ct_U)
        M1 = F * K1
        D = _diag(_diagonal(K1) * s_inv)
        ct_S = ct_S + (M1 + _H(M1)) * s_j + 0.5 * (D - _H(D))
        if m > n:  # U̇ += (I − UUᴴ) Ȧ V / s_j
            E = ct_U / s_j
            ct_A = ct_A + _mm(E - _mm(_conj(U), _mm(_T(U), E)), _T(V))
    if ct_Vt is not None:
        ct_V = _H(ct_Vt)
        M2 = F * _mm(_T(V), ct_V)
        ct_S = ct_S + s_i * (M2 + _H(M2))
        if n > m:  # V̇ += (I − VVᴴ) Ȧᴴ U / s_j
            E = ct_V / s_j
            ct_A = ct_A + _H(_mm(E - _mm(_conj(V), _mm(_T(V), E)), _T(U)))
    ct_A = ct_A + _mm(_mm(_conj(U), ct_S), _T(V))
    return [convert_like(ct_A, a.dtype)]


# -- qr --------------------------------------------------------------------------------------
def _thin_qr_transpose(q, r, ct_q, ct_r):
    """Transpose of Ẋ ↦ (Q̇, Ṙ) for m ≥ n: B = ẊR⁻¹, C = QᴴB, Ω = tril(C,−1) − tril(C,−1)ᴴ
    + i Im diag C, Q̇ = Q(Ω − C) + B, Ṙ = (C − Ω)R. With G = ct_R Rᵀ − Qᵀct_Q:
    ct_C = G + tril(−G + Gᴴ, −1) + i Im diag(−G), ct_Ẋ = (ct_Q + Q̄ ct_C) R⁻ᵀ."""
    g = _mm(ct_r, _T(r)) - _mm(_T(q), ct_q)
    ct_c = g + jnp.tril(_H(g) - g, -1)
    if _is_complex(g):
        d = _diagonal(-g)
        ct_c = ct_c + _diag(d - d.real.astype(d.dtype))
    ct_b = ct_q + _mm(_conj(q), ct_c)
    return _tsolve(r, ct_b, left_side=False, lower=False, transpose_a=True)


@noderule("qr")
def _qr(node, cts):
    """X = QR (thin, wide or full): the transpose of the QR JVP, block by block."""
    x, p = node.inputs[0], node.params
    q, r = node.outputs[:2]
    ct_q, ct_r = instantiate(cts[0], q), instantiate(cts[1], r)
    m, n = x.shape[-2:]
    if m < n:  # X = [X₁ X₂], R = [R₁ R₂]: Ṙ₂ = Q̇ᴴX₂ + QᴴẊ₂
        x2, r1 = x[..., :, m:], r[..., :, :m]
        ct_r1, ct_r2 = ct_r[..., :, :m], ct_r[..., :, m:]
        ct_q = ct_q + _mm(_conj(x2), _H(ct_r2))
        ct_x = jnp.concatenate([_thin_qr_transpose(q, r1, ct_q, ct_r1),
                                _mm(_conj(q), ct_r2)], axis=-1)
    elif p["full_matrices"] and m > n:  # Q = [Q₁ Q₂]: Q̇₂ = Q̇₁Zᴴ − W(Q̇ₚ − ZQ̇ₙ)ᴴ
        q1, q2, r1 = q[..., :, :n], q[..., :, n:], r[..., :n, :]
        q_nn, q_pn = q1[..., :n, :], q1[..., n:, :]
        z = _H(jnp.linalg.solve(_H(q_nn - _eye(n, q.dtype)), _H(q_pn)))
        w = q1 + _mm(q2, z)
        ct_q1, ct_q2 = ct_q[..., :, :n], ct_q[..., :, n:]
        ct_e = -_mm(_H(ct_q2), _conj(w))
        ct_q1 = (ct_q1 + _mm(ct_q2, _conj(z))
                 + jnp.concatenate([-_mm(_T(z), ct_e), ct_e], axis=-2))
        ct_x = _thin_qr_transpose(q1, r1, ct_q1, ct_r[..., :n, :])
    else:
        ct_x = _thin_qr_transpose(q, r, ct_q, ct_r)
    if p.get("pivoting"):
        ct_x = _unpermute(ct_x, node.outputs[2], -1)
    return [convert_like(ct_x, x.dtype)]


# -- eig -------------------------------------------------------------------------------------
def _eig_transpose(w, v, ct_w, ct_v):
    """Transpose of Ṁ ↦ (ẇ, v̇) with P = v⁻¹Ṁv, ẇ = diag P, U = v(F∘P), v̇ = U + v∘c, where
    c_j = −Re(Σᵢ v̄ᵢⱼUᵢⱼ) − i Im(U_kj)/Re(v_kj), k = argmaxᵢ|vᵢⱼ| (LAPACK's normalisation):
    ct_Ṁ = v⁻ᵀ ct_P vᵀ."""
    ct_p = jnp.zeros(v.shape, v.dtype)
    if ct_w is not None:
        ct_p = ct_p + _diag(ct_w.astype(v.dtype))
    if ct_v is not None:
        k = jnp.argmax(jnp.abs(v), axis=-2)
        mask = (lax.broadcasted_iota(jnp.int32, v.shape, v.ndim - 2)
                == k[..., None, :]).astype(v.dtype)
        ct_c = (ct_v * v).sum(-2)
        ct_u = (ct_v - _conj(v) * jnp.real(ct_c).astype(v.dtype)[..., None, :]
                + mask * (1j * (-jnp.imag(ct_c)) / jnp.real((mask * v).sum(-2)))[..., None, :])
        ct_p = ct_p + _reciprocal_gaps(w) * _mm(_T(v), ct_u)
    return jnp.linalg.solve(_T(v), _mm(ct_p, _T(v)))


@noderule("eig")
def _eig(node, cts):
    """A v = w v: ct_A = v⁻ᵀ (diag(ct_w) + eigenvector terms) vᵀ (see _eig_transpose); the
    eigenvector terms need enable_eigvec_derivs=True, as in JAX."""
    a, p = node.inputs[0], node.params
    left, right = p["compute_left_eigenvectors"], p["compute_right_eigenvectors"]
    if (left or right) and not p["enable_eigvec_derivs"]:
        raise NotImplementedError(
            "Derivatives of non-symmetric eigenvectors are only valid under assumptions on the "
            "input that JAX cannot check: pass enable_eigvec_derivs=True to "
            "jax.lax.linalg.eig to opt in (https://github.com/jax-ml/jax/issues/2748).")
    ct_w = cts[0]
    if right:
        w, vr, ct_vr = node.outputs[0], node.outputs[-1], cts[-1]
    else:
        outs = node.primitive.bind(a, **{**p, "compute_right_eigenvectors": True})
        w, vr, ct_vr = outs[0], outs[-1], None
    ct_a = _eig_transpose(w, vr, ct_w, ct_vr)
    if left and cts[1] is not None:  # v̇ₗ from (w̄, vₗ, Ȧᴴ)
        ct_a = ct_a + _H(_eig_transpose(_conj(w), node.outputs[1], None, cts[1]))
    return [convert_like(ct_a, a.dtype)]


# -- tridiagonal_solve -----------------------------------------------------------------------
@noderule("tridiagonal_solve")
def _tridiagonal_solve(node, cts):
    """T x = b with T = tridiag(dl, d, du): ct_b = T⁻ᵀ ct (tridiag(du shifted, d, dl shifted)),
    ct_T = −ct_b xᵀ on T's band: ct_d = −Σ ct_b∘x, ct_dl[i] = −Σ ct_b[i]x[i−1],
    ct_du[i] = −Σ ct_b[i]x[i+1]."""
    (ct,), (dl, d, du, _), x = cts, node.inputs, node.outputs[0]
    zero = jnp.zeros(dl.shape[:-1] + (1,), dl.dtype)
    dl_t = jnp.concatenate([zero, du[..., :-1]], axis=-1)
    du_t = jnp.concatenate([dl[..., 1:], zero], axis=-1)
    ct_b = lax.linalg.tridiagonal_solve(dl_t, d, du_t, ct, **node.params)
    zrow = jnp.zeros(x.shape[:-2] + (1,), x.dtype)
    ct_dl = jnp.concatenate([zrow, -(ct_b[..., 1:, :] * x[..., :-1, :]).sum(-1)], axis=-1)
    ct_d = -(ct_b * x).sum(-1)
    ct_du = jnp.concatenate([-(ct_b[..., :-1, :] * x[..., 1:, :]).sum(-1), zrow], axis=-1)
    return [c if want else None for c, want in zip((ct_dl, ct_d, ct_du, ct_b), node.wants)]
