"""Secure aggregation through Flower's own SecAgg+ (its SecAggPlusWorkflow, its secaggplus_mod
on our ClientApp), in this process: `SecAggGrid` delivers each message to the node's ClientApp
with a Context it keeps (SecAgg+ keeps its keys there between stages), as a SuperNode does.
Training is replaced by small_federation's seeded step, so the plain aggregate of the very same
updates is known: the server's state must equal it within the quantisation bound, the server
must receive masked vectors only, a client beyond the clipping range must not move the mean
beyond it, and a client that fails must drop out without stopping the others."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from small_federation import CLIENTS, SHAPES, trained

from flexlora.config import ExperimentConfig, ResourcesConfig, validate
from flexlora.engines.flower import codec
from flexlora.engines.flower.secagg import SecureFlowerRuntime
from flexlora.methods.flexlora import dense_delta
from flexlora.privacy.secagg import quantization_bound
from flexlora.server import FederatedServer

client_app_module = importlib.import_module("flexlora.engines.flower.client_app")
SecAggKeys = ("bytes_down", "bytes_up", "arrays_received", "masked_entries", "share_in_unmasked_range")
SIZES = dict(zip(CLIENTS, [100, 40, 100, 70, 10, 100, 55, 100]))  # unequal weights


def delivered(m: Message) -> Message:
    """The message as a node receives it: its own copy (over the wire each node gets one; the
    mod changes what it receives)."""
    c = m.content
    records = {**c.config_records, **c.array_records, **c.metric_records}
    content = RecordDict({name: type(r)(dict(r)) for name, r in records.items()})
    return Message(
        content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type, group_id=m.metadata.group_id
    )


class SecAggGrid:
    """Nodes in this process, each with the Context it keeps across messages; every reply the
    ServerApp gets is kept in `replies`."""

    def __init__(self, nodes):
        self.contexts = {n: Context(run_id=42, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = [client_app_module.client_app(delivered(m), self.contexts[m.metadata.dst_node_id]) for m in messages]
        self.replies += out
        return out


@pytest.fixture
def nodes_train(monkeypatch):
    """Nodes train with small_federation's seeded step (`broken`: client -> how its update is
    changed or that it raises); returns the updates they made, by client."""
    made = {}

    def setup(broken=None):
        def train_reply(content, node_config, model_for):
            task, _ = codec.decode_task(content)
            update = dataclasses.replace(trained(task), metrics={"train_loss_last": 0.5 + task.seed % 7})
            if broken and task.client_id in broken:
                update = broken[task.client_id](update)
            made[task.client_id] = update
            return codec.encode_update(update, "float32")

        monkeypatch.setattr(client_app_module, "train_reply", train_reply)
        return made

    return setup


def secure_server(method: str, *extra: tuple[str, object]) -> FederatedServer:
    cfg = ExperimentConfig(method=method, engine="flower")
    cfg.resources = ResourcesConfig(profile="uniform", t1=1, t2=2, t3_attention=3, t3_mlp=4, t4=6)
    cfg.federation.clients_per_round = 5
    cfg.flower.secure_aggregation = True
    cfg.eval.export_rank = 16  # FlexLoRA keeps ΔW whole (16 >= min(m, n)): its state is the mean itself
    for key, value in extra:
        setattr(cfg.flower, f"secagg_{key}", value)
    validate(cfg)
    return FederatedServer(cfg, CLIENTS, SHAPES, declared_sizes=SIZES)


def secure_round(server, grid=None):
    nodes = {cid: 100 + i for i, cid in enumerate(CLIENTS)}
    grid = grid or SecAggGrid(nodes.values())
    return server.run_round(1, SecureFlowerRuntime(server, nodes, grid, 60.0)), grid


def dense_mean(updates: dict, weights: dict) -> dict[str, torch.Tensor]:
    """Σ p_k s_k B_k A_k per module (float64), over the clients in `weights`."""
    total = sum(weights.values())
    return {
        m: sum(
            weights[c] / total * updates[c].scale(m) * updates[c].factors[m][1].double() @ updates[c].factors[m][0].double()
            for c in weights
        )
        for m in SHAPES
    }


@pytest.mark.usefixtures("run_identity")
@pytest.mark.parametrize("method", ["flexlora", "fedit"])
def test_the_state_equals_the_plain_aggregate_of_the_same_updates_within_the_quantisation_bound(method, nodes_train, one_thread):
    updates = nodes_train()
    c, q = 8.0, 2**22
    server = secure_server(method, ("clipping_range", c))
    outcome, _ = secure_round(server)
    assert not outcome.failures and sorted(outcome.metrics) == sorted(updates)
    sizes = {cid: SIZES[cid] for cid in updates}
    assert outcome.weights == pytest.approx({cid: n / sum(sizes.values()) for cid, n in sizes.items()})
    assert all(m["secagg_clipped_entries"] == 0 for m in outcome.metrics.values())
    total = sum(sizes.values())
    plain = server.method.aggregate([dataclasses.replace(u, weight=sizes[c_] / total) for c_, u in updates.items()], None)
    for module in SHAPES:
        if method == "flexlora":
            got, want = dense_delta(server.state, module).double(), dense_delta(plain, module).double()
            largest = max(
                u.scale(module) * float((u.factors[module][1] @ u.factors[module][0]).abs().max()) for u in updates.values()
            )
            pairs = [(got, want, largest)]
        else:  # FedIT: B is the mean of s·B over s, so its error is the bound over s
            s = updates[next(iter(updates))].scale(module)
            pairs = [
                (server.state[f"{module}.A"].double(), plain[f"{module}.A"].double(), 1.0),
                (s * server.state[f"{module}.B"].double(), s * plain[f"{module}.B"].double(), s),
            ]
        for got, want, largest in pairs:
            bound = quantization_bound(list(sizes.values()), c, q, max_abs=largest)
            error = float((got - want).abs().max())
            assert 0 < error < bound + 2e-7 * float(want.abs().max())  # + float32 rounding of the state
    assert outcome.rejected == {} and server.round == 1


@pytest.mark.usefixtures("run_identity")
def test_the_server_receives_masked_vectors_and_never_an_update(nodes_train, one_thread):
    updates = nodes_train()
    outcome, grid = secure_round(secure_server("flexlora"))
    masked, fitres = [], 0
    for reply in grid.replies:
        assert not reply.has_error()
        # No array anywhere: the FitRes parameters were cleared by the mod before the reply left.
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        config = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in config:
            fitres += 1
            masked += [bytes_to_ndarray(b) for b in config[Key.MASKED_PARAMETERS]][1:]
            # The rest of the reply: the weight the server assigned and the training's metrics.
            assert set(reply.content.config_records["fitres.metrics"]) == {"flexlora.metrics"}
    assert fitres == 5
    entries = np.concatenate([m.ravel() for m in masked])
    assert entries.size == 5 * sum(m * n for m, n in SHAPES.values())
    # Unmasked, an upload would be integers in 0..q (q = 2**22); masked they are spread over
    # 0..2**32: about 1 in 1024 falls in 0..q.
    assert (entries <= 2**22).mean() < 0.01 and entries.max() > 2**31
    for m in outcome.metrics.values():
        assert m["arrays_received"] == 0 and m["share_in_unmasked_range"] < 0.05
        assert m["bytes_up"] > m["masked_entries"] * 8 and m["bytes_down"] > 0  # int64 masked entries
    for cid, m in outcome.metrics.items():  # what else came back: the training's own metrics
        assert set(m) == {"train_loss_last", "secagg_clipped_entries", *SecAggKeys}
        assert m["train_loss_last"] == updates[cid].metrics["train_loss_last"]


@pytest.mark.usefixtures("run_identity")
def test_a_client_beyond_the_clipping_range_cannot_move_the_mean_beyond_it(nodes_train, caplog, one_thread):
    # FLoRA: its state's offset is this round's mean ΔW itself. One client's update is 10⁶ times
    # too large: far outside the clipping range c, which bounds each entry of its weighted upload.
    bad = "c01"  # sampled in round 1, weight 40 of the round's largest 100
    updates = nodes_train({bad: lambda u: dataclasses.replace(u, factors={m: (A, B * 1e6) for m, (A, B) in u.factors.items()})})
    server = secure_server("flora")
    c, q = server.cfg.flower.secagg_clipping_range, server.cfg.flower.secagg_quantization_range
    outcome, _ = secure_round(server)
    sizes = {cid: SIZES[cid] for cid in updates}
    assert bad in sizes and outcome.metrics[bad]["secagg_clipped_entries"] > 0
    assert "were clipped to flower.secagg_clipping_range" in caplog.text
    top, total = max(sizes.values()), sum(sizes.values())
    honest = dense_mean(updates, {cid: n for cid, n in sizes.items() if cid != bad})
    for module in SHAPES:
        got = server.state[f"{module}.offset"].double()
        # The bad client's weighted entries (w/max w)·x, clipped to [-c, c], over Σ w / max w:
        bad_x = updates[bad].scale(module) * updates[bad].factors[module][1].double() @ updates[bad].factors[module][0].double()
        clipped = (sizes[bad] / top * bad_x).clamp(-c, c) * top / total
        expected = honest[module] * (total - sizes[bad]) / total + clipped
        assert float((got - expected).abs().max()) < quantization_bound(list(sizes.values()), c, q, max_abs=c) + 1e-6
        # So it moves no entry by more than c · max w / Σ w, where its plain update moves them by up to ~10⁵.
        assert float((got - honest[module] * (total - sizes[bad]) / total).abs().max()) <= c * top / total + 1e-6
        assert float(dense_mean(updates, sizes)[module].abs().max()) > 1e3


@pytest.mark.usefixtures("run_identity")
def test_a_client_that_fails_drops_out_and_the_others_are_still_aggregated(nodes_train, one_thread):
    def crash(update):
        raise RuntimeError("out of memory (injected)")

    failing = "c04"  # sampled in round 1
    updates = nodes_train({failing: crash})
    server = secure_server("flora")
    outcome, _ = secure_round(server)
    assert set(outcome.failures) == {failing} and "out of memory (injected)" in outcome.failures[failing]
    assert "collect" in outcome.failures[failing]  # the stage it failed in
    survivors = {cid: SIZES[cid] for cid in outcome.metrics}
    assert len(survivors) == 4 and failing not in survivors
    assert outcome.weights == pytest.approx({cid: n / sum(survivors.values()) for cid, n in survivors.items()})
    # SecAgg+ removed the dropped client's masks from the others' shares: the mean of the four.
    expected = dense_mean(updates, survivors)
    c, q = server.cfg.flower.secagg_clipping_range, server.cfg.flower.secagg_quantization_range
    for module in SHAPES:
        error = float((server.state[f"{module}.offset"].double() - expected[module]).abs().max())
        assert error < quantization_bound(list(survivors.values()), c, q, max_abs=c) + 1e-6
