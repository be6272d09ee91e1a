"""Aggregation math, checked against formulas written out here with dense torch ops: FlexLoRA,
FedIT, the registry, and the shared helpers (methods/helpers.py). The SVD kernels and the
thread control are in tests/test_svd_kernels.py."""

from __future__ import annotations

import pytest
import torch

import flexlora.methods as agg
from flexlora.methods import METHODS, ClientUpdate, FedIT, FlexLoRA, helpers, make_method

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


def test_dense_delta_is_built_group_by_group():
    ups = hetero_updates(seed=2)
    weights = agg.data_weights(ups)
    for group_rank in (1, 7, 10_000):  # one client per product ... all clients in one product
        got = helpers.delta_matrix(ups, "attn", weights, group_rank=group_rank)
        assert rel(got, delta_formula(ups, "attn")) < 1e-12


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_nonfinite_finds_nan_and_inf_in_every_float_dtype(dtype):
    """The finiteness check sums in the tensor's own precision (float32 for 16-bit): NaN and
    Inf are found, and large finite values whose sum overflows are not called non-finite."""
    from flexlora.methods.helpers import nonfinite

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

    def drawn(count, n, seed, dtype):  # the rows without any cache
        gen = torch.Generator().manual_seed(seed)
        return ((torch.rand(count, n, generator=gen, dtype=F64) * 2 - 1) / n**0.5).to(dtype)

    helpers.clear_fresh_rows()
    for count in (8, 200, 30, 200, 1, 57):
        for dtype in (torch.float32, F64):
            rows = helpers.fresh_rows(count, 96, 11, dtype)
            assert torch.equal(rows, drawn(count, 96, 11, dtype)), (count, dtype)
            rows.fill_(7.0)  # a caller training its rows in place changes nothing cached
    assert torch.equal(helpers.fresh_rows(200, 96, 11, torch.float32), drawn(200, 96, 11, torch.float32))
    monkeypatch.setattr(helpers, "FRESH_ROWS_CACHE_BYTES", 3 * 50 * 96 * 4)
    for seed in range(10):
        helpers.fresh_rows(50, 96, seed, torch.float32)
    assert sum(t.numel() * t.element_size() for t in helpers._fresh_rows_cache.values()) <= helpers.FRESH_ROWS_CACHE_BYTES
    helpers.clear_fresh_rows()
    assert not helpers._fresh_rows_cache
