"""HetLoRA's replication padding (Byun & Lee, NAACL 2025; `hetlora` argument padding=replication):
the components a low-rank client lacks are filled from the clients that have them, not with
zeros. Checked by hand, against the padding written out literally (fill, then average), against
zero padding (the default, unchanged), and in a federation: round-1 start, streaming,
checkpoint and resume, the Flower codecs, validation."""

from __future__ import annotations

import dataclasses
import random

import pytest
import small_federation as fed
import torch

from flexlora.config import ConfigError, load_config
from flexlora.engines import flower
from flexlora.methods import FedIT, HetLoRA
from flexlora.methods.base import ClientUpdate

F64 = torch.float64
ALPHA = 16.0


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def test_by_hand_replication_keeps_what_only_the_high_rank_client_has():
    """p = (3/4, 1/4). Row / column 0: both clients, 0.75·a + 0.25·b either way. Row / column 1:
    a is padded with b's own row (replication: 0.75·b₂ + 0.25·b₂ = b₂), not with zeros
    (0.25·b₂)."""
    replicated = HetLoRA(padding="replication").aggregate(fed.two_clients(), None)
    torch.testing.assert_close(replicated["m.A"], torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(replicated["m.B"], torch.tensor([[2.5, 0], [0, 8], [0, 0]], dtype=F64), rtol=0, atol=1e-15)
    zero = HetLoRA().aggregate(fed.two_clients(), None)
    torch.testing.assert_close(zero["m.A"], torch.tensor([[1.0, 0, 0], [0, 0.25, 0]], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(zero["m.B"], torch.tensor([[2.5, 0], [0, 2], [0, 0]], dtype=F64), rtol=0, atol=1e-15)
    # a rank-2 client starts from the replicated components (B divided by its own scale α/r)
    A, B = HetLoRA(padding="replication").client_factors(replicated, {"m": 2}, ALPHA)["m"]
    torch.testing.assert_close((ALPHA / 2) * B @ A, torch.diag(torch.tensor([2.5, 8.0, 0.0], dtype=F64)), rtol=0, atol=1e-12)


def replicate_then_average(ups: list[ClientUpdate], module: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The padding written out literally: every client's A (rows) and s·B (columns) filled up
    to R = max r_k, a missing component j taken from the weighted mean of the clients that
    have it; then the usual weighted average over all clients."""
    R = max(u.rank(module) for u in ups)
    scaled = [(u.factors[module][0], u.scale(module) * u.factors[module][1]) for u in ups]
    fill_A, fill_B = [], []
    for j in range(R):
        have = [(w, A, B) for w, (A, B) in zip(weights, scaled) if A.shape[0] > j]
        total = sum(w for w, _, _ in have)
        fill_A.append(sum(w * A[j] for w, A, _ in have) / total)
        fill_B.append(sum(w * B[:, j] for w, _, B in have) / total)
    A_avg = B_avg = 0
    for w, (A, B) in zip(weights, scaled):
        r = A.shape[0]
        A_full = torch.stack([A[j] if j < r else fill_A[j] for j in range(R)])
        B_full = torch.stack([B[:, j] if j < r else fill_B[j] for j in range(R)], dim=1)
        A_avg, B_avg = A_avg + w * A_full, B_avg + w * B_full
    return A_avg, B_avg


@pytest.mark.parametrize("weighting", ["data", "sparsity"])
def test_equals_the_padding_written_out_and_differs_from_zero_padding(weighting):
    ups = fed.random_updates()
    state = HetLoRA(weighting=weighting, padding="replication").aggregate(ups, None)
    zero = HetLoRA(weighting=weighting).aggregate(ups, None)
    for module in fed.UPDATE_SHAPES:
        if weighting == "data":
            weights = [u.num_examples / sum(v.num_examples for v in ups) for u in ups]
        else:  # HetLoRA's sparsity weights ∝ ‖s_k B_k A_k‖_F, per module
            norms = [torch.linalg.norm(u.scale(module) * u.factors[module][1] @ u.factors[module][0]).item() for u in ups]
            weights = [v / sum(norms) for v in norms]
        A_ref, B_ref = replicate_then_average(ups, module, weights)
        torch.testing.assert_close(state[f"{module}.A"], A_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state[f"{module}.B"], B_ref, rtol=1e-12, atol=1e-12)
        shared = min(u.rank(module) for u in ups)  # components every client has: as zero padding
        torch.testing.assert_close(state[f"{module}.A"][:shared], zero[f"{module}.A"][:shared], rtol=1e-12, atol=1e-12)
        assert torch.linalg.norm(state[f"{module}.A"][shared:] - zero[f"{module}.A"][shared:]) > 0.1 * torch.linalg.norm(
            A_ref[shared:]
        )


def test_zero_padding_stays_the_default_and_one_rank_is_fedit_either_way():
    assert HetLoRA().padding == "zero"
    ups = fed.random_updates(ranks={"attn": 4, "mlp": 4})
    fedit = FedIT().aggregate(ups, None)
    for padding in ("zero", "replication"):
        state = HetLoRA(padding=padding).aggregate(ups, None)
        for module in fed.UPDATE_SHAPES:
            torch.testing.assert_close(state[f"{module}.A"], fedit[f"{module}.A"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(state[f"{module}.B"] / (ALPHA / 4), fedit[f"{module}.B"], rtol=1e-12, atol=1e-12)


def test_a_zero_weight_client_is_not_replicated():
    ups = fed.random_updates()
    weights = [0.5, 0.5, 0.0, 0.0]  # c2 alone has attn rows 5..7, and its weight is 0
    state = HetLoRA(padding="replication").aggregate([dataclasses.replace(u, weight=w) for u, w in zip(ups, weights)], None)
    assert state["attn.A"].shape[0] == 8 and not state["attn.A"][5:].any() and not state["attn.B"][:, 5:].any()
    A_ref, _ = replicate_then_average(ups[:2], "attn", [0.5, 0.5])
    torch.testing.assert_close(state["attn.A"][:5], A_ref, rtol=1e-12, atol=1e-12)


def test_streamed_accumulator_equals_one_aggregate():
    ups = fed.random_updates(3)
    raw = [3.0, 1.0, 7.0, 2.0]
    method = HetLoRA(padding="replication")
    accumulator = method.accumulator(None)
    order = list(range(len(ups)))
    random.Random(0).shuffle(order)
    for i in order:
        accumulator.add(ups[i], raw[i])
    streamed = accumulator.result()
    once = method.aggregate([dataclasses.replace(u, weight=w / sum(raw)) for u, w in zip(ups, raw)], None)
    assert streamed.keys() == once.keys()
    for key in once:
        torch.testing.assert_close(streamed[key], once[key], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- in a federation


def test_round_one_clients_share_one_starting_adapter():
    server = fed.assert_round_one_clients_share_one_start(["method=hetlora", "method_args={padding: replication}"])
    assert server.method.padding == "replication"


def test_a_streamed_server_round_equals_the_padding_written_out():
    server = fed.make_server("hetlora", padding="replication", reg_lambda=0)
    clients = fed.RecordingClients()
    for round_ in (1, 2):
        outcome = server.run_round(round_, clients)
        seen = clients.seen
        assert outcome.valid_updates == 5 and not outcome.rejected
        weights = [u.num_examples / sum(v.num_examples for v in seen) for u in seen]
        for module in fed.SHAPES:
            assert len({u.rank(module) for u in seen}) > 1
            A_ref, B_ref = replicate_then_average(seen, module, weights)
            torch.testing.assert_close(server.state[f"{module}.A"], A_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(server.state[f"{module}.B"], B_ref, rtol=1e-5, atol=1e-6)


def test_checkpoint_and_resume_continue_to_the_same_state(tmp_path):
    uninterrupted, resumed = fed.resume_after_checkpoint(lambda: fed.make_server("hetlora", padding="replication"), tmp_path)
    assert resumed.state.keys() == uninterrupted.state.keys()
    for key, value in uninterrupted.state.items():
        assert torch.equal(resumed.state[key], value), key


def test_flower_codecs_carry_the_padding_argument():
    cfg = load_config(overrides=["method=hetlora", "method_args={padding: replication, weighting: sparsity}"])
    server = fed.make_server("hetlora", padding="replication", weighting="sparsity")
    server.run_round(1, fed.SyntheticClients())
    task = server.configure(2, fed.CLIENTS[:1])[0]
    decoded, cfg2 = flower.decode_task(flower.encode_task(task, cfg))
    assert cfg2 == cfg and cfg2.method_args == {"padding": "replication", "weighting": "sparsity"}
    assert decoded.options == task.options and decoded.module_ranks == task.module_ranks
    for module, (A, B) in task.factors.items():
        assert torch.equal(decoded.factors[module][0], A) and torch.equal(decoded.factors[module][1], B)
    update = next(iter(fed.SyntheticClients().train([task])))
    back = flower.decode_update(flower.encode_update(update, "float32"))
    assert all(torch.equal(back.factors[m][i], update.factors[m][i]) for m in update.factors for i in (0, 1))


@pytest.mark.parametrize("value", ["copy", "'Replication'", "1", "null"])
def test_a_bad_padding_is_a_one_line_config_error(value):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method=hetlora", f"method_args={{padding: {value}}}"])
    message = str(err.value)
    assert message.startswith("method_args: hetlora: padding must be one of zero, replication, got ") and "\n" not in message
    with pytest.raises(ValueError, match="hetlora: padding must be one of zero, replication"):
        HetLoRA(padding="zeros")
