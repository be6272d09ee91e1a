"""FedEx-LoRA (methods/fedex.py) and FLoRIST (methods/florist.py), each checked against the
numbers its authors' code produced (tests/fixtures/fedex_reference.json,
tests/fixtures/florist_reference.json: the source file and commit are in each fixture), against
its formula written out with dense torch ops, and against the plausible wrong rule; then a
streamed round against one aggregate call, a checkpoint and resume, the Flower codec and the
validation rules. (The shared round-1 start, the streamed server round and the Flower round of
every registered method are in test_comparison_fairness.py, test_streaming.py, test_flower.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import small_federation as fed
import torch

from flexlora.config import ConfigError, load_config
from flexlora.methods import FLoRA, make_method
from flexlora.methods.base import ClientUpdate
from flexlora.methods.fedex import FedEx
from flexlora.methods.florist import FLoRIST, threshold_rank
from flexlora.methods.helpers import zero_rank_state

F64 = torch.float64
FIXTURES = Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def rel(x, ref) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


ALPHA = 16.0


def updates(seed=0, ranks=None) -> list[ClientUpdate]:
    """Clients c0-c2 of the small federation's random updates."""
    return fed.random_updates(seed, ranks, clients=3)


def p_of(ups) -> list[float]:
    total = sum(u.num_examples for u in ups)
    return [u.num_examples / total for u in ups]


def exact_sum(ups, module) -> torch.Tensor:
    return sum(p * u.scale(module) * u.factors[module][1] @ u.factors[module][0] for p, u in zip(p_of(ups), ups))


def pad(t, size, dim):
    out = torch.zeros(*(size if d == dim else s for d, s in enumerate(t.shape)), dtype=t.dtype)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


# ---------------------------------------------------------------- FedEx-LoRA


def test_fedex_reproduces_the_authors_aggregate():
    """Their aggregate_models_ours on 3 clients at rank 2: the averaged A and B the clients start
    from and the base weights with the residual folded in, to float32 rounding. FedIT (the same
    averages, no residual) misses the base change, which is not small here."""
    ref = json.loads((FIXTURES / "fedex_reference.json").read_text())
    alpha, r = ref["lora_alpha"], ref["rank"]
    s = alpha / r
    method = FedEx()
    for name, module in ref["modules"].items():
        ups = [ClientUpdate(f"c{i}", 1, alpha, {name: (T(c["A"]), T(c["B"]))}) for i, c in enumerate(module["clients"])]
        state = method.aggregate(ups, zero_rank_state({name: tuple(module["shape"])}))
        A, B = method.client_factors(state, {name: r}, alpha)[name]
        torch.testing.assert_close(A, T(module["A_avg"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, T(module["B_avg"]), rtol=1e-5, atol=1e-6)
        base_before, base_after = T(module["base_before"]), T(module["base_after"])
        offset = method.base_offset(state)[name]
        torch.testing.assert_close(base_before + offset, base_after, rtol=1e-5, atol=1e-5)
        # The global model is the exact mean of the clients' updates on the original base.
        exact = base_before + s * sum(T(c["B"]) @ T(c["A"]) for c in module["clients"]) / len(ups)
        torch.testing.assert_close(base_after + s * B @ A, exact, rtol=1e-5, atol=1e-5)
        # The wrong rule (FedIT: no residual) leaves the base where it was.
        fedit = make_method("fedit").aggregate(ups, None)
        torch.testing.assert_close(fedit[f"{name}.A"], A)
        assert rel(base_before, base_after) > 0.05, "the fixture must tell FedEx from FedIT"


def test_fedex_heterogeneous_ranks_pad_the_averages_and_keep_the_global_model_exact():
    ups = updates()
    p = p_of(ups)
    method = FedEx()
    state = method.aggregate(ups, None)
    for module in fed.UPDATE_SHAPES:
        R = max(u.rank(module) for u in ups)
        A_bar = sum(pk * pad(u.factors[module][0], R, 0) for pk, u in zip(p, ups))
        B_bar = sum(pk * u.scale(module) * pad(u.factors[module][1], R, 1) for pk, u in zip(p, ups))
        assert rel(state[f"{module}.A"], A_bar) < 1e-12 and rel(state[f"{module}.B"], B_bar) < 1e-12
        exact = exact_sum(ups, module)
        assert rel(state[f"{module}.offset"], exact - B_bar @ A_bar) < 1e-12
        # The global model (offset + adapter) is the exact sum; the padded average alone (HetLoRA,
        # the wrong rule: no residual) is far from it.
        factors, ranks = method.global_factors(state, ALPHA)
        A, B = factors[module]
        assert ranks[module] == R
        assert rel(state[f"{module}.offset"] + (ALPHA / R) * B @ A, exact) < 1e-12
        assert rel(B_bar @ A_bar, exact) > 0.1
        # A client of rank r < R starts from the first r components, at its own scale.
        a, b = method.client_factors(state, {module: 2}, ALPHA)[module]
        assert rel(a, A_bar[:2]) < 1e-12 and rel((ALPHA / 2) * b, B_bar[:, :2]) < 1e-12


def test_fedex_offset_accumulates_over_rounds():
    method = FedEx()
    first = method.aggregate(updates(0), None)
    second = method.aggregate(updates(1), first)
    for module in fed.UPDATE_SHAPES:
        ups = updates(1)
        residual = exact_sum(ups, module) - second[f"{module}.B"] @ second[f"{module}.A"]
        assert rel(second[f"{module}.offset"], first[f"{module}.offset"] + residual) < 1e-12


def test_fedex_streamed_accumulator_equals_one_aggregate_call():
    """Raw weights normalised at the end, a zero weight, ranks that grow mid-round (the padded
    sums widen) and mixed float32 / float64 updates."""
    ups = updates(3)
    ups = [ups[1], ups[0], ups[2]]  # rank 5 first, then 2 / 3, then 8 / 2 on attn / mlp
    ups[1] = dataclasses.replace(ups[1], factors={m: (A.float(), B.float()) for m, (A, B) in ups[1].factors.items()})
    raw = [3.0, 0.0, 5.0]
    method = FedEx()
    previous = method.aggregate(updates(9), None)
    acc = method.accumulator(previous)
    for u, w in zip(ups, raw):
        acc.add(u, w)
    streamed = acc.result()
    at_once = method.aggregate([dataclasses.replace(u, weight=w / sum(raw)) for u, w in zip(ups, raw)], previous)
    assert streamed.keys() == at_once.keys()
    for key in at_once:
        torch.testing.assert_close(streamed[key].double(), at_once[key].double(), rtol=1e-6, atol=1e-6)


def test_fedex_validation_is_one_line():
    with pytest.raises(ValueError, match=r"^fedex: seed must be an integer, got 'x'$"):
        make_method("fedex", seed="x")
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method=fedex", "method_args={energy_threshold: 0.9}"])
    assert str(err.value).startswith("method_args: method 'fedex' has no argument 'energy_threshold'") and "\n" not in str(
        err.value
    )
    ups = updates()
    bad = dataclasses.replace(
        ups[1], factors={**ups[1].factors, "attn": (torch.randn(5, 15, dtype=F64), torch.randn(24, 5, dtype=F64))}
    )
    with pytest.raises(ValueError, match=r"client c1, module attn: weight shape \(24, 15\), others have \(24, 16\)"):
        FedEx().aggregate([ups[0], bad, ups[2]], None)


# ---------------------------------------------------------------- FLoRIST


def florist_fixture_updates(ref) -> list[ClientUpdate]:
    """Their clients: rank r_k on every module and lora_alpha = 2 r_k (their heterogeneous runs),
    so every scale is 2."""
    out = []
    for i, (r, n_ex) in enumerate(zip(ref["ranks"], ref["num_examples"])):
        factors = {name: (T(mod["clients"][i]["A"]), T(mod["clients"][i]["B"])) for name, mod in ref["modules"].items()}
        out.append(ClientUpdate(f"c{i}", n_ex, 2.0 * r, factors))
    return out


def test_florist_reproduces_the_authors_aggregate():
    """Their FedAvg(florist=True, heter=True) at four thresholds on three modules (two where the
    stack's rank R = 6 is below min(m, n): the factored route; one where it is not): the same
    global rank k and the same merged change of the base, s · B_g A_g (s = 2, the scale their
    merge applies)."""
    ref = json.loads((FIXTURES / "florist_reference.json").read_text())
    ups = florist_fixture_updates(ref)
    shapes = {name: tuple(mod["shape"]) for name, mod in ref["modules"].items()}
    ranks_seen = set()
    for run in ref["runs"]:
        method = FLoRIST(energy_threshold=run["threshold"])
        state = method.aggregate(ups, method.init_state(shapes))
        for name, theirs in run["modules"].items():
            assert int(state[f"{name}.global_rank"]) == theirs["global_rank"], (run["threshold"], name)
            merged = 2.0 * T(theirs["B"]) @ T(theirs["A"])
            assert rel(state[f"{name}.offset"], merged) < 1e-5, (run["threshold"], name)
            ranks_seen.add(theirs["global_rank"])
    assert len(ranks_seen) >= 4  # the thresholds pick different ranks: the fixture tests the rule


def test_florist_fixture_tells_the_rule_from_plausible_wrong_ones():
    """On the fixture's inputs, the wrong thresholding rules pick another global rank for some
    (module, τ), and the wrong stacks give another product: so the test above fails on each."""
    ref = json.loads((FIXTURES / "florist_reference.json").read_text())
    ups = florist_fixture_updates(ref)
    p = p_of(ups)
    wrong = {"sigma share (not sigma^2)": False, "one rank too many": False}
    for run in ref["runs"]:
        tau = run["threshold"]
        for name, theirs in run["modules"].items():
            S = torch.linalg.svdvals(exact_sum(ups, name))
            k = theirs["global_rank"]
            assert threshold_rank(S, tau) == k
            share = S.cumsum(0) / S.sum()
            wrong["sigma share (not sigma^2)"] |= int((share >= tau).nonzero()[0]) + 1 != k
            wrong["one rank too many"] |= min(k + 1, len(S)) != k
    assert all(wrong.values()), wrong
    name = next(iter(ref["modules"]))
    right = exact_sum(ups, name)
    unweighted = sum(u.scale(name) * u.factors[name][1] @ u.factors[name][0] for u in ups) / len(ups)
    weighted_twice = sum(pk * pk * u.scale(name) * u.factors[name][1] @ u.factors[name][0] for pk, u in zip(p, ups))
    assert rel(unweighted, right) > 0.05 and rel(weighted_twice, right) > 0.05


def test_florist_with_mixed_scales_is_the_thresholded_svd_of_the_exact_sum():
    """The library's scales s_k = α/r_k differ by rank: the merged pair is the best rank-k
    approximation of Σ p_k s_k B_k A_k, k from its σ² shares; clients start from a fresh LoRA
    at their own rank (the shared seeded rows, B = 0), whatever k is."""
    ups = updates(5)
    method = FLoRIST(energy_threshold=0.8)
    state = method.aggregate(ups, method.init_state(fed.UPDATE_SHAPES))
    for module in fed.UPDATE_SHAPES:
        exact = exact_sum(ups, module)
        U, S, Vh = torch.linalg.svd(exact)
        energy = S.square().cumsum(0) / S.square().sum()
        k = int((energy >= 0.8).nonzero()[0]) + 1
        assert 1 < k < min(exact.shape)
        assert int(state[f"{module}.global_rank"]) == k
        assert rel(state[f"{module}.offset"], (U[:, :k] * S[:k]) @ Vh[:k]) < 1e-10
        assert rel(state[f"{module}.offset"], exact) > 0.05  # truncated: not FLoRA
        A, B = method.client_factors(state, {module: 3}, ALPHA)[module]
        assert A.shape == (3, fed.UPDATE_SHAPES[module][1]) and not B.any()
    truncation = method.truncation(state, {})
    for kind, by_rank in truncation.items():
        for k, report in by_rank.items():
            assert report["kept"] >= 0.8 - 1e-12 and k == str(int(state[f"{kind}.global_rank"]))


def test_florist_threshold_one_is_flora_and_the_cap_binds():
    ups = updates(6)
    shapes_state = FLoRIST().init_state(fed.UPDATE_SHAPES)
    full = FLoRIST(energy_threshold=1.0).aggregate(ups, shapes_state)
    flora = FLoRA().aggregate(ups, FLoRA().init_state(fed.UPDATE_SHAPES))
    capped = FLoRIST(energy_threshold=1.0, max_global_rank=2).aggregate(ups, shapes_state)
    for module in fed.UPDATE_SHAPES:
        assert rel(full[f"{module}.offset"], flora[f"{module}.offset"]) < 1e-10
        assert int(capped[f"{module}.global_rank"]) == 2
        assert torch.linalg.matrix_rank(capped[f"{module}.offset"]) == 2


def test_florist_never_forms_delta_w_below_min_m_n(monkeypatch):
    """While R = Σ r_k < min(m, n) the SVD comes from the stacks (the dense kernel is never
    called); at R >= min(m, n) the core would be as large as ΔW, and the dense route is taken."""
    from flexlora.methods import svd

    calls = []
    original = svd.dense_svd
    monkeypatch.setattr(svd, "dense_svd", lambda dense, k: calls.append(dense.shape) or original(dense, k))
    method = FLoRIST()
    method.aggregate(updates(7, ranks={"attn": 3, "mlp": 2}), None)  # R = 9 < 16, R = 6 < 10
    assert calls == []
    method.aggregate(updates(7, ranks={"attn": 3, "mlp": 4}), None)  # mlp: R = 12 >= 10
    assert calls == [(10, 18)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"energy_threshold": 0}, "florist: energy_threshold must be a number in (0, 1], got 0"),
        ({"energy_threshold": 1.5}, "florist: energy_threshold must be a number in (0, 1], got 1.5"),
        ({"energy_threshold": float("nan")}, "florist: energy_threshold must be a number in (0, 1], got nan"),
        ({"energy_threshold": "0.9"}, "florist: energy_threshold must be a number in (0, 1], got '0.9'"),
        ({"energy_threshold": True}, "florist: energy_threshold must be a number in (0, 1], got True"),
        ({"max_global_rank": 0}, "florist: max_global_rank must be an integer >= 1 or null, got 0"),
        ({"max_global_rank": 2.5}, "florist: max_global_rank must be an integer >= 1 or null, got 2.5"),
        ({"seed": None}, "florist: seed must be an integer, got None"),
    ],
)
def test_florist_validation_is_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        make_method("florist", **kwargs)
    assert str(err.value) == message
    if (
        "energy_threshold" in kwargs
        and isinstance(kwargs["energy_threshold"], (int, float))
        and kwargs["energy_threshold"] == kwargs["energy_threshold"]
    ):
        with pytest.raises(ConfigError) as err:
            load_config(overrides=["method=florist", f"method_args={{energy_threshold: {kwargs['energy_threshold']}}}"])
        assert str(err.value) == f"method_args: {message}"


# ---------------------------------------------------------------- server: streaming, checkpoint, codec

ARGS = {"fedex": {}, "florist": {"energy_threshold": 0.85}}


@pytest.mark.parametrize("method", ["fedex", "florist"])
def test_checkpoint_and_resume_give_the_uninterrupted_global_model(method, tmp_path):
    straight, resumed = fed.resume_after_checkpoint(lambda: fed.make_server(method, **ARGS[method]), tmp_path)
    assert resumed.state.keys() == straight.state.keys()
    for key, value in straight.state.items():
        torch.testing.assert_close(resumed.state[key], value, rtol=1e-12, atol=1e-12)
    offsets = straight.base_offset()
    assert offsets and set(offsets) == set(fed.SHAPES) and all(o.abs().max() > 0 for o in offsets.values())


@pytest.mark.parametrize("method", ["fedex", "florist"])
def test_flower_codec_round_trip_keeps_factors_and_base_offset(method):
    from flexlora.engines.flower import codec

    server = fed.make_server(method, **ARGS[method])
    server.run_round(1, fed.SyntheticClients())
    task = server.configure(2, fed.CLIENTS[:1])[0]
    assert task.base_offset is not None and task.factors
    decoded, cfg = codec.decode_task(codec.encode_task(task, server.cfg))
    assert cfg.method == method and decoded.module_ranks == task.module_ranks
    for module, (A, B) in task.factors.items():
        assert torch.equal(decoded.factors[module][0], A.float()) and torch.equal(decoded.factors[module][1], B.float())
    for module, offset in task.base_offset.items():
        assert torch.equal(decoded.base_offset[module], offset.float())
    update = fed.trained(task)
    back = codec.decode_update(codec.encode_update(update, "float32"))
    assert back.client_id == update.client_id and back.num_examples == update.num_examples
    for module, (A, B) in update.factors.items():
        assert torch.equal(back.factors[module][0], A.float()) and torch.equal(back.factors[module][1], B.float())
