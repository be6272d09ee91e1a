"""The truncated-SVD kernels (methods/svd.py: factored, dense, randomized, the partial
eigensolver) against torch.linalg.svd of the float64 product, and the thread control the
aggregation runs under (methods/threads.py)."""

from __future__ import annotations

import pytest
import torch
from test_aggregation import F64, optimal_error, rel

import flexlora.methods as agg
from flexlora.methods import ClientUpdate, FlexLoRA, threads, truncated_svd
from flexlora.methods import svd as svd_mod

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def stacked(m, n, R, seed, dtype=F64, decay=True):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(m, R, generator=gen, dtype=F64)
    A = torch.randn(R, n, generator=gen, dtype=F64)
    if decay:  # a spectrum with clear gaps, so the rank-k truncation is well defined
        B = B * (0.8 ** torch.arange(R, dtype=F64))
    return B.to(dtype), A.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("m,n,R", [(60, 45, 12), (30, 40, 60), (40, 25, 25)])
def test_factored_and_dense_agree(dtype, tol, m, n, R):
    B, A = stacked(m, n, R, seed=m + n + R, dtype=dtype)
    dense_ref = B.double() @ A.double()
    S_ref = torch.linalg.svdvals(dense_ref)
    for k in (1, 3, min(R, m, n) // 2, min(R, m, n)):
        f = truncated_svd(B, A, k, "factored")
        d = truncated_svd(B, A, k, "dense")
        assert f.U.dtype == dtype == d.S.dtype
        assert f.U.shape == (m, k) and f.S.shape == (k,) and f.Vh.shape == (k, n)
        assert (f.S - d.S).abs().max() <= tol * S_ref[0]
        assert (f.S.double() - S_ref[:k]).abs().max() <= tol * S_ref[0]
        Mf, Md = f.matrix().double(), d.matrix().double()
        assert rel(Mf, Md) < tol
        U, S, Vh = torch.linalg.svd(dense_ref, full_matrices=False)
        assert rel(Mf, (U[:, :k] * S[:k]) @ Vh[:k]) < tol
        eye = torch.eye(k, dtype=F64)
        assert (f.U.double().T @ f.U.double() - eye).abs().max() < 100 * tol
        assert (d.Vh.double() @ d.Vh.double().T - eye).abs().max() < 100 * tol


@pytest.mark.parametrize("fraction", [0.0, 1.0])  # force full SVD, then force the Gram route
@pytest.mark.parametrize("shape", [(30, 70), (70, 30)])
def test_dense_paths_agree(monkeypatch, fraction, shape):
    monkeypatch.setattr(svd_mod, "GRAM_MAX_FRACTION", fraction)
    m, n = shape
    B, A = stacked(m, n, 80, seed=11)
    dense = B @ A
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    for k in (1, 5, 20, 30):
        d = svd_mod.dense_svd(dense, k)
        assert rel(d.matrix(), (U[:, :k] * S[:k]) @ Vh[:k]) < 1e-10
        assert (d.S - S[:k]).abs().max() < 1e-10 * S[0]


def test_float32_gram_route_is_certified_or_redone_in_float64(monkeypatch):
    """float32 input: the Gram matrix is float32 when the a-posteriori bound certifies the
    result, else float64 (here: a matrix of rank exactly k, whose optimal error is zero), and
    the result is within 1e-5 of optimal either way."""
    routes = []
    real_eig, real_rr = svd_mod._top_eigenvectors, svd_mod._rayleigh_ritz
    monkeypatch.setattr(svd_mod, "_top_eigenvectors", lambda X, l, dt: routes.append(dt) or real_eig(X, l, dt))

    def rr(X, Q, k, certify_against=None):
        out = real_rr(X, Q, k, certify_against)
        routes.append(
            "certified" if certify_against is not None and out is not None else "rejected" if out is None else "float64 RR"
        )
        return out

    monkeypatch.setattr(svd_mod, "_rayleigh_ritz", rr)
    k = 30
    for R, decay, expected in (
        (400, False, [torch.float32, "certified"]),
        (400, True, None),  # fast decay: either route, as long as the result is exact
        (k, False, [torch.float32, "rejected", F64, "float64 RR"]),
    ):
        routes.clear()
        B, A = stacked(120, 260, R, seed=5, dtype=torch.float32, decay=decay)
        dense = B @ A
        ref = B.double() @ A.double()
        res = svd_mod.dense_svd(dense, k)
        if expected is not None:
            assert routes == expected
        err = torch.linalg.norm(ref - res.matrix().double()).item()
        opt = optimal_error(ref, k)
        if R > k:
            assert err / opt <= 1 + 1e-5
        else:
            assert err <= 1e-5 * torch.linalg.norm(ref).item()
        S_ref = torch.linalg.svdvals(ref)[:k]
        assert (res.S.double() - S_ref).abs().max() <= 1e-5 * S_ref[0]
        eye = torch.eye(k, dtype=F64)
        assert (res.U.double().T @ res.U.double() - eye).abs().max() < 1e-4


def test_randomized_within_tolerance_and_leaves_rng_alone():
    # A flat-ish spectrum is the hard case for a randomized range finder.
    B, A = stacked(200, 300, 400, seed=2, dtype=torch.float32, decay=False)
    dense = B.double() @ A.double()
    k = 20
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    r1 = truncated_svd(B, A, k, "randomized", oversample=30, niter=4, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(456)
    r2 = truncated_svd(B, A, k, "randomized", oversample=30, niter=4, seed=7)
    assert torch.equal(r1.S, r2.S)  # its own seed, not the global stream: reproducible
    r3 = truncated_svd(B, A, k, "randomized", oversample=30, niter=4, seed=8)
    assert not torch.equal(r1.S, r3.S)
    err = torch.linalg.norm(dense - r1.matrix().double()).item()
    # stated tolerance (measured here: 1.0001 and 0.08%): rank-k error within 0.5% of the
    # optimum, top-k singular values within 1%
    assert err / optimal_error(dense, k) < 1.005
    S_ref = torch.linalg.svdvals(dense)[:k]
    assert ((r1.S.double() - S_ref).abs() / S_ref).max() < 0.01
    assert torch.all(r1.S[:-1] >= r1.S[1:])


@pytest.mark.parametrize("mode", ["auto", "factored", "dense", "randomized"])
def test_zero_and_rank_deficient_inputs(mode):
    m, n = 20, 15
    zero = truncated_svd(torch.zeros(m, 4), torch.zeros(4, n), 4, mode)
    assert all(torch.isfinite(t).all() for t in zero)
    assert torch.all(zero.S == 0)
    # rank 2 written with R = 6 (repeated columns), asked for k = 5
    gen = torch.Generator().manual_seed(0)
    B2 = torch.randn(m, 2, generator=gen, dtype=F64)
    A2 = torch.randn(2, n, generator=gen, dtype=F64)
    B, A = torch.cat([B2, B2, B2], 1), torch.cat([A2, A2, -A2], 0)
    res = truncated_svd(B, A, 5, mode)
    assert all(torch.isfinite(t).all() for t in res)
    assert res.S.shape == (5,)
    assert res.S[2:].abs().max() < 1e-8 * res.S[0]
    assert rel(res.matrix(), B @ A) < 1e-8


def test_k_is_clipped_and_bad_arguments_rejected():
    B, A = stacked(20, 15, 4, seed=0)
    assert truncated_svd(B, A, 100).S.shape == (4,)
    assert truncated_svd(B, A, 100, "dense").S.shape == (4,)
    assert truncated_svd(B, A, 0).S.shape == (0,)
    with pytest.raises(ValueError, match="unknown SVD mode"):
        truncated_svd(B, A, 2, "magic")
    with pytest.raises(ValueError):
        truncated_svd(B, A.T, 2)
    with pytest.raises(ValueError):
        FlexLoRA(split="cube_root")


def _factored_route(monkeypatch):
    """Records which route factored_svd_energy took: "cholesky" or "householder"."""
    routes = []
    real = svd_mod._householder_factored

    def spy(*args):
        routes[-1] = "householder"
        return real(*args)

    monkeypatch.setattr(svd_mod, "_householder_factored", spy)
    return routes


def _ill_conditioned(m, n, R, seed, dtype, in_top=False):
    """Columns 0 and 1 of B nearly dependent (κ ≈ 1e7 after column scaling). in_top: A's row 1
    is large, so that the near-dependent direction b_1 a_1 is among the top singular ones."""
    B, A = stacked(m, n, R, seed, dtype=F64, decay=False)
    B[:, 1] = B[:, 0] + 1e-7 * B[:, 1]
    if in_top:
        A[1] *= 1e7
    return B.to(dtype), A.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "kind,expected",
    [
        ("plain", "cholesky"),
        ("decay", "cholesky"),  # column scales over 6 decades: Cholesky QR is scale-invariant
        ("ill", None),  # certified or not, depending on k: exact either way
        ("ill_top", "householder at k=25"),  # k=1 does not reach the bad direction
        ("rank_deficient", "householder"),
        ("zero", "householder"),
    ],
)
def test_factored_routes_exact_on_hard_inputs(monkeypatch, dtype, tol, kind, expected):
    """The Cholesky-QR route is taken only when certified; either way the result matches
    torch.linalg.svd of the float64 product (rank-k matrix, singular values, orthonormal
    factors, the rank-k error within 1e-5 of optimal) and the energy is ‖BA‖²."""
    m, n, R = 90, 70, 40
    if kind in ("plain", "decay"):
        B, A = stacked(m, n, R, seed=3, dtype=dtype, decay=kind == "decay")
    elif kind.startswith("ill"):
        B, A = _ill_conditioned(m, n, R, 4, dtype, in_top=kind == "ill_top")
    elif kind == "rank_deficient":  # two equal clients and a zero one
        B1, A1 = stacked(m, n, 15, seed=5, dtype=dtype)
        B = torch.cat([B1, B1, torch.zeros(m, 10, dtype=dtype)], 1)
        A = torch.cat([A1, A1, torch.randn(10, n, dtype=F64).to(dtype)], 0)
    else:
        B, A = torch.zeros(m, R, dtype=dtype), torch.zeros(R, n, dtype=dtype)
    routes = _factored_route(monkeypatch)
    dense = B.double() @ A.double()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    for k in (1, 7, 25):
        routes[:] = ["cholesky"]
        res, energy = svd_mod.factored_svd_energy(B, A, k)
        assert len(routes) == 1
        if expected in ("cholesky", "householder") or expected == f"householder at k={k}":
            assert routes[0] == expected.split()[0]
        assert res.U.dtype == dtype and res.U.shape == (m, k) and res.Vh.shape == (k, n)
        assert float(energy) == pytest.approx(float(dense.pow(2).sum()), rel=1e-10 if dtype == F64 else 1e-6, abs=1e-300)
        assert all(torch.isfinite(t).all() for t in res)
        if kind == "zero":
            assert torch.all(res.S == 0)
            continue
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert (res.S.double() - S[:k]).abs().max() <= tol * S[0]
        optimal = float(S[k:].pow(2).sum()) ** 0.5
        err = torch.linalg.norm(dense - res.matrix().double()).item()
        # within tol of optimal; when the rank is <= k the optimum is 0, so also allow rounding
        assert err <= (1 + tol) * optimal + 10 * tol * float(S[0])
        if k <= 7 or kind != "rank_deficient":  # beyond the rank the singular vectors are arbitrary
            assert rel(res.matrix().double(), best) < 10 * tol
            eye = torch.eye(k, dtype=F64)
            assert (res.U.double().T @ res.U.double() - eye).abs().max() < 100 * tol
            assert (res.Vh.double() @ res.Vh.double().T - eye).abs().max() < 100 * tol


def test_factored_cholesky_and_householder_routes_agree(monkeypatch):
    """Forcing the Householder route gives the same rank-k matrices (float32 and float64)."""
    for dtype, tol in ((F64, 1e-11), (torch.float32, 2e-6)):
        B, A = stacked(300, 200, 60, seed=9, dtype=dtype)
        fast, e_fast = svd_mod.factored_svd_energy(B, A, 40)
        with monkeypatch.context() as mp:
            mp.setattr(svd_mod, "_cholesky_factored", lambda *a: None)  # the probe passes here
            slow, e_slow = svd_mod.factored_svd_energy(B, A, 40)
        assert rel(fast.matrix().double(), slow.matrix().double()) < tol
        assert (fast.S - slow.S).abs().max() <= tol * slow.S[0]
        # Householder's energy is ‖R_b R_aᵀ‖² (from float32 R's for float32 input): equal to rounding
        assert float(e_fast) == pytest.approx(float(e_slow), rel=1e-12 if dtype == F64 else 1e-6)


def _near_duplicate_stack(dtype):
    """Two clients that trained a little from one global slice, as in a run: their A rows and
    B columns are close, so the stack takes the Householder route."""
    B1, A1 = stacked(120, 90, 20, seed=11)
    gen = torch.Generator().manual_seed(12)
    B2 = B1 + 1e-3 * torch.randn(B1.shape, generator=gen, dtype=F64)
    A2 = A1 + 1e-3 * torch.randn(A1.shape, generator=gen, dtype=F64)
    return torch.cat([B1, B2], 1).to(dtype), torch.cat([A1, A2], 0).to(dtype)


@pytest.mark.parametrize(
    "dtype,corrupt,expected",
    [
        (torch.float32, None, ["float32"]),
        (torch.float32, "vectors", ["float32", "float64"]),  # u no longer orthonormal
        (torch.float32, "values", ["float32", "float64"]),  # u s vh no longer the core
        (torch.float32, "nan", ["float32", "float64"]),
        (torch.float32, "raise", ["float32", "float64"]),  # LAPACK did not converge
        (F64, None, ["float64"]),
        (torch.float32, "small", ["float64"]),  # below CORE32_MIN_RANK the float32 SVD gains nothing
    ],
)
def test_the_core_svd_runs_in_float32_where_its_check_passes(monkeypatch, dtype, corrupt, expected):
    """The factored route's R×R core is decomposed in float32 for float32 input and checked in
    float64 (backward error, orthogonality); a failed check decomposes it again in float64. The
    result is exact either way."""
    monkeypatch.setattr(svd_mod, "CORE32_MIN_RANK", 41 if corrupt == "small" else 8)  # R = 40: checked as a large one
    B, A = _near_duplicate_stack(dtype)
    routes = _factored_route(monkeypatch)
    precisions = []
    real_svd = torch.linalg.svd

    def svd(core, *args, **kwargs):
        precisions.append(str(core.dtype).removeprefix("torch."))
        if core.dtype == torch.float32 and corrupt == "raise":
            raise RuntimeError("linalg.svd: The algorithm failed to converge")
        u, s, vh = real_svd(core, *args, **kwargs)
        if core.dtype == torch.float32 and corrupt in ("vectors", "values", "nan"):
            u, s = u.clone(), s.clone()
            if corrupt == "vectors":
                u[:, 3] = u[:, 4]
            elif corrupt == "values":
                s[2] *= 1.01
            else:
                s[0] = float("nan")
        return u, s, vh

    monkeypatch.setattr(torch.linalg, "svd", svd)
    dense = B.double() @ A.double()
    U, S, Vh = real_svd(dense, full_matrices=False)
    routes[:] = ["cholesky"]
    result, energy = svd_mod.factored_svd_energy(B, A, 15)
    assert routes == ["householder"] and precisions == expected
    assert result.U.dtype == dtype
    tol = 1e-10 if dtype == F64 else 1e-5
    assert rel(result.matrix().double(), (U[:, :15] * S[:15]) @ Vh[:15]) < tol
    assert (result.S.double() - S[:15]).abs().max() <= tol * S[0]
    assert float(energy) == pytest.approx(float(dense.pow(2).sum()), rel=tol)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_partial_eigh_matches_torch_eigh(monkeypatch, dtype):
    """svd.top_eigh (LAPACK ?syevr when numpy's OpenBLAS is there) gives torch.linalg.eigh's
    top eigenpairs, also for zero, rank-deficient and repeated-eigenvalue matrices; with
    PARTIAL_EIGH off it is torch.linalg.eigh."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(120, 300, generator=gen, dtype=F64)
    low = torch.randn(120, 5, generator=gen, dtype=F64)
    Q = torch.linalg.qr(torch.randn(120, 120, generator=gen, dtype=F64))[0]
    repeated = (Q * torch.tensor([3.0] * 10 + [1.0] * 110, dtype=F64)) @ Q.T
    tol = 1e-10 if dtype == F64 else 2e-5
    for G in (X @ X.T, torch.zeros(120, 120, dtype=F64), low @ low.T, repeated):
        G = G.to(dtype)
        ref_w, ref_v = torch.linalg.eigh(G.double())
        for count in (1, 7, 30, 120):
            for partial in (True, False):
                monkeypatch.setattr(svd_mod, "PARTIAL_EIGH", partial)
                w, v = svd_mod.top_eigh(G.clone(), count)
                assert w.dtype == dtype and w.shape == (count,) and v.shape == (120, count)
                scale = max(float(ref_w[-1]), 1e-30)
                assert (w.double() - ref_w.flip(0)[:count]).abs().max() <= tol * scale
                vd = v.double()
                assert (vd.T @ vd - torch.eye(count, dtype=F64)).abs().max() < 100 * tol
                assert torch.linalg.norm(G.double() @ vd - vd * w.double()) <= 100 * tol * scale


def test_map_modules_gives_the_loop_and_restores_the_thread_settings(monkeypatch):
    """map_modules runs per-module work side by side on one intra-op thread each: results in
    the items' order, torch's and OpenBLAS's thread counts restored after (also when a worker
    raises), and FlexLoRA's aggregate identical to the one-module-at-a-time loop."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = threads.map_modules(lambda x: (x * x, torch.get_num_threads()), list(range(7)), "cpu")
        assert seen == [(x * x, 1) for x in range(7)]
        assert torch.get_num_threads() == 2
        lapack = threads.openblas()
        before = lapack[1]() if lapack is not None else None

        def boom(x):
            raise ValueError(f"bad module {x}")

        with pytest.raises(ValueError, match="bad module"):
            threads.map_modules(boom, [1, 2], "cpu")
        assert torch.get_num_threads() == 2
        if lapack is not None:
            assert lapack[1]() == before
        assert threads.map_modules(lambda x: torch.get_num_threads(), [1, 2], None) == [2, 2]  # mixed devices: a loop

        gen = torch.Generator().manual_seed(5)
        shapes = {f"l{i}.{kind}": shape for i in range(4) for kind, shape in (("q", (40, 36)), ("up", (40, 20)))}
        updates = [
            ClientUpdate(
                f"c{k}",
                10 + k,
                16.0,
                {m: (torch.randn(r, n, generator=gen), torch.randn(mm, r, generator=gen)) for m, (mm, n) in shapes.items()},
            )
            for k, r in enumerate((3, 9, 12, 5))
        ]  # Σr = 29: the factored route for q (min(m, n) = 36), the dense one for up (20)
        parallel = FlexLoRA().aggregate(updates)
        monkeypatch.setattr(agg.flexlora, "map_modules", lambda fn, items, device: [fn(i) for i in items])
        serial = FlexLoRA().aggregate(updates)
        assert parallel.keys() == serial.keys()
        for key in serial:
            assert torch.allclose(parallel[key], serial[key], rtol=1e-5, atol=1e-6), key
    finally:
        torch.set_num_threads(previous)
