"""Truncated SVD of a low-rank product  ΔW = B̃ Ã  given its stacked factors.

B̃ is (m, R), Ã is (R, n); R = Σ r_k over the clients of a round. Which kernel is fastest
depends on R against min(m, n) (measurements in docs/baselines.md, "The aggregation engine"):

- "factored":   QR of B̃ and of Ãᵀ (Cholesky QR from their float64 Gram matrices, certified;
                Householder QR when not), SVD of the small core, rotate back. Never forms
                the m×n matrix; exact. The choice when R < min(m, n).
- "dense":      form ΔW in one product, then the exact top-k: eigen-decomposition of the
                smaller Gram matrix followed by a Rayleigh-Ritz step when k is much smaller
                than min(m, n), else a full ``torch.linalg.svd``. The Gram matrix is float32
                for float32 input when a bound on the resulting loss of accuracy allows it
                (see ``_gram_svd``), else float64.
- "randomized": ``torch.svd_lowrank`` on the dense ΔW (oversampling + power iterations);
                fast but approximate, never picked by "auto".
- "auto":       "factored" when R < min(m, n), else "dense".

All kernels return the top-k triplets sorted by descending singular value, compute on the
device of the inputs, in float64 when an input is float64 and float32 otherwise (with the
small, accuracy-critical pieces in float64), and give finite results for zero or
rank-deficient input.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from .helpers import compute_dtype
from .threads import SINGLE_THREAD_MAX_FLOPS, factored_flops, openblas, small_work_threads

MODES = ("auto", "factored", "dense", "randomized")
log = logging.getLogger(__name__)  # DEBUG: which Gram route the dense kernel took

# "dense" uses the Gram route when k <= GRAM_MAX_FRACTION * min(m, n). Measured on 2 cores
# (1024×2752, 576×1536) it beats a full SVD up to about 0.6·min(m, n); above that a full SVD
# costs little more and keeps the small singular values accurate (the Gram squares them).
GRAM_MAX_FRACTION = 0.5
# Column block used to accumulate the float64 Gram matrix without a float64 copy of ΔW.
_GRAM_BLOCK = 2048
# The Rayleigh-Ritz step uses this many eigenvectors beyond the k wanted: the top-k are then
# resolved against the gap λ_k − λ_{k+p+1} rather than λ_k − λ_{k+1}.
GRAM_OVERSAMPLE = 16
# A float32 Gram matrix is used when the predicted excess of the rank-k squared error over the
# optimum, relative to the optimum, is below this (about 5e-7 on the error itself).
GRAM32_MAX_LOSS = 1e-6


class TruncatedSVD(NamedTuple):
    """ΔW ≈ U @ diag(S) @ Vh with U (m, k), S (k,), Vh (k, n), S descending."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def matrix(self) -> torch.Tensor:
        """The rank-k matrix U diag(S) Vh (dense, m×n)."""
        return (self.U * self.S) @ self.Vh


def truncated_svd(
    B_stack: torch.Tensor,
    A_stack: torch.Tensor,
    k: int,
    mode: str = "auto",
    *,
    oversample: int = 64,
    niter: int = 2,
    seed: int = 0,
) -> TruncatedSVD:
    """Top-k SVD of ``B_stack @ A_stack`` (B_stack (m, R), A_stack (R, n)).

    k is clipped to min(R, m, n): the product has no more nonzero singular values.
    ``oversample``, ``niter`` and ``seed`` only affect mode "randomized" (the seed drives a
    forked RNG, so the global random stream is left untouched).
    """
    if B_stack.ndim != 2 or A_stack.ndim != 2 or B_stack.shape[1] != A_stack.shape[0]:
        raise ValueError(f"need B (m, R) and A (R, n); got {tuple(B_stack.shape)} and {tuple(A_stack.shape)}")
    if mode not in MODES:
        raise ValueError(f"unknown SVD mode {mode!r}; choose from: {', '.join(MODES)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    (m, R), n = B_stack.shape, A_stack.shape[1]
    k = min(k, R, m, n)
    dtype = compute_dtype(B_stack, A_stack)
    B_stack = B_stack.to(dtype)
    A_stack = A_stack.to(dtype=dtype, device=B_stack.device)
    if mode == "auto":
        mode = "factored" if R < min(m, n) else "dense"
    if mode == "factored":
        return factored_svd(B_stack, A_stack, k)
    dense = B_stack @ A_stack  # one product for all clients, not one per client
    if mode == "dense":
        return dense_svd(dense, k)
    return randomized_svd(dense, k, oversample=oversample, niter=niter, seed=seed)


def factored_svd(B_stack: torch.Tensor, A_stack: torch.Tensor, k: int) -> TruncatedSVD:
    """Exact top-k SVD of B_stack @ A_stack without forming it (see factored_svd_energy)."""
    return factored_svd_energy(B_stack, A_stack, k)[0]


# The Cholesky-QR route is taken when a bound on the loss of orthogonality of its Q factors
# (‖Q̂ᵀQ̂ − I‖, Gram-matrix rounding and Cholesky error amplified by the column-scaled
# condition, see _cholesky_factored) is below this; else the Householder route. The bound is
# a worst case (measured losses are far smaller); 1e-6 admits column-scaled condition numbers
# of B and A up to about 100 at R = 272, m = 2048, and is below what float32 output resolves.
CHOLESKY_MAX_DEFECT = 1e-6


def factored_svd_energy(B_stack: torch.Tensor, A_stack: torch.Tensor, k: int) -> tuple[TruncatedSVD, torch.Tensor]:
    """(Exact top-k SVD of B_stack @ A_stack, ‖B_stack @ A_stack‖²_F as a float64 scalar),
    without forming the m×n product.

    B = Q_b R_b, Aᵀ = Q_a R_a  =>  B A = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD of the small core
    R_b R_aᵀ, rotated back by the orthonormal Q's, is the SVD of B A. The core carries all
    the conditioning, so it is formed in float64 (it is only R×R) and decomposed in float64, or
    in float32 for float32 input where an a-posteriori check allows it (core_svd).

    The R factors come from the float64 Gram matrices G_b = BᵀB and G_a = A Aᵀ (Cholesky
    QR: G = L Lᵀ, R = Lᵀ), which also give the energy tr(G_b G_a); Q_b is never formed:
    U = Q_b u_k = B (L_b⁻ᵀ u_k), one m×R×k product (Vh likewise). Measured at 2048×2048,
    R = 272, k = 200 on one thread: 27 ms against 40 ms for Householder QR of B and Aᵀ plus
    the energy. Cholesky QR is exact only when B and A are well conditioned (after column /
    row scaling), so it is taken only when a bound on the loss of orthogonality of the
    implicit Q's is below CHOLESKY_MAX_DEFECT (see _cholesky_factored). Rank-deficient or
    ill-conditioned factors (a zero client, two equal clients, ...) fail the Cholesky or the
    bound and take the Householder route, whose energy is ‖R_b R_aᵀ‖²_F.
    """
    (m, R), n = B_stack.shape, A_stack.shape[1]
    with small_work_threads(factored_flops(m, n, R), B_stack.device, SINGLE_THREAD_MAX_FLOPS):
        float64 = B_stack.dtype == torch.float64
        # The cheap probe, in the input precision, smaller Gram first: a failure (the common case
        # in a run, see below) skips the other one.
        grams = {}
        probe = True
        for side, X, depth in sorted((("b", B_stack.T, m), ("a", A_stack, n)), key=lambda item: item[2]):
            grams[side] = X @ X.T  # (R, R)
            if not float64 and _cholesky_defect(grams[side].double(), depth, 10 * CHOLESKY_MAX_DEFECT) is None:
                probe = False  # clearly ill-conditioned (in a run, clients that started from one
                break  # global slice have near-equal A rows and B columns): Householder
        result = None
        if probe:
            Bd, Ad = B_stack.double(), A_stack.double()
            Gb, Ga = (grams[side] if float64 else X.T @ X for side, X in (("b", Bd), ("a", Ad.T)))
            result = _cholesky_factored(B_stack, A_stack, Bd, Ad, Gb, Ga, k)
            energy = (Gb * Ga).sum().clamp_min(0)  # ‖B A‖² = tr(BᵀB A Aᵀ)
        if result is None:
            result, energy = _householder_factored(B_stack, A_stack, k)
    return result, energy


def _cholesky_defect(G: torch.Tensor, depth: int, limit: float = CHOLESKY_MAX_DEFECT) -> torch.Tensor | None:
    """The Cholesky factor L of a float64 Gram matrix G = XᵀX (X with `depth` rows), or None
    when the bound of _cholesky_factored on the loss of orthogonality of X L⁻ᵀ exceeds
    `limit` (or G is singular)."""
    R = G.shape[0]
    d = G.diagonal().clamp_min(0).sqrt()
    if not bool((d > 0).all()):
        return None  # a zero column: rank-deficient
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return None
    Lhat_inv = torch.linalg.solve_triangular(L / d[:, None], torch.eye(R, dtype=G.dtype, device=G.device), upper=False)
    defect = R * (depth + R + 1) * torch.finfo(torch.float64).eps * Lhat_inv.pow(2).sum()
    return L if bool(defect <= limit) else None


# The core's SVD runs in float32 for float32 input with R >= CORE32_MIN_RANK (about 2x faster
# than float64 there, one thread: R = 128 4 against 6 ms, 256 18 against 37, 400 48 against 87;
# below, the gain is nil and float64 keeps its accuracy) when an a-posteriori check in float64
# passes: the
# backward error ‖C − u diag(s) vh‖_F and the loss of orthogonality of u and vh, estimated on
# CORE_PROBES fixed Gaussian probe vectors (O(R²) each), must be at most CORE32_MAX_DEFECT·R·eps32
# (relative to ‖C‖_F for the first). A backward-stable float32 SVD meets it (the result is then
# the exact SVD of a matrix within a few eps32·‖C‖ of C: what the float32 output resolves, and
# what the float32 QR before it already commits); a non-converged or non-finite one does not,
# and the core is decomposed again in float64. Measured on a SmolLM2 MLP module's round (two
# clients from one global slice, R = 400, k = 200): rank-k error 1.40e-6 of ‖ΔW‖ against 1.07e-6
# with the float64 core (optimum 0.86e-6).
CORE_PROBES = 8
CORE32_MIN_RANK = 128
CORE32_MAX_DEFECT = 16.0


def core_svd(core: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, s, vh), float64, of the float64 core: decomposed in float32 when `dtype` is float32,
    the core is large enough and the check above passes, else in float64."""
    if dtype == torch.float32 and min(core.shape) >= CORE32_MIN_RANK and bool(torch.isfinite(core).all()):
        try:
            u, s, vh = (t.double() for t in torch.linalg.svd(core.float(), full_matrices=False))
        except RuntimeError:  # LAPACK did not converge
            pass
        else:
            if _core_svd_defect(core, u, s, vh) <= CORE32_MAX_DEFECT * max(core.shape) * torch.finfo(torch.float32).eps:
                return u, s, vh
    return torch.linalg.svd(core, full_matrices=False)


def _core_svd_defect(core: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    """The largest of ‖C − u s vh‖_F / ‖C‖_F, ‖uᵀu − I‖_F and ‖vh vhᵀ − I‖_F, each estimated as
    ‖E X‖_F / √p with X Gaussian (·, p = CORE_PROBES) from a fixed seed (E‖EX‖²_F = p‖E‖²_F)."""
    gen = torch.Generator(device=core.device).manual_seed(0)
    probes = lambda rows: torch.randn(rows, CORE_PROBES, generator=gen, dtype=torch.float64, device=core.device)  # noqa: E731
    X, Y = probes(core.shape[1]), probes(u.shape[1])
    norm = float(torch.linalg.matrix_norm(core))
    residuals = (
        (core @ X - u @ (s[:, None] * (vh @ X))) / (norm if norm > 0 else 1.0),
        u.T @ (u @ Y) - Y,
        vh @ (vh.T @ Y) - Y,
    )
    worst = max(float(torch.linalg.matrix_norm(r)) for r in residuals) / CORE_PROBES**0.5
    return worst if worst == worst else float("inf")  # NaN: failed


def _householder_factored(B_stack: torch.Tensor, A_stack: torch.Tensor, k: int) -> tuple[TruncatedSVD, torch.Tensor]:
    """(The top-k SVD, ‖B A‖²_F as a float64 scalar) through Householder QR of B and Aᵀ."""
    Qb, Rb = torch.linalg.qr(B_stack)  # (m, p), (p, R), p = min(m, R)
    Qa, Ra = torch.linalg.qr(A_stack.T)  # (n, q), (q, R), q = min(n, R)
    core = Rb.double() @ Ra.double().T  # (p, q)
    dtype = B_stack.dtype
    u, s, vh = core_svd(core, dtype)  # descending
    U = Qb @ u[:, :k].to(dtype)
    Vh = vh[:k].to(dtype) @ Qa.T
    return TruncatedSVD(U, s[:k].to(dtype), Vh), core.pow(2).sum()  # ‖B A‖ = ‖Rb Raᵀ‖ (Q's orthonormal)


def _cholesky_factored(B, A, Bd, Ad, Gb, Ga, k: int) -> TruncatedSVD | None:
    """The Cholesky-QR route of factored_svd_energy; None when it is not certified.

    With D = diag(G)^½ and L̂ = D⁻¹L the Cholesky factor of the unit-diagonal Ĝ = D⁻¹GD⁻¹, the
    implicit Q = B L⁻ᵀ has QᵀQ − I = L̂⁻¹ ΔĜ L̂⁻ᵀ, where ΔĜ (Gram rounding, |ΔĜ_ij| <= m·eps, and
    Cholesky backward error, <= (R+1)·eps) is column-scaled, so ‖QᵀQ − I‖ <= R(m + R + 1)·eps·
    ‖L̂⁻¹‖²_F. Scale-invariant: clients' p_k s_k factors that differ by orders of magnitude do
    not matter, only near-dependent directions do.
    """
    m, R = B.shape
    if R == 0 or k == 0 or R > min(m, A.shape[1]):
        return None
    factors = []
    for G, depth in ((Gb, m), (Ga, A.shape[1])):
        L = _cholesky_defect(G, depth)
        if L is None:
            return None
        factors.append(L)
    Lb, La = factors
    core = Lb.T @ La  # B = Q_b L_bᵀ, Aᵀ = Q_a L_aᵀ  =>  B A = Q_b (L_bᵀ L_a) Q_aᵀ
    u, s, vh = core_svd(core, B.dtype)  # descending
    Tb = torch.linalg.solve_triangular(Lb.T, u[:, :k], upper=True)  # U = B Tb
    Ta = torch.linalg.solve_triangular(La.T, vh[:k].T, upper=True)  # Vhᵀ = Aᵀ Ta
    dtype = B.dtype
    # The rotation back in the input precision unless T is large in the column-scaled sense
    # (w = |T|ᵀ diag(G)^½; its rounding would be amplified by w): then in float64.
    w = max(float((T.abs().T @ G.diagonal().sqrt()).max()) for T, G in ((Tb, Gb), (Ta, Ga)))
    if dtype == torch.float64 or w**2 > 16 * R:
        U, Vh = Bd @ Tb, Ta.T @ Ad
    else:
        U, Vh = B @ Tb.to(dtype), Ta.T.to(dtype) @ A
    return TruncatedSVD(U.to(dtype), s[:k].to(dtype), Vh.to(dtype))


def dense_svd(dense: torch.Tensor, k: int) -> TruncatedSVD:
    """Exact top-k SVD of a dense matrix."""
    m, n = dense.shape
    k = min(k, m, n)
    if k == 0:
        return TruncatedSVD(dense.new_zeros(m, 0), dense.new_zeros(0), dense.new_zeros(0, n))
    if k <= GRAM_MAX_FRACTION * min(m, n):
        return _gram_svd(dense, k)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return TruncatedSVD(U[:, :k], S[:k], Vh[:k])


def _gram_svd(dense: torch.Tensor, k: int) -> TruncatedSVD:
    """Top-k SVD via the smaller Gram matrix, then a Rayleigh-Ritz step.

    The top eigenvectors of G = ΔW ΔWᵀ span the top left singular subspace. Projecting ΔW
    (in float64) onto the top l = k + GRAM_OVERSAMPLE of them and taking the SVD of that l×q
    matrix gives singular values read off ΔW itself (not square roots of eigenvalues), an
    orthonormal Vh without dividing by possibly-zero singular values, and the same triplets
    as a full SVD.

    Precision: G squares the singular values, so its rounding error limits how well the
    subspace is resolved. For float32 input, G is first formed and decomposed in float32
    (3× faster than float64, measured at 2048×5504) and the result is certified a posteriori
    in float64: with Ritz values θ_i and residuals r_i = ‖G y_i − θ_i y_i‖ of the top-k Ritz
    vectors y_i, Davis-Kahan bounds the excess of the rank-k squared error over the optimum by
    Σ_{i≤k} θ_i r_i² / (θ_i − λ_{l+1})². If that bound exceeds GRAM32_MAX_LOSS times the
    optimal squared error ‖ΔW‖² − Σ_{i≤k} θ_i (tiny gap, near-exact rank ≤ k, ...), G is
    recomputed in float64. The certificate costs two float64 products with l columns.
    """
    transposed = dense.shape[0] > dense.shape[1]
    X = dense.T if transposed else dense  # (p, q) with p <= q
    l = min(X.shape[0], k + GRAM_OVERSAMPLE)
    result = None
    if X.dtype == torch.float32:
        Q, lam = _top_eigenvectors(X, l, torch.float32)
        result = _rayleigh_ritz(X, Q, k, certify_against=lam if l < X.shape[0] else None)
        log.debug("top-%d of %dx%d: float32 Gram %s", k, *dense.shape, "certified" if result is not None else "not certified")
    if result is None:
        Q, _ = _top_eigenvectors(X, l, torch.float64)
        result = _rayleigh_ritz(X, Q, k)
        log.debug("top-%d of %dx%d: float64 Gram", k, *dense.shape)
    U, S, Vh = result
    if transposed:  # X = ΔWᵀ = U S Vh  =>  ΔW = Vhᵀ S Uᵀ
        U, Vh = Vh.T, U.T
    return TruncatedSVD(U.contiguous(), S, Vh.contiguous())


# Partial symmetric eigensolver. torch.linalg.eigh (LAPACK ?syevd) computes every eigenpair;
# the dense route needs the top l + 1 of p (l = k + 16, k ≈ 200 ≪ p = 2048 or 4096). LAPACK's
# ?syevr (MRRR) computes only those: measured here on one thread, float32, top 216 of a
# 2048×2048 Gram matrix 0.44 s against 0.63 s for eigh, of 4096×4096 2.8 s against 4.3 s.
# torch does not expose ?syevr; numpy's Linux/macOS wheels bundle OpenBLAS with all of LAPACK
# (ILP64 LAPACKE, symbols prefixed "scipy_"), which is called through ctypes when present
# (threads.openblas), on one OpenBLAS thread (on the shared 2-core machine two OpenBLAS threads took 5.7 s instead of
# 0.44 s: they spin while waiting). Without it, or on a GPU, torch.linalg.eigh.
# For a larger share of the spectrum the full divide-and-conquer eigh is faster (one thread,
# top 217, float32: p = 576 16 ms against 24 ms for ?syevr, 768 32 against 37, 1024 79 against
# 70, 2048 589 against 391; float64 at p = 576: 27 against 54), so float64 Gram matrices take
# it above this fraction. Float32 ones keep ?syevr: its eigenvectors pass _gram_svd's float32
# certificate far more often (a round of SmolLM2's default run: 56 of 90 modules against 14
# with eigh, each failure recomputing the Gram matrix in float64).
PARTIAL_EIGH = True  # False: always torch.linalg.eigh
PARTIAL_EIGH_MAX_FRACTION = 0.25


def top_eigh(G: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the `count` largest eigenvalues of the symmetric G, descending; their eigenvectors as
    columns), in G's dtype. G may be overwritten."""
    p = G.shape[0]
    count = min(count, p)
    partial = PARTIAL_EIGH and G.device.type == "cpu" and count < p
    if G.dtype == torch.float64 and count >= PARTIAL_EIGH_MAX_FRACTION * p:
        partial = False  # see PARTIAL_EIGH_MAX_FRACTION; in float32 ?syevr is kept for accuracy
    lapack = openblas() if partial else None
    if lapack is not None and G.dtype in lapack[0]:
        import ctypes

        functions, get_threads, set_threads = lapack
        a = G.clone()  # overwritten by LAPACK; G stays for the fallback
        w = torch.empty(p, dtype=G.dtype)
        z = torch.empty(count, p, dtype=G.dtype)  # column-major p×count: row j is eigenvector j
        support = torch.empty(2 * count, dtype=torch.int64)
        found = ctypes.c_int64(0)
        threads = get_threads()
        set_threads(1)  # inside map_modules already 1: then this and the restore change nothing
        try:
            info = functions[G.dtype](
                102,
                b"V",
                b"I",
                b"L",
                p,
                a.data_ptr(),
                p,
                0.0,
                0.0,
                p - count + 1,
                p,
                0.0,
                ctypes.byref(found),
                w.data_ptr(),
                z.data_ptr(),
                p,
                support.data_ptr(),
            )
        finally:
            set_threads(threads)
        if info == 0 and found.value == count:
            return w[:count].flip(0), z.flip(0).T
        log.debug("?syevr failed (info %d): torch.linalg.eigh", info)
    evals, evecs = torch.linalg.eigh(G)  # ascending
    return evals[-count:].flip(0), evecs[:, -count:].flip(-1)


def _top_eigenvectors(X: torch.Tensor, l: int, gram_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-l eigenvectors of X Xᵀ as a (p, l) float64 matrix, top first; the top l + 1
    eigenvalues (all if l = p), descending, float64), with the Gram matrix formed and
    decomposed in `gram_dtype` (see top_eigh)."""
    p, q = X.shape
    if gram_dtype == X.dtype:
        G = X @ X.T
    else:  # accumulate by column blocks: no full-size copy of X in gram_dtype
        G = torch.zeros(p, p, dtype=gram_dtype, device=X.device)
        for j in range(0, q, _GRAM_BLOCK):
            block = X[:, j : j + _GRAM_BLOCK].to(gram_dtype)
            G.addmm_(block, block.T)
    evals, evecs = top_eigh(G, l + 1)  # descending
    return evecs[:, :l].double(), evals.double()


def _rayleigh_ritz(X: torch.Tensor, Q: torch.Tensor, k: int, certify_against: torch.Tensor | None = None) -> TruncatedSVD | None:
    """Top-k SVD of X restricted to span(Q), computed in float64. With `certify_against` (the
    float32 Gram eigenvalues), None unless the a-posteriori bound of _gram_svd holds."""
    p, q = X.shape
    l = Q.shape[1]
    certify = certify_against is not None
    Z = torch.empty(q, l, dtype=torch.float64, device=X.device)  # Xᵀ Q = (Qᵀ X)ᵀ
    Y = torch.zeros(p, l, dtype=torch.float64, device=X.device) if certify else None  # G Q = X Xᵀ Q
    total = torch.zeros((), dtype=torch.float64, device=X.device)  # ‖X‖²
    for j in range(0, q, _GRAM_BLOCK):
        block = X[:, j : j + _GRAM_BLOCK].double()
        Z[j : j + _GRAM_BLOCK] = block.T @ Q
        if certify:
            Y.addmm_(block, Z[j : j + _GRAM_BLOCK])
            total += block.pow(2).sum()
    # Qᵀ X = Zᵀ = u s vh, through the QR of the tall Z (Zᵀ = R_zᵀ Q_zᵀ, then the l×l SVD of
    # R_zᵀ): measured 2.5× faster than LAPACK's SVD of the wide l×q Zᵀ (l = 216, q = 1536).
    Qz, Rz = torch.linalg.qr(Z)
    u, s, wh = torch.linalg.svd(Rz.T)
    vh = wh[:k] @ Qz.T
    if certify:
        # Ritz vectors of G in span(Q) are Q u with Ritz values s²; their residuals:
        theta = s[:k] ** 2
        residual = torch.linalg.vector_norm(Y @ u[:, :k] - (Q @ u[:, :k]) * theta, dim=0)
        lam = certify_against
        weyl = 4 * (p**0.5 + q**0.5) * torch.finfo(torch.float32).eps * lam[0]  # |λ̂ − λ| of a float32 Gram
        gaps = theta - (lam[l] + weyl)  # distance to the eigenvalues outside span(Q)
        optimal = total - theta.sum()
        if not bool(gaps[-1] > 0) or not bool(optimal > 1e-10 * total):
            return None
        excess = (theta * residual**2 / gaps**2).sum()
        if not bool(excess <= GRAM32_MAX_LOSS * optimal):
            return None
    dtype = X.dtype
    return TruncatedSVD((Q @ u[:, :k]).to(dtype), s[:k].to(dtype), vh[:k].to(dtype))


def randomized_svd(dense: torch.Tensor, k: int, *, oversample: int = 64, niter: int = 2, seed: int = 0) -> TruncatedSVD:
    """Approximate top-k SVD with ``torch.svd_lowrank`` (q = k + oversample, niter power steps)."""
    m, n = dense.shape
    k = min(k, m, n)
    q = min(k + max(oversample, 0), m, n)
    devices = [dense.device] if dense.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=dense.device.type):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(dense, q=q, niter=niter)
    order = torch.argsort(S, descending=True)[:k]
    return TruncatedSVD(U[:, order], S[order], V[:, order].T.contiguous())
