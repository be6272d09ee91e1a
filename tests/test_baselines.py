"""Baseline aggregation methods (HetLoRA, SLoRA, FLoRA, FFA-LoRA) and server optimizers,
each checked against its formula written out here with plain loops and dense torch ops."""

from __future__ import annotations

import pytest
import torch

from flexlora.config import ConfigError, load_config
from flexlora.methods import (
    METHODS,
    FedIT,
    FFALoRA,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    ServerOptimizer,
    SLoRA,
    SparseDelta,
    compose_method,
    make_method,
)
from flexlora.methods.base import ClientUpdate
from flexlora.methods.ffa import shared_A
from flexlora.methods.server_opt import ServerStep, starting_point

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def rel(x, ref) -> float:
    return (torch.linalg.norm(x - ref) / torch.linalg.norm(ref)).item()


SHAPES = {"attn": (24, 16), "mlp": (10, 18)}
CLIENTS = [("c0", 10, {"attn": 2, "mlp": 3}), ("c1", 50, {"attn": 5, "mlp": 5}), ("c2", 7, {"attn": 8, "mlp": 2})]
ALPHA = 16.0


def updates(seed=0, n_examples=None, ranks_override=None) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (cid, n_ex, ranks) in enumerate(CLIENTS):
        ranks = ranks_override or ranks
        factors = {}
        for module, (m, n) in SHAPES.items():
            r = ranks[module]
            factors[module] = (torch.randn(r, n, generator=gen, dtype=F64), torch.randn(m, r, generator=gen, dtype=F64))
        out.append(ClientUpdate(cid, n_examples[i] if n_examples else n_ex, ALPHA, factors))
    return out


def weighted_delta(ups, module, weights) -> torch.Tensor:
    return sum(
        w * (ALPHA / u.factors[module][0].shape[0]) * u.factors[module][1] @ u.factors[module][0] for w, u in zip(weights, ups)
    )


def data_p(ups):
    total = sum(u.num_examples for u in ups)
    return [u.num_examples / total for u in ups]


# ---------------------------------------------------------------- HetLoRA


def pad(t, size, dim):
    """Zero-pad t along dim to size, written with an explicit zeros + copy."""
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=t.dtype)
    if dim == 0:
        out[: t.shape[0]] = t
    else:
        out[:, : t.shape[1]] = t
    return out


@pytest.mark.parametrize("weighting", ["data", "sparsity"])
def test_hetlora_is_padded_weighted_average(weighting):
    ups = updates()
    method = HetLoRA(weighting=weighting)
    state = method.aggregate(ups, None)
    for module, (m, n) in SHAPES.items():
        R = max(u.factors[module][0].shape[0] for u in ups)
        if weighting == "data":
            w = data_p(ups)
        else:  # HetLoRA's sparsity weights: ∝ ‖s_k B_k A_k‖_F, with the dense product
            norms = [
                torch.linalg.norm((ALPHA / u.factors[module][0].shape[0]) * u.factors[module][1] @ u.factors[module][0]).item()
                for u in ups
            ]
            w = [v / sum(norms) for v in norms]
        A_ref = sum(wk * pad(u.factors[module][0], R, 0) for wk, u in zip(w, ups))
        B_ref = sum(wk * (ALPHA / u.factors[module][0].shape[0]) * pad(u.factors[module][1], R, 1) for wk, u in zip(w, ups))
        assert state[f"{module}.A"].shape == (R, n) and state[f"{module}.B"].shape == (m, R)
        assert rel(state[f"{module}.A"], A_ref) < 1e-12
        assert rel(state[f"{module}.B"], B_ref) < 1e-12
        # every client takes its first r rows / columns (B divided by its own scale)
        for r in (1, 2, 5, R):
            A, B = method.client_factors(state, {module: r}, ALPHA)[module]
            assert A.shape == (r, n) and B.shape == (m, r)
            assert torch.allclose(A, A_ref[:r], atol=1e-12)
            assert torch.allclose(B, B_ref[:, :r] / (ALPHA / r), atol=1e-12)
        # a rank above the state's: zero B columns (same product), fresh nonzero A rows
        A, B = method.client_factors(state, {module: R + 3}, ALPHA)[module]
        assert A.shape == (R + 3, n) and torch.all(B[:, R:] == 0) and torch.all(A[R:].abs().sum(1) > 0)
        assert rel((ALPHA / (R + 3)) * B @ A, B_ref @ A_ref) < 1e-12
    factors, ranks = method.global_factors(state, ALPHA)
    assert ranks == {"attn": 8, "mlp": 5}
    A, B = factors["attn"]
    assert rel((ALPHA / 8) * B @ A, state["attn.B"] @ state["attn.A"]) < 1e-12


def test_hetlora_one_rank_is_fedit():
    ups = updates(ranks_override={"attn": 4, "mlp": 4})
    het = HetLoRA().aggregate(ups, None)
    fed = FedIT().aggregate(ups, None)
    for module in SHAPES:
        assert rel(het[f"{module}.A"], fed[f"{module}.A"]) < 1e-12
        assert rel(het[f"{module}.B"] / (ALPHA / 4), fed[f"{module}.B"]) < 1e-12


def test_hetlora_options_and_validation():
    opts = HetLoRA(reg_lambda=0.01, reg_gamma=0.9, prune_threshold=0.1).client_options(None, 1, "T1")
    assert opts == {"rank_regularizer": {"lambda": 0.01, "gamma": 0.9, "prune_threshold": 0.1}}
    assert HetLoRA(reg_lambda=0).client_options(None, 1, "T1") == {}
    with pytest.raises(ValueError, match="reg_gamma"):
        HetLoRA(reg_gamma=1.5)
    with pytest.raises(ValueError, match="weighting"):
        HetLoRA(weighting="votes")


# ---------------------------------------------------------------- FLoRA


def test_flora_merges_exact_sum_into_the_base():
    method = FLoRA()
    ups1, ups2 = updates(seed=1), updates(seed=2, n_examples=[1, 1, 5])
    s1 = method.aggregate(ups1, None)
    s2 = method.aggregate(ups2, s1)
    for module in SHAPES:
        first = weighted_delta(ups1, module, data_p(ups1))
        second = weighted_delta(ups2, module, data_p(ups2))
        assert rel(method.base_offset(s1)[module], first) < 1e-12
        assert rel(method.base_offset(s2)[module], first + second) < 1e-12  # base + Σ rounds
    # A fresh LoRA each round, the same for every client: shared A rows (nested), B = 0.
    small, large = (
        method.client_factors(s2, {"attn": 4, "mlp": 4}, ALPHA),
        method.client_factors(s2, {"attn": 6, "mlp": 6}, ALPHA),
    )
    for module in SHAPES:
        assert torch.equal(small[module][0], large[module][0][:4]) and not small[module][1].any()
    assert method.global_factors(s2, ALPHA) == ({}, {})
    assert method.base_offset(None) is None


# ---------------------------------------------------------------- FFA-LoRA


def test_ffa_shared_A_is_nested_and_seeded():
    a8 = shared_A(3, "attn", 8, 16)
    a40 = shared_A(3, "attn", 40, 16)
    assert torch.equal(a40[:8], a8)
    assert not torch.equal(shared_A(4, "attn", 8, 16), a8)
    assert not torch.equal(shared_A(3, "mlp", 8, 16), a8)
    assert a8.abs().max() <= 1 / 16**0.5


def test_ffa_averages_B_and_is_exact():
    method = FFALoRA(seed=5)
    state0 = method.init_state(SHAPES)
    first = method.client_factors(state0, {"attn": 3, "mlp": 2}, ALPHA)
    assert torch.equal(first["attn"][0], shared_A(5, "attn", 3, 16).to(first["attn"][0]))
    assert torch.all(first["attn"][1] == 0)
    assert method.client_options(state0, 1, "T1") == {"freeze_A": True}
    # clients that (as told) kept A frozen: A_k = shared prefix, B_k trained
    gen = torch.Generator().manual_seed(0)
    ups = []
    for cid, n_ex, ranks in CLIENTS:
        f = {
            m: (shared_A(5, m, ranks[m], n, F64), torch.randn(SHAPES[m][0], ranks[m], generator=gen, dtype=F64))
            for m, (_, n) in SHAPES.items()
        }
        ups.append(ClientUpdate(cid, n_ex, ALPHA, f))
    state = method.aggregate(ups, state0)
    p = data_p(ups)
    for module, (_m, n) in SHAPES.items():
        R = max(u.rank(module) for u in ups)
        B_ref = sum(pk * (ALPHA / u.rank(module)) * pad(u.factors[module][1], R, 1) for pk, u in zip(p, ups))
        assert rel(state[f"{module}.B"], B_ref) < 1e-12
        # exact: the global product is the weighted sum of the clients' updates
        assert rel(state[f"{module}.B"] @ state[f"{module}.A"].double(), weighted_delta(ups, module, p)) < 1e-6
        for r in (1, R, R + 2):
            A, B = method.client_factors(state, {module: r}, ALPHA)[module]
            assert torch.equal(A, shared_A(5, module, r, n, A.dtype))
            k = min(r, R)
            assert torch.allclose(B[:, :k], B_ref[:, :k].to(B) / (ALPHA / r)) and torch.all(B[:, k:] == 0)


# ---------------------------------------------------------------- SLoRA


def sparse_update(cid, n_ex, gen, density=0.3) -> ClientUpdate:
    deltas = {}
    for module, (m, n) in SHAPES.items():
        idx = torch.nonzero(torch.rand(m * n, generator=gen) < density).squeeze(1)
        deltas[module] = SparseDelta(idx, torch.randn(len(idx), generator=gen, dtype=F64), (m, n))
    return ClientUpdate(cid, n_ex, ALPHA, {}, deltas=deltas)


def test_slora_sparse_stage_then_svd_start():
    method = SLoRA(sparse_rounds=2, densities={"T1": 0.05})
    assert method.client_options(None, 1, "T1") == {"sparse": {"density": 0.05, "seed": 0}}
    assert method.client_options(None, 1, "T4") == {"sparse": {"density": "lora_budget", "seed": 0}}
    gen = torch.Generator().manual_seed(0)
    round1 = [sparse_update("a", 3, gen), sparse_update("b", 1, gen)]
    round2 = [sparse_update("a", 3, gen), sparse_update("c", 6, gen, density=0.9)]
    s1 = method.aggregate(round1, None)
    assert method.in_sparse_stage(s1) and method.client_factors(s1, {"attn": 2}, ALPHA) is None
    expected = {}
    for module, (m, n) in SHAPES.items():
        # Σ p_k δ_k, with the dense scatter written out entry by entry
        total = torch.zeros(m * n, dtype=F64)
        for u, w in zip(round1, (3 / 4, 1 / 4)):
            for i, v in zip(u.deltas[module].indices.tolist(), u.deltas[module].values.tolist()):
                total[i] += w * v
        expected[module] = total.view(m, n)
        assert rel(method.base_offset(s1)[module], expected[module]) < 1e-12
    s2 = method.aggregate(round2, s1)  # the second sparse round ends stage 1
    assert not method.in_sparse_stage(s2) and method.base_offset(s2) is None
    assert method.client_options(s2, 3, "T1") == {}
    for module in SHAPES:
        offset = expected[module] + (3 / 9) * round2[0].deltas[module].to_dense() + (6 / 9) * round2[1].deltas[module].to_dense()
        U, S, Vh = torch.linalg.svd(offset)
        for r in (1, 3, 7):
            A, B = method.client_factors(s2, {module: r}, ALPHA)[module]
            best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart-Young: the best rank-r approximation of W − W₀
            assert rel((ALPHA / r) * B @ A, best) < 1e-10
    # stage 2 aggregates LoRA factors (zero-padded average by default)
    s3 = method.aggregate(updates(seed=4), s2)
    assert set(s3) == {f"{m}.{p}" for m in SHAPES for p in ("A", "B")}
    with pytest.raises(ValueError, match="sparse deltas received after"):
        method.aggregate(round1, s2)


def test_slora_validation():
    with pytest.raises(ValueError, match="sparse_rounds"):
        SLoRA(sparse_rounds=0)
    with pytest.raises(ValueError, match="density of T2"):
        SLoRA(densities={"T2": 1.5})
    with pytest.raises(ValueError, match="stage2"):
        SLoRA(stage2="fedsgd")


# ---------------------------------------------------------------- server optimizers


def stepped(method, step, ups, previous):
    """What the server does: the method's aggregation, then the server step from the clients' start."""
    start = None if previous is None else method.aggregate([starting_point(method, u, previous) for u in ups], previous)
    return step(method, start, method.aggregate(ups, previous))


def test_server_optimizer_formulas():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    d1, d2 = torch.tensor([0.1, 0.2, -0.3], dtype=F64), torch.tensor([-0.05, 0.2, 0.1], dtype=F64)
    # FedAvgM: v = μ v + Δ; x + η v
    opt, slots = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9), {}
    x1 = opt.step(x, d1, slots)
    x2 = opt.step(x1, d2, slots)
    assert torch.allclose(x2, x1 + 0.5 * (0.9 * d1 + d2))
    # FedAdam and FedYogi, written out element by element
    for name in ("fedadam", "fedyogi"):
        opt, slots = ServerOptimizer(name, lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3), {}
        m = [0.0] * 3
        v = [0.0] * 3
        xs = x.tolist()
        got = x
        for d in (d1, d2):
            got = opt.step(got, d, slots)
            for i, di in enumerate(d.tolist()):
                m[i] = 0.9 * m[i] + 0.1 * di
                if name == "fedadam":
                    v[i] = 0.99 * v[i] + 0.01 * di * di
                else:
                    sign = (v[i] - di * di > 0) - (v[i] - di * di < 0)
                    v[i] = v[i] - 0.01 * di * di * sign
                xs[i] = xs[i] + 0.01 * m[i] / (v[i] ** 0.5 + 1e-3)
        assert torch.allclose(got, torch.tensor(xs, dtype=F64), atol=1e-14), name


def test_identity_fedavgm_changes_nothing():
    for inner in (FlexLoRA(), FedIT()):
        ranks = {"attn": 4, "mlp": 4}
        step = ServerStep(ServerOptimizer("fedavgm", lr=1.0, momentum=0.0))
        s_plain = inner.aggregate(updates(seed=1, ranks_override=ranks), None)
        s_wrapped = stepped(inner, step, updates(seed=1, ranks_override=ranks), None)
        s_plain2 = inner.aggregate(updates(seed=2, ranks_override=ranks), s_plain)
        s_wrapped2 = stepped(inner, step, updates(seed=2, ranks_override=ranks), s_wrapped)
        fa, ra = inner.global_factors(s_plain2, ALPHA)
        fb, rb = inner.global_factors(s_wrapped2, ALPHA)
        assert ra == rb
        for module in SHAPES:
            assert rel(fb[module][1] @ fb[module][0], fa[module][1] @ fa[module][0]) < 1e-10


def test_fedadam_on_flexlora_steps_the_dense_delta():
    opt = ServerOptimizer("fedadam", lr=0.01, tau=1e-3)
    method, step = FlexLoRA(), ServerStep(opt)
    ups1, ups2 = updates(seed=1), updates(seed=2)
    s1 = stepped(method, step, ups1, None)  # the first aggregation is taken as is
    assert not step.moments
    s2 = stepped(method, step, ups2, s1)
    assert any(k.startswith("m/") for k in step.moments)
    for module, (m, n) in SHAPES.items():
        x1 = weighted_delta(ups1, module, data_p(ups1))
        # The step starts from what the clients started from: each its best rank-r_k slice of x1.
        U1, S1, Vh1 = torch.linalg.svd(x1)
        start = sum(p * (U1[:, : r[module]] * S1[: r[module]]) @ Vh1[: r[module]] for p, (*_, r) in zip(data_p(ups2), CLIENTS))
        delta = weighted_delta(ups2, module, data_p(ups2)) - start
        mom, sec = 0.1 * delta, 0.01 * delta**2
        x2 = start + 0.01 * mom / (sec.sqrt() + 1e-3)
        K = min(sum(r[module] for *_, r in CLIENTS), m, n)
        U, S, Vh = torch.linalg.svd(x2)
        best = (U[:, :K] * S[:K]) @ Vh[:K]  # the state keeps FlexLoRA's K triplets of the new ΔW
        A, B = method.client_factors(s2, {module: K}, ALPHA)[module]
        assert rel((ALPHA / K) * B @ A, best) < 1e-9
        # the method's state holds no optimizer keys
        assert set(method.global_factors(s2, ALPHA)[1]) == set(SHAPES)


def test_fedit_with_fedyogi_and_fedprox_options():
    method = compose_method("fedit", server_opt={"name": "fedyogi", "lr": 0.1}, fedprox_mu=0.01)
    assert isinstance(method.method, FedIT) and method.method.homogeneous and method.fedprox_mu == 0.01
    ranks = {"attn": 3, "mlp": 3}
    s1 = stepped(method.method, method.server_step, updates(seed=1, ranks_override=ranks), None)
    s2 = stepped(method.method, method.server_step, updates(seed=2, ranks_override=ranks), s1)
    A_avg = FedIT().aggregate(updates(seed=2, ranks_override=ranks), None)["attn.A"]
    d = A_avg - s1["attn.A"]
    assert torch.allclose(s2["attn.A"], s1["attn.A"] + 0.1 * (0.1 * d) / ((0.01 * d**2).sqrt() + 1e-6))
    assert torch.equal(method.method.client_factors(s2, ranks, ALPHA)["attn"][0], s2["attn.A"])
    het = compose_method("hetlora", fedprox_mu=0.5)
    assert het.fedprox_mu == 0.5 and het.server_step is None and "rank_regularizer" in het.method.client_options(None, 1, "T1")


@pytest.mark.parametrize(
    "args, message",
    [
        ("{server_opt: {name: fedsgd}}", "server_opt.name must be one of"),
        ("{server_opt: {name: fedadam, gamma: 1}}", "server_opt: unknown setting 'gamma'"),
        ("{server_opt: {name: fedadam, lr: -1}}", "server_opt.lr"),
        ("{fedprox_mu: -1}", "fedprox_mu must be a number >= 0"),
        ("{svd_mode: magic}", "unknown svd_mode"),
        ("{rank: 8}", "method 'flexlora' has no argument 'rank'"),
    ],
)
def test_method_args_errors_are_one_line(args, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"method_args={args}"])
    assert message in str(err.value) and str(err.value).startswith("method_args: ") and "\n" not in str(err.value)


def test_server_opt_only_with_flexlora_and_fedit():
    with pytest.raises(ConfigError, match="server_opt is not available with method 'hetlora'"):
        load_config(overrides=["method=hetlora", "method_args={server_opt: {name: fedavgm}}"])
    cfg = load_config(overrides=["method=slora", "method_args={sparse_rounds: 2, densities: {T1: 0.1}}"])
    assert cfg.method_args["sparse_rounds"] == 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_aggregating_no_update_is_a_one_line_error(name):
    method = make_method(name, **({"rank": 2} if name == "lora_a2" else {}))
    with pytest.raises(ValueError, match="^aggregation needs at least one client"):
        method.aggregate([], method.init_state({"m": (4, 3)}))
