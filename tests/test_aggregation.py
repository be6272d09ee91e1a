"""Aggregation math, checked against formulas written out here with dense torch ops."""

from __future__ import annotations

import pytest
import torch

import flexlora.methods as agg
from flexlora.methods import METHODS, ClientUpdate, FedIT, FlexLoRA, make_method, truncated_svd
from flexlora.methods import svd as svd_mod

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.norm(x - ref) / torch.linalg.norm(ref)).item()


def make_update(cid, n_examples, alpha, shapes_ranks, gen, dtype=F64) -> ClientUpdate:
    """shapes_ranks: module -> (m, n, r)."""
    factors = {}
    for module, (m, n, r) in shapes_ranks.items():
        A = torch.randn(r, n, generator=gen, dtype=dtype)
        B = torch.randn(m, r, generator=gen, dtype=dtype)
        factors[module] = (A, B)
    return ClientUpdate(client_id=cid, num_examples=n_examples, lora_alpha=alpha, factors=factors)


def delta_formula(updates: list[ClientUpdate], module: str) -> torch.Tensor:
    """ΔW = Σ_k (n_k / Σ n_j) · (α_k / r_k) · B_k A_k, one client at a time."""
    total = sum(u.num_examples for u in updates)
    out = 0
    for u in updates:
        A, B = u.factors[module]
        out = out + (u.num_examples / total) * (u.lora_alpha / A.shape[0]) * (B.double() @ A.double())
    return out


def optimal_error(dW: torch.Tensor, r: int) -> float:
    """‖ΔW − best rank-r approximation‖_F = sqrt(Σ_{i>r} σ_i²) (Eckart–Young)."""
    S = torch.linalg.svdvals(dW.double())
    return torch.linalg.norm(S[r:]).item()


# Two modules: R = 18 < min(m, n) on "attn", R = 18 >= min(m, n) = 12 on "mlp".
SHAPES = {"attn": (48, 32), "mlp": (12, 20)}
CLIENTS = [  # (id, n_examples, alpha, rank per module)
    ("c0", 10, 16.0, {"attn": 2, "mlp": 3}),
    ("c1", 50, 8.0, {"attn": 5, "mlp": 5}),
    ("c2", 7, 32.0, {"attn": 8, "mlp": 2}),
    ("c3", 100, 16.0, {"attn": 3, "mlp": 8}),
]


def hetero_updates(seed=0, dtype=F64, n_override=None) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for i, (cid, n_ex, alpha, ranks) in enumerate(CLIENTS):
        shapes = {mod: (*SHAPES[mod], ranks[mod]) for mod in SHAPES}
        n_ex = n_override[i] if n_override is not None else n_ex
        ups.append(make_update(cid, n_ex, alpha, shapes, gen, dtype))
    return ups


# ---------------------------------------------------------------- FlexLoRA


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("split", ["all_in_B", "sqrt"])
def test_single_client_gets_its_own_update_back(dtype, tol, split):
    gen = torch.Generator().manual_seed(1)
    r, alpha = 6, 16.0
    up = make_update("solo", 37, alpha, {"q": (40, 30, r)}, gen, dtype)
    method = FlexLoRA(split=split)
    state = method.aggregate([up], None)
    assert state["q.S"].shape == (r,)
    A, B = method.client_factors(state, {"q": r}, alpha)["q"]
    assert A.shape == (r, 30) and B.shape == (40, r)
    A0, B0 = up.factors["q"]
    assert rel((alpha / r) * B @ A, (alpha / r) * B0 @ A0) < tol
    # a client with another alpha gets factors scaled to the same product
    A, B = method.client_factors(state, {"q": r}, 4.0)["q"]
    assert rel((4.0 / r) * B @ A, (alpha / r) * B0 @ A0) < tol


@pytest.mark.parametrize("svd_mode", ["auto", "factored", "dense"])
@pytest.mark.parametrize("split", ["all_in_B", "sqrt"])
def test_client_slice_is_best_rank_r_approximation(svd_mode, split):
    ups = hetero_updates()
    method = FlexLoRA(svd_mode=svd_mode, split=split)
    state = method.aggregate(ups, None)
    for module, (m, n) in SHAPES.items():
        dW = delta_formula(ups, module)
        K = min(sum(r[module] for *_, r in CLIENTS), m, n)
        assert state[f"{module}.U"].shape == (m, K)
        assert state[f"{module}.Vh"].shape == (K, n)
        S = state[f"{module}.S"]
        assert torch.all(S[:-1] >= S[1:]), "singular values must be sorted descending"
        for r, alpha in [(1, 16.0), (2, 8.0), (4, 16.0), (7, 32.0), (K, 16.0), (K + 3, 16.0)]:
            A, B = method.client_factors(state, {module: r}, alpha)[module]
            assert A.shape == (r, n) and B.shape == (m, r)
            err = torch.linalg.norm(dW - (alpha / r) * B @ A).item()
            opt = optimal_error(dW, r)
            if opt > 1e-9 * torch.linalg.norm(dW):
                assert 1 - 1e-5 <= err / opt <= 1 + 1e-5, (module, r, err, opt)
            else:  # rank >= rank(ΔW): the slice must be ΔW itself
                assert err <= 1e-9 * torch.linalg.norm(dW).item(), (module, r, err)


def test_global_state_is_exact_delta():
    ups = hetero_updates(seed=3)
    method = FlexLoRA()
    state = method.aggregate(ups, None)
    factors, ranks = method.global_factors(state, 16.0)
    assert set(ranks) == set(SHAPES)
    for module in SHAPES:
        dW = delta_formula(ups, module)
        assert rel(agg.flexlora.dense_delta(state, module), dW) < 1e-10
        A, B = factors[module]
        K = ranks[module]
        assert A.shape[0] == K == B.shape[1] == state[f"{module}.S"].shape[0]
        assert rel((16.0 / K) * B @ A, dW) < 1e-10


def test_rank_above_K_pads_without_changing_the_product():
    gen = torch.Generator().manual_seed(4)
    up = make_update("a", 5, 16.0, {"q": (20, 16, 3)}, gen)
    method = FlexLoRA()
    state = method.aggregate([up], None)
    A, B = method.client_factors(state, {"q": 7}, 16.0)["q"]
    assert A.shape == (7, 16) and B.shape == (20, 7)
    assert torch.all(B[:, 3:] == 0)
    assert torch.all(A[3:].abs().sum(dim=1) > 0), "extra rows of A must be nonzero so they can learn"
    A0, B0 = up.factors["q"]
    assert rel((16.0 / 7) * B @ A, (16.0 / 3) * B0 @ A0) < 1e-10
    # deterministic, and a fresh copy each time
    A2, _ = method.client_factors(state, {"q": 7}, 16.0)["q"]
    assert torch.equal(A, A2)
    A2.zero_()
    assert state["q.Vh"].abs().sum() > 0


def test_max_global_rank_caps_state():
    ups = hetero_updates()
    method = FlexLoRA(max_global_rank=4)
    state = method.aggregate(ups, None)
    dW = delta_formula(ups, "attn")
    assert state["attn.S"].shape == (4,)
    A, B = method.client_factors(state, {"attn": 8}, 16.0)["attn"]
    err = torch.linalg.norm(dW - (16.0 / 8) * B @ A).item()
    assert err / optimal_error(dW, 4) == pytest.approx(1.0, abs=1e-8)


def test_weights_are_data_size_proportional():
    base_n = [c[1] for c in CLIENTS]
    method = FlexLoRA()
    s0 = method.aggregate(hetero_updates(n_override=base_n), None)
    doubled = list(base_n)
    doubled[1] *= 2
    ups2 = hetero_updates(n_override=doubled)
    s1 = method.aggregate(ups2, None)
    # the formula with p_k ∝ n_k, written out with the explicit numbers
    total = sum(doubled)
    for module in SHAPES:
        expected = 0
        for u, n_k in zip(ups2, doubled):
            A, B = u.factors[module]
            expected = expected + (n_k / total) * (u.lora_alpha / A.shape[0]) * (B @ A)
        got = agg.flexlora.dense_delta(s1, module)
        assert rel(got, expected) < 1e-10
        assert rel(got, agg.flexlora.dense_delta(s0, module)) > 1e-2  # and it did change
    # scaling every n_k by the same factor changes nothing
    s2 = method.aggregate(hetero_updates(n_override=[7 * n for n in base_n]), None)
    for module in SHAPES:
        assert rel(agg.flexlora.dense_delta(s2, module), agg.flexlora.dense_delta(s0, module)) < 1e-10


def test_zero_weight_client_is_ignored():
    ups = hetero_updates()
    zero = make_update("idle", 0, 16.0, {m: (*SHAPES[m], 4) for m in SHAPES}, torch.Generator().manual_seed(9))
    method = FlexLoRA()
    s_with = method.aggregate(ups + [zero], None)
    s_without = method.aggregate(ups, None)
    for key in s_without:
        assert s_with[key].shape == s_without[key].shape
    for module in SHAPES:
        assert rel(agg.flexlora.dense_delta(s_with, module), agg.flexlora.dense_delta(s_without, module)) < 1e-10


def test_sqrt_split_same_product_as_all_in_B():
    ups = hetero_updates(seed=5)
    state = FlexLoRA().aggregate(ups, None)
    full, root = FlexLoRA(split="all_in_B"), FlexLoRA(split="sqrt")
    for r in (1, 3, 9, 30):
        a = full.client_factors(state, {"attn": r, "mlp": r}, 16.0)
        b = root.client_factors(state, {"attn": r, "mlp": r}, 16.0)
        for module in SHAPES:
            (A1, B1), (A2, B2) = a[module], b[module]
            assert rel(B2 @ A2, B1 @ A1) < 1e-12
            assert not torch.allclose(A1, A2)  # really a different split


def test_none_state_means_fresh_init():
    # Only a caller that skips init_state gets None (the server always calls it).
    for method in (FlexLoRA(), FedIT()):
        assert method.client_factors(None, {"q": 8}, 16.0) is None


def test_flexlora_float32_clients_end_to_end():
    ups = hetero_updates(seed=6, dtype=torch.float32)
    method = FlexLoRA()
    state = method.aggregate(ups, None)
    assert state["attn.U"].dtype == torch.float32
    dW = delta_formula(ups, "attn")
    for r in (2, 6):
        A, B = method.client_factors(state, {"attn": r}, 16.0)["attn"]
        err = torch.linalg.norm(dW - (16.0 / r) * B.double() @ A.double()).item()
        assert err / optimal_error(dW, r) <= 1 + 1e-5


# ---------------------------------------------------------------- SVD kernels


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
        routes.append("certified" if certify_against is not None and out is not None else "rejected" if out is None else "float64 RR")
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


def test_dense_delta_is_built_group_by_group():
    ups = hetero_updates(seed=2)
    weights = agg.data_weights(ups)
    for group_rank in (1, 7, 10_000):  # one client per product ... all clients in one product
        got = agg.flexlora.delta_matrix(ups, "attn", weights, group_rank=group_rank)
        assert rel(got, delta_formula(ups, "attn")) < 1e-12


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


# ---------------------------------------------------------------- FedIT


def homo_updates(dtype=F64):
    gen = torch.Generator().manual_seed(8)
    shapes = {"q": (16, 12, 4), "v": (16, 12, 2)}
    return [make_update(f"c{i}", n, 16.0, shapes, gen, dtype) for i, n in enumerate([3, 9, 1])]


def test_fedit_is_weighted_mean():
    ups = homo_updates()
    method = FedIT()
    state = method.aggregate(ups, None)
    for module in ("q", "v"):
        A_ref = (3 * ups[0].factors[module][0] + 9 * ups[1].factors[module][0] + 1 * ups[2].factors[module][0]) / 13
        B_ref = (3 * ups[0].factors[module][1] + 9 * ups[1].factors[module][1] + 1 * ups[2].factors[module][1]) / 13
        assert torch.allclose(state[f"{module}.A"], A_ref, rtol=0, atol=1e-12)
        assert torch.allclose(state[f"{module}.B"], B_ref, rtol=0, atol=1e-12)
        assert state[f"{module}.alpha"].ndim == 0 and state[f"{module}.alpha"].item() == 16.0
    got = method.client_factors(state, {"q": 4, "v": 2}, 16.0)
    assert torch.equal(got["q"][0], state["q.A"]) and torch.equal(got["q"][1], state["q.B"])
    got["q"][0].zero_()  # a copy: training in place must not touch the state
    assert state["q.A"].abs().sum() > 0
    # another alpha: B is rescaled so the scaled product stays the same
    A8, B8 = method.client_factors(state, {"q": 4}, 8.0)["q"]
    assert rel((8.0 / 4) * B8 @ A8, (16.0 / 4) * state["q.B"] @ state["q.A"]) < 1e-12
    factors, ranks = method.global_factors(state, 16.0)
    assert ranks == {"q": 4, "v": 2}
    assert torch.equal(factors["v"][1], state["v.B"])


def test_fedit_float32():
    ups = homo_updates(torch.float32)
    state = FedIT().aggregate(ups, None)
    A_ref = sum(n * u.factors["q"][0].double() for n, u in zip([3, 9, 1], ups)) / 13
    assert state["q.A"].dtype == torch.float32
    assert rel(state["q.A"].double(), A_ref) < 1e-6


def test_fedit_rejects_mismatched_ranks_and_alphas():
    ups = homo_updates()
    gen = torch.Generator().manual_seed(0)
    odd = make_update("odd_one", 5, 16.0, {"q": (16, 12, 4), "v": (16, 12, 3)}, gen)
    with pytest.raises(ValueError, match=r"odd_one.*\bv\b|\bv\b.*odd_one"):
        FedIT().aggregate(ups + [odd], None)
    other_alpha = make_update("loud", 5, 32.0, {"q": (16, 12, 4), "v": (16, 12, 2)}, gen)
    with pytest.raises(ValueError, match="loud"):
        FedIT().aggregate(ups + [other_alpha], None)
    state = FedIT().aggregate(ups, None)
    with pytest.raises(ValueError, match="rank"):
        FedIT().client_factors(state, {"q": 8}, 16.0)


# ---------------------------------------------------------------- registry


def test_make_method():
    assert {"flexlora", "fedit"} <= set(METHODS)
    m = make_method("flexlora", split="sqrt", max_global_rank=8)
    assert isinstance(m, FlexLoRA) and m.split == "sqrt" and m.max_global_rank == 8
    assert isinstance(make_method("fedit"), FedIT)
    with pytest.raises(ValueError, match=r"unknown aggregation method 'nope'; choose from: .*fedit.*flexlora"):
        make_method("nope")


def test_register_method(monkeypatch):
    monkeypatch.setattr(agg, "METHODS", dict(agg.METHODS))

    @agg.register_method
    class Dummy:
        name = "dummy"

    assert isinstance(agg.make_method("dummy"), Dummy)
    with pytest.raises(ValueError, match="already registered"):
        agg.register_method(type("Other", (), {"name": "dummy"}))


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
        assert float(e_fast) == float(e_slow)


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
        seen = svd_mod.map_modules(lambda x: (x * x, torch.get_num_threads()), list(range(7)), "cpu")
        assert seen == [(x * x, 1) for x in range(7)]
        assert torch.get_num_threads() == 2
        lapack = svd_mod._syevr()
        before = lapack[1]() if lapack is not None else None

        def boom(x):
            raise ValueError(f"bad module {x}")

        with pytest.raises(ValueError, match="bad module"):
            svd_mod.map_modules(boom, [1, 2], "cpu")
        assert torch.get_num_threads() == 2
        if lapack is not None:
            assert lapack[1]() == before
        assert svd_mod.map_modules(lambda x: torch.get_num_threads(), [1, 2], None) == [2, 2]  # mixed devices: a loop

        gen = torch.Generator().manual_seed(5)
        shapes = {f"l{i}.{kind}": shape for i in range(4) for kind, shape in (("q", (40, 36)), ("up", (40, 20)))}
        updates = [
            ClientUpdate(f"c{k}", 10 + k, 16.0, {m: (torch.randn(r, n, generator=gen), torch.randn(mm, r, generator=gen))
                                                for m, (mm, n) in shapes.items()})
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_nonfinite_finds_nan_and_inf_in_every_float_dtype(dtype):
    """The finiteness check sums in the tensor's own precision (float32 for 16-bit): NaN and
    Inf are found, and large finite values whose sum overflows are not called non-finite."""
    from flexlora.methods.base import nonfinite

    big = torch.finfo(dtype).max / 4
    t = torch.full((64, 64), big, dtype=dtype)  # its sum overflows in the tensor's precision
    assert nonfinite(t) is None
    assert nonfinite(torch.zeros(0, 3, dtype=dtype)) is None
    t[3, 5] = float("nan")
    assert nonfinite(t) == "contains NaN"
    t[3, 5] = float("-inf")
    assert nonfinite(t) == "contains Inf"


def test_fresh_rows_answers_from_its_cache_exactly_and_within_its_bound(monkeypatch):
    """fresh_rows's cache gives what a new draw gives (fewer rows of a seed are a prefix of
    more), in any order of requests; every result is a copy; the cache stays under its byte
    bound; clear_fresh_rows empties it."""
    from flexlora.methods import base

    def drawn(count, n, seed, dtype):  # the rows without any cache
        gen = torch.Generator().manual_seed(seed)
        return ((torch.rand(count, n, generator=gen, dtype=F64) * 2 - 1) / n**0.5).to(dtype)

    base.clear_fresh_rows()
    for count in (8, 200, 30, 200, 1, 57):
        for dtype in (torch.float32, F64):
            rows = base.fresh_rows(count, 96, 11, dtype)
            assert torch.equal(rows, drawn(count, 96, 11, dtype)), (count, dtype)
            rows.fill_(7.0)  # a caller training its rows in place changes nothing cached
    assert torch.equal(base.fresh_rows(200, 96, 11, torch.float32), drawn(200, 96, 11, torch.float32))
    monkeypatch.setattr(base, "FRESH_ROWS_CACHE_BYTES", 3 * 50 * 96 * 4)
    for seed in range(10):
        base.fresh_rows(50, 96, seed, torch.float32)
    assert sum(t.numel() * t.element_size() for t in base._fresh_rows_cache.values()) <= base.FRESH_ROWS_CACHE_BYTES
    base.clear_fresh_rows()
    assert not base._fresh_rows_cache
