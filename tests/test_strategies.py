"""flexlora.strategies without Ray: Flower's own Strategy.start drives each strategy over a fake
Grid whose nodes are plain functions on tensors (they move the adapter they were sent). Checked:
each node is sent its own rank (FedIT: the federation's smallest), round 1 is the shared start,
the global update is the Aggregator's on the same replies (and FlexLoRA's formula by hand), the
base offset travels for FedEx-LoRA and FLoRIST, a broken reply is dropped with one line, and
where a node's rank comes from before its first reply."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional extra flexlora[flower]")
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flexlora import Aggregator, ranks_of
from flexlora.strategies import RANK_QUERY, STRATEGIES, HeteroRankStrategy

pytestmark = pytest.mark.usefixtures("one_thread", "run_identity")

ALPHA = 16.0
SHAPES = {"base_model.model.layers.0.q_proj": (24, 16), "base_model.model.layers.0.v_proj": (16, 16)}
NODES = {11: (4, 30), 22: (8, 10), 33: (2, 20)}  # node id -> (declared rank, num-examples)


def adapter(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (m, n) in SHAPES.items():
        out[f"{module}.lora_A.weight"] = torch.randn(rank, n, generator=g)
        out[f"{module}.lora_B.weight"] = torch.zeros(m, rank)
    return out


class FakeGrid:
    """Hands each Message to its node's function and keeps what was sent and answered."""

    def __init__(self, nodes: dict, break_reply=None, answers_query=None):
        self.nodes, self.break_reply, self.answers_query = nodes, break_reply, answers_query
        self.sent: list[Message] = []
        self.replies: list[tuple[int, dict, dict]] = []  # (node, state dict, metrics) of train replies

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.answer(m) for m in messages]

    def answer(self, m: Message) -> Message:
        self.sent.append(m)
        node = m.metadata.dst_node_id
        rank, n = self.nodes[node]
        if m.metadata.message_type == RANK_QUERY:
            if self.answers_query is not None and node not in self.answers_query:
                return Message(Error(code=0, reason="No query function registered with name 'lora_rank'"), reply_to=m)
            return Message(RecordDict({"metrics": MetricRecord({"lora-rank": rank})}), reply_to=m)
        received = m.content["arrays"].to_torch_state_dict()
        server_round = m.content["config"]["server-round"]
        g = torch.Generator().manual_seed(node * 100 + server_round)
        trained = {k: v + (0.1 if ".lora_B." in k else 0.01) * torch.randn(v.shape, generator=g) for k, v in received.items()}
        metrics = {"num-examples": n, "train-loss": float(node)}
        if self.break_reply is not None:
            trained, metrics = self.break_reply(node, server_round, trained, metrics)
        self.replies.append((node, trained, metrics))
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(metrics)}), reply_to=m)

    def train_messages(self, server_round: int) -> dict[int, Message]:
        return {
            m.metadata.dst_node_id: m
            for m in self.sent
            if m.metadata.message_type == "train" and m.content["config"]["server-round"] == server_round
        }


def run(method: str, grid: FakeGrid, rounds: int = 2, **kwargs) -> tuple[HeteroRankStrategy, object]:
    strategy = HeteroRankStrategy(method, lora_alpha=ALPHA, fraction_evaluate=0.0, min_available_nodes=len(grid.nodes), **kwargs)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter(6, seed=99)), num_rounds=rounds)
    return strategy, result


def replayed(method: str, grid: FakeGrid, rounds: int = 2) -> Aggregator:
    """The Aggregator fed the replies the nodes sent, round by round, in the order they came."""
    agg = Aggregator(method, lora_alpha=ALPHA)
    per_round = len(grid.replies) // rounds
    for r in range(rounds):
        for node, state_dict, metrics in grid.replies[r * per_round : (r + 1) * per_round]:
            agg.add(state_dict, num_examples=metrics["num-examples"], client_id=f"node {node}")
        agg.aggregate()
    return agg


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_each_node_gets_its_rank_and_the_global_update_is_the_aggregators(method):
    grid = FakeGrid(dict(NODES))
    strategy = STRATEGIES[method](lora_alpha=ALPHA, fraction_evaluate=0.0, min_available_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter(8, seed=99)), num_rounds=2)
    smallest = min(rank for rank, _ in NODES.values())
    for server_round in (1, 2):
        sent = grid.train_messages(server_round)
        assert set(sent) == set(NODES)
        for node, message in sent.items():
            want = smallest if method == "fedit" else NODES[node][0]
            assert set(ranks_of(message.content["arrays"].to_torch_state_dict()).values()) == {want}
            assert message.content["config"]["lora-rank"] == want
            assert message.content["config"]["lora-alpha"] == ALPHA
        if server_round == 1:  # the shared start: B = 0, A nested across ranks
            firsts = {node: m.content["arrays"].to_torch_state_dict() for node, m in sent.items()}
            big, small = firsts[22], firsts[33]
            for key, tensor in small.items():
                if ".lora_B." in key:
                    assert not tensor.any() and not big[key].any()
                else:
                    assert torch.equal(big[key][: tensor.shape[0]], tensor)

    expected = replayed(method, grid)
    global_adapter, _ = strategy.aggregator.global_adapter()
    want_adapter, _ = expected.global_adapter()
    assert global_adapter.keys() == want_adapter.keys() == result.arrays.keys()
    for key, tensor in want_adapter.items():
        assert torch.equal(global_adapter[key], tensor)
        assert torch.equal(result.arrays.to_torch_state_dict()[key], tensor.float())

    offset, want_offset = strategy.aggregator.base_offset(), expected.base_offset()
    round_two = grid.train_messages(2)
    if method in ("fedex", "florist"):  # round 2 was sent round 1's offset, one record for all
        assert want_offset and offset.keys() == want_offset.keys()
        for module in want_offset:
            assert torch.equal(offset[module], want_offset[module])
        records = {id(m.content["base-offset"]) for m in round_two.values()}
        assert len(records) == 1
        sent_offset = next(iter(round_two.values())).content["base-offset"].to_torch_state_dict()
        assert sent_offset.keys() == SHAPES.keys() and any(t.abs().max() > 0 for t in sent_offset.values())
    else:
        assert offset is None and all("base-offset" not in m.content for m in round_two.values())


def scaled(state_dict, module, alpha):
    """(α/r) B @ A of one module of an adapter state dict, in float64."""
    A, B = state_dict[f"{module}.lora_A.weight"].double(), state_dict[f"{module}.lora_B.weight"].double()
    return (alpha / A.shape[0]) * B @ A


def delta(state_dict, module):
    return scaled(state_dict, module, ALPHA)


def test_flexlora_global_update_is_the_formula_of_the_last_rounds_replies():
    grid = FakeGrid(dict(NODES))
    strategy, _ = run("flexlora", grid)
    last = grid.replies[len(NODES) :]
    total = sum(metrics["num-examples"] for _, _, metrics in last)
    global_adapter, ranks = strategy.aggregator.global_adapter()
    for module in SHAPES:
        exact = sum(metrics["num-examples"] / total * delta(sd, module) for _, sd, metrics in last)  # Σ p_k (α/r_k) B_k A_k
        torch.testing.assert_close(delta(global_adapter, module), exact, rtol=1e-5, atol=1e-6)
    # the next round would hand each node the best rank-r_k approximation of ΔW
    for node, (rank, _) in NODES.items():
        assert ranks_of(strategy.aggregator.client_adapter(strategy.node_ranks[node])) == dict.fromkeys(SHAPES, rank)


def test_a_broken_reply_is_dropped_with_one_line_and_the_round_goes_on(caplog):
    def break_reply(node, server_round, trained, metrics):
        if node == 22 and server_round == 2:
            trained = {
                k: (torch.full_like(v, float("nan")) if k.endswith("q_proj.lora_B.weight") else v) for k, v in trained.items()
            }
        if node == 33 and server_round == 2:
            metrics = {**metrics, "num-examples": 0}
        return trained, metrics

    grid = FakeGrid(dict(NODES), break_reply=break_reply)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, _ = run("flexlora", grid)
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2 and all("\n" not in line for line in dropped)
    assert any("node 22" in line and "q_proj.lora_B.weight' contains NaN" in line for line in dropped)
    assert any("node 33" in line and "'num-examples' must be a positive whole number" in line for line in dropped)
    # round 2 holds only node 11: ΔW is its own update
    sd = next(sd for node, sd, _ in grid.replies[len(NODES) :] if node == 11)
    global_adapter, _ = strategy.aggregator.global_adapter()
    for module in SHAPES:
        torch.testing.assert_close(delta(global_adapter, module), delta(sd, module), rtol=1e-5, atol=1e-6)


def test_where_a_nodes_rank_comes_from_before_its_first_reply():
    # ranks= answers for node 11; node 22 is asked; node 33 has no query handler: initial_arrays' rank (6)
    grid = FakeGrid(dict(NODES), answers_query={22})
    strategy, _ = run("hetlora", grid, rounds=1, ranks={11: 4})
    first = {
        node: set(ranks_of(m.content["arrays"].to_torch_state_dict()).values()) for node, m in grid.train_messages(1).items()
    }
    assert first == {11: {4}, 22: {8}, 33: {6}}
    asked = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == RANK_QUERY]
    assert sorted(asked) == [22, 33]  # node 11's rank was given

    # after a reply: the rank it declares, else the rank of what it sent (a HetLoRA node that pruned)
    def prune_or_declare(node, server_round, trained, metrics):
        if node == 11:
            return {k: (v[:2] if ".lora_A." in k else v[:, :2]) for k, v in trained.items()}, metrics
        if node == 22:
            return trained, {**metrics, "lora-rank": 6}
        return trained, metrics

    grid = FakeGrid(dict(NODES), break_reply=prune_or_declare)
    strategy, result = run("hetlora", grid, rounds=2)
    second = {
        node: set(ranks_of(m.content["arrays"].to_torch_state_dict()).values()) for node, m in grid.train_messages(2).items()
    }
    assert second == {11: {2}, 22: {6}, 33: {2}}
    assert "lora-rank" not in result.train_metrics_clientapp[2]  # a declaration, not a metric to average
    assert sum(m.metadata.message_type == RANK_QUERY for m in grid.sent) == 3  # asked once, in round 1


def test_evaluation_sends_each_node_the_global_model_at_its_rank():
    grid = FakeGrid(dict(NODES))
    strategy = HeteroRankStrategy("flexlora", lora_alpha=ALPHA, min_available_nodes=3)
    strategy.configure_train(1, ArrayRecord(adapter(8)), ConfigRecord(), grid)  # declares the modules
    strategy.node_ranks.update({11: 4, 22: 8, 33: 2})
    messages = strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord({"k": 1}), grid)
    assert {m.metadata.message_type for m in messages} == {"evaluate"}
    for m in messages:
        node = m.metadata.dst_node_id
        assert set(ranks_of(m.content["arrays"].to_torch_state_dict()).values()) == {NODES[node][0]}
        assert m.content["config"]["k"] == 1


def test_bad_setup_is_one_line():
    with pytest.raises(ValueError, match="'slora' has clients train the base weights"):
        HeteroRankStrategy("slora", lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        HeteroRankStrategy("flexlora", lora_alpha=0)
    with pytest.raises(ValueError, match="lora_alpha is required"):
        HeteroRankStrategy("flexlora", lora_alpha=None)
    strategy = HeteroRankStrategy("flexlora", lora_alpha=ALPHA)
    with pytest.raises(ValueError, match=r"initial_arrays must hold the clients' LoRA factors"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(dict(NODES)))


# -- the example app (examples/flower-peft) in Flower's simulation engine ----------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-peft"


def with_run_config(server_app, client_app, run_config: dict):
    """The example's apps with its pyproject's run config: ``run_simulation`` hands apps an empty
    one (``flwr run`` would read it from the pyproject). Closures, so that Ray ships them by value."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid, context):
        context.run_config.update(run_config)
        server_app(grid, context)

    def _handle(message, context):  # a node's run config is read-only: hand the app a Context with it
        from flwr.app import Context

        given = Context(context.run_id, context.node_id, context.node_config, context.state, dict(run_config), context.series_id)
        return client_app(message, given)

    client.train()(_handle)
    client.query("lora_rank")(_handle)
    return server, client


def test_the_example_app_on_flowers_simulation_engine(tmp_path, monkeypatch):
    """Two nodes at ranks 4 and 16, 2 rounds of FlexLoRA: each node is sent its own rank (round 2:
    the best rank-r approximation of round 1's ΔW), and the saved global update is
    ΔW = Σ p_k (α/r_k) B_k A_k of the last round's replies."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs Ray: pip install 'flwr[simulation]==1.41.*'")
    import ray
    from flwr.common.config import get_fused_config_from_dir
    from flwr.simulation import run_simulation
    from safetensors.torch import load_file

    for key, value in {
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    # The example's package, for this process and for Ray's workers (they start from this environment).
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH")])))
    from flower_peft import client_app, server_app

    sent, replies = {}, {}  # round -> {node: state dict}, round -> [(node, state dict, metrics)]
    configure, aggregate = HeteroRankStrategy.configure_train, HeteroRankStrategy.aggregate_train

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(configure(self, server_round, arrays, config, grid))
        sent[server_round] = {m.metadata.dst_node_id: m.content["arrays"].to_torch_state_dict() for m in messages}
        return messages

    def aggregate_train(self, server_round, got):
        got = list(got)
        replies[server_round] = [
            (r.metadata.src_node_id, r.content["arrays"].to_torch_state_dict(), dict(r.content["metrics"]))
            for r in got
            if not r.has_error()
        ]
        return aggregate(self, server_round, got)

    monkeypatch.setattr(HeteroRankStrategy, "configure_train", configure_train)
    monkeypatch.setattr(HeteroRankStrategy, "aggregate_train", aggregate_train)
    run_config = get_fused_config_from_dir(EXAMPLE, {"save-path": str(tmp_path / "global")})
    assert (run_config["method"], run_config["lora-ranks"], run_config["num-server-rounds"]) == ("flexlora", "4,16", 2)
    server, client = with_run_config(server_app.app, client_app.app, run_config)
    resources = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "object_store_memory": 256 * 2**20},
    }
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=2, backend_config=resources)
    finally:
        if ray.is_initialized():
            ray.shutdown()

    alpha = run_config["lora-alpha"]
    assert sorted(sent) == sorted(replies) == [1, 2]
    declared = {node: metrics["lora-rank"] for node, _, metrics in replies[1]}
    assert sorted(declared.values()) == [4, 16]
    for server_round in (1, 2):
        assert {node: set(ranks_of(sd).values()) for node, sd in sent[server_round].items()} == {
            n: {r} for n, r in declared.items()
        }
        assert {node: set(ranks_of(sd).values()) for node, sd, _ in replies[server_round]} == {
            n: {r} for n, r in declared.items()
        }

    def global_update(round_replies, module):  # Σ p_k (α/r_k) B_k A_k, p_k = n_k / Σ n
        total = sum(metrics["num-examples"] for _, _, metrics in round_replies)
        return sum(metrics["num-examples"] / total * scaled(sd, module, alpha) for _, sd, metrics in round_replies)

    modules = sorted(ranks_of(replies[2][0][1]))
    assert {metrics["num-examples"] for _, _, metrics in replies[2]} == {4, 8}  # the nodes weigh 1/3 and 2/3
    saved = load_file(tmp_path / "global" / "adapter_model.safetensors")
    adapter_config = json.loads((tmp_path / "global" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 20 and adapter_config["lora_alpha"] == alpha  # ΔW kept whole: rank 4 + 16
    for module in modules:
        torch.testing.assert_close(scaled(saved, module, alpha), global_update(replies[2], module), rtol=1e-4, atol=1e-6)
        U, S, Vh = torch.linalg.svd(global_update(replies[1], module))
        for node, rank in declared.items():  # what each node started round 2 from
            best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
            torch.testing.assert_close(scaled(sent[2][node], module, alpha), best, rtol=1e-4, atol=1e-6)
