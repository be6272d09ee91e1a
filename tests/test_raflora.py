"""raFLoRA (arXiv 2602.13486): rank-partitioned aggregation, checked against the partition rule
written out with explicit bands and dense products, and against the rank-agnostic rule it
replaces (FlexLoRA's ΔW); plus the checks every method gets: round-1 start, streaming, checkpoint
and resume, the Flower codecs, validation."""

from __future__ import annotations

import dataclasses
import random

import pytest
import small_federation as fed
import torch

from flexlora.checkpoint import load_checkpoint
from flexlora.config import ConfigError, load_config
from flexlora.engines import flower
from flexlora.methods import METHODS, FlexLoRA, HetLoRA, make_method
from flexlora.methods.base import Accumulator, ClientUpdate
from flexlora.methods.flexlora import dense_delta
from flexlora.methods.raflora import RaFLoRA, coverage, partition_bands
from flexlora.server import FederatedServer

F64 = torch.float64
ALPHA = 16.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def raflora(**kwargs) -> RaFLoRA:
    return RaFLoRA(device=None, **kwargs)


# ---------------------------------------------------------------- the rule, by hand


def test_each_partition_is_averaged_over_the_clients_that_cover_it():
    """Partition [0, 1): both clients, p = (3/4, 1/4): 0.75·2 + 0.25·4 = 2.5. Partition [1, 2):
    only b covers it, its weight renormalised to 1: 8. The rank-agnostic rule (FlexLoRA's, and
    HetLoRA's zero padding) gives that partition 0.25·8 = 2 instead."""
    ups = fed.two_clients()
    state = raflora().aggregate(ups, None)
    expected = torch.diag(torch.tensor([2.5, 8.0, 0.0], dtype=F64))
    torch.testing.assert_close(dense_delta(state, "m"), expected, rtol=0, atol=1e-12)
    assert state["m.S"][:2].tolist() == pytest.approx([8.0, 2.5], abs=1e-12)
    rank_agnostic = dense_delta(FlexLoRA(device=None).aggregate(ups, None), "m")
    assert torch.allclose(rank_agnostic, torch.diag(torch.tensor([2.5, 2.0, 0.0], dtype=F64)), atol=1e-12)
    assert (dense_delta(state, "m") - rank_agnostic).abs().max() == pytest.approx(6.0)
    zero_padded = HetLoRA().aggregate(ups, None)
    assert (zero_padded["m.B"] @ zero_padded["m.A"])[1, 1] == pytest.approx(0.5)  # 0.25·(0.25·8)
    # SVD-based allocation: a rank-1 client gets the strongest direction, which only b trained.
    A, B = raflora().client_factors(state, {"m": 1}, ALPHA)["m"]
    torch.testing.assert_close((ALPHA / 1) * B @ A, torch.diag(torch.tensor([0.0, 8.0, 0.0], dtype=F64)), rtol=0, atol=1e-12)


def partition_rule(ups: list[ClientUpdate], module: str, sizes: list[float]) -> torch.Tensor:
    """The paper's rule as transcribed (Algorithm 1 / Eq. 8), with explicit bands: partitions
    [l, h) between the sorted distinct ranks, C_h = {k | r_k >= h}, N_h = Σ_{C_h} n_k,
    ΔW = Σ_h Σ_{k∈C_h} (n_k / N_h) s_k B_k[:, l:h] A_k[l:h]."""
    ranks = [u.factors[module][0].shape[0] for u in ups]
    edges = sorted(set(ranks))
    delta, low = 0, 0
    for high in edges:
        covering = [(u, n) for u, n, r in zip(ups, sizes, ranks) if r >= high]
        N = sum(n for _, n in covering)
        for u, n in covering:
            A, B = u.factors[module]
            delta = delta + (n / N) * (ALPHA / A.shape[0]) * B[:, low:high] @ A[low:high]
        low = high
    return delta


def test_matches_the_partition_rule_per_module_with_data_or_server_weights():
    ups = fed.random_updates()
    state = raflora().aggregate(ups, None)
    for module in fed.UPDATE_SHAPES:
        torch.testing.assert_close(
            dense_delta(state, module), partition_rule(ups, module, [u.num_examples for u in ups]), rtol=1e-10, atol=1e-10
        )
    # Weights the server assigned (e.g. a cap) replace n_k and are renormalised the same way.
    capped = [0.4, 0.3, 0.2, 0.1]
    state = raflora().aggregate([dataclasses.replace(u, weight=w) for u, w in zip(ups, capped)], None)
    for module in fed.UPDATE_SHAPES:
        torch.testing.assert_close(dense_delta(state, module), partition_rule(ups, module, capped), rtol=1e-10, atol=1e-10)
        flex = dense_delta(
            FlexLoRA(device=None).aggregate([dataclasses.replace(u, weight=w) for u, w in zip(ups, capped)], None), module
        )
        assert torch.linalg.norm(dense_delta(state, module) - flex) > 0.1 * torch.linalg.norm(flex)  # not the rank-agnostic rule


def test_bands_and_coverage():
    assert partition_bands([8, 200, 30, 8]) == [(0, 8), (8, 30), (30, 200)]
    assert coverage([1, 3, 2], [0.5, 0.25, 0.25]) == [1.0, 0.5, 0.25]
    assert coverage([], []) == []


def test_one_rank_is_flexlora():
    ups = fed.random_updates(ranks={"attn": 4, "mlp": 4})
    ra, flex = raflora().aggregate(ups, None), FlexLoRA(device=None).aggregate(ups, None)
    for module in fed.UPDATE_SHAPES:
        torch.testing.assert_close(dense_delta(ra, module), dense_delta(flex, module), rtol=1e-12, atol=1e-12)


def test_a_zero_weight_client_adds_nothing_and_uncovered_components_are_dropped():
    ups = fed.random_updates()
    weights = [0.5, 0.5, 0.0, 0.0]  # c2 alone has attn components 5..7, and its weight is 0
    state = raflora().aggregate([dataclasses.replace(u, weight=w) for u, w in zip(ups, weights)], None)
    kept = [ups[0], ups[1]]
    for module in fed.UPDATE_SHAPES:
        torch.testing.assert_close(dense_delta(state, module), partition_rule(kept, module, [0.5, 0.5]), rtol=1e-10, atol=1e-10)
        assert torch.isfinite(state[f"{module}.S"]).all()


def test_the_global_model_is_exposed_as_factors_and_clients_get_its_best_rank_r_approximation():
    ups = fed.random_updates()
    method = raflora()
    state = method.aggregate(ups, None)
    factors, ranks = method.global_factors(state, ALPHA)
    for module, (m, n) in fed.UPDATE_SHAPES.items():
        reference = partition_rule(ups, module, [u.num_examples for u in ups])
        A, B = factors[module]
        torch.testing.assert_close((ALPHA / ranks[module]) * B @ A, reference, rtol=1e-10, atol=1e-10)
        U, S, Vh = torch.linalg.svd(reference)
        for r in (1, 3, 5):
            A, B = method.client_factors(state, {module: r}, ALPHA)[module]
            assert A.shape == (r, n) and B.shape == (m, r)
            torch.testing.assert_close((ALPHA / r) * B @ A, (U[:, :r] * S[:r]) @ Vh[:r], rtol=1e-9, atol=1e-9)
    assert method.truncation(state, {"attn": {2, 8}})["attn"]["8"]["kept"] <= 1.0


def test_streamed_accumulator_equals_one_aggregate():
    """The round's Accumulator takes raw weights in any order; the result is aggregate() with
    the weights normalised."""
    ups = fed.random_updates(3)
    raw = [3.0, 1.0, 7.0, 2.0]
    method = raflora()
    accumulator = method.accumulator(None)
    assert type(accumulator) is Accumulator  # P_j needs the whole round
    order = list(range(len(ups)))
    random.Random(0).shuffle(order)
    for i in order:
        accumulator.add(ups[i], raw[i])
    streamed = accumulator.result()
    once = method.aggregate([dataclasses.replace(u, weight=w / sum(raw)) for u, w in zip(ups, raw)], None)
    for module in fed.UPDATE_SHAPES:
        torch.testing.assert_close(dense_delta(streamed, module), dense_delta(once, module), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- in a federation


def test_round_one_clients_share_one_starting_adapter():
    fed.assert_round_one_clients_share_one_start(["method=raflora"])


def test_a_streamed_server_round_equals_the_partition_rule():
    """The server folds updates one at a time with raw n_k; the global ΔW is the partition rule
    over that round's updates with p_k = n_k / Σ n."""
    server = fed.make_server("raflora")
    server.method.bound_ranks({m: min(s) for m, s in fed.SHAPES.items()})  # keep ΔW whole to compare it
    clients = fed.RecordingClients()
    for round_ in (1, 2):
        outcome = server.run_round(round_, clients)
        assert outcome.valid_updates == 5 and not outcome.rejected
        ups = [
            dataclasses.replace(u, factors={m: (A.double(), B.double()) for m, (A, B) in u.factors.items()}) for u in clients.seen
        ]
        for module in fed.SHAPES:
            assert len({u.rank(module) for u in ups}) > 1  # heterogeneous ranks in the round
            expected = partition_rule(ups, module, [u.num_examples for u in ups])
            torch.testing.assert_close(dense_delta(server.state, module).double(), expected, rtol=1e-4, atol=1e-5)


def test_checkpoint_and_resume_continue_to_the_same_state(tmp_path):
    uninterrupted, resumed = fed.resume_after_checkpoint(lambda: fed.make_server("raflora"), tmp_path)
    assert resumed.state.keys() == uninterrupted.state.keys()
    for key, value in uninterrupted.state.items():
        assert torch.equal(resumed.state[key], value), key
    wrong = FederatedServer(load_config(overrides=["method=flexlora"]), fed.CLIENTS, fed.SHAPES)
    with pytest.raises(ValueError, match="checkpoint is of method 'raflora', this run uses 'flexlora'"):
        load_checkpoint(tmp_path).restore(wrong)


def test_flower_codecs_round_trip_a_raflora_task_and_update():
    cfg = load_config(overrides=["method=raflora", "method_args={max_global_rank: 6}"])
    server = fed.make_server("raflora", max_global_rank=6)
    server.run_round(1, fed.SyntheticClients())
    task = server.configure(2, fed.CLIENTS[:1])[0]
    decoded, cfg2 = flower.decode_task(flower.encode_task(task, cfg))
    assert cfg2 == cfg and cfg2.method == "raflora" and cfg2.method_args == {"max_global_rank": 6}
    assert decoded.module_ranks == task.module_ranks and decoded.options == task.options
    for module, (A, B) in task.factors.items():
        assert torch.equal(decoded.factors[module][0], A) and torch.equal(decoded.factors[module][1], B)
    update = next(iter(fed.SyntheticClients().train([task])))
    back = flower.decode_update(flower.encode_update(update, "float32"))
    assert (back.client_id, back.num_examples, back.lora_alpha) == (update.client_id, update.num_examples, update.lora_alpha)
    assert all(torch.equal(back.factors[m][i], update.factors[m][i]) for m in update.factors for i in (0, 1))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "args, message",
    [
        ("{rank: 8}", "method 'raflora' has no argument 'rank'"),
        ("{svd_mode: magic}", "unknown svd_mode"),
        ("{max_global_rank: 0}", "max_global_rank must be >= 1"),
        ("{server_opt: {name: fedavgm}}", "server_opt is not available with method 'raflora'"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(args, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method=raflora", f"method_args={args}"])
    assert message in str(err.value) and str(err.value).startswith("method_args: ") and "\n" not in str(err.value)


def test_malformed_updates_are_one_line_errors():
    ups = fed.random_updates()
    A, B = ups[1].factors["attn"]
    bad = dataclasses.replace(ups[1], factors={**ups[1].factors, "attn": (A, B[:, :-1])})
    with pytest.raises(ValueError, match=r"client c1, module attn: need A \(r, n\) and B \(m, r\)") as err:
        raflora().aggregate([ups[0], bad], None)
    assert "\n" not in str(err.value)
    missing = dataclasses.replace(ups[1], factors={"attn": ups[1].factors["attn"]})
    with pytest.raises(ValueError, match="client c1 sent a different set of modules"):
        raflora().aggregate([ups[0], missing], None)
    with pytest.raises(ValueError, match="at least one client"):
        raflora().aggregate([], None)


def test_registered_without_client_hooks():
    assert METHODS["raflora"] is RaFLoRA and make_method("raflora", device=None).client_options(None, 1, "T1") == {}
    assert not RaFLoRA.prunes_ranks and not RaFLoRA.homogeneous
