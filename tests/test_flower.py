"""The Flower app without Flower's engines: codecs, node data, declared ranks, and the strategy
driven by Flower's own `Strategy.start` over an in-process grid that hands each Message to the
ClientApp directly (the Ray simulation and the TLS deployment have their own test files; the
streaming runtime over the grid is in tests/test_flower_grid.py)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from flexlora import lora, protocol
from flexlora.client import ClientTask
from flexlora.config import ConfigError, load_config
from flexlora.data.sources import load_federated_dataset
from flexlora.engines import flower
from flexlora.engines.local import LocalRuntime
from flexlora.methods import METHODS
from flexlora.models import TINY, default_target_modules, load_model
from flexlora.resources import adapter_training_bytes, declared_rank_type, module_ranks, paper_rank_types, rank_type_for_memory
from flexlora.server import FederatedServer


class InProcessGrid:
    """Delivers each Message straight to the ClientApp with the node's config: all at once
    (send_and_receive), or pushed and pulled (push_messages / pull_messages, the streaming
    runtime's): a pushed Message is answered when it is pulled, at most `per_pull` replies a
    pull, the most recently pushed first when `newest_first` (replies out of task order)."""

    pull_interval = 0.0  # the streaming runtime's sleep between polls

    def __init__(self, node_configs: dict[int, dict], per_pull: int | None = None, newest_first: bool = False):
        self.node_configs = node_configs
        self.per_pull, self.newest_first = per_pull, newest_first
        self.sent = []
        self.pushed: dict[str, object] = {}  # message id -> Message pushed and not answered yet
        self.most_unanswered = 0

    def get_node_ids(self):
        return list(self.node_configs)

    def _answer(self, m):
        node = m.metadata.dst_node_id
        ctx = Context(run_id=42, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={})
        return flower.client_app(m, ctx)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            replies.append(self._answer(m))
        return replies

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = mid = f"msg-{len(self.sent)}"  # as Flower's grids do
            self.sent.append(m)
            self.pushed[mid] = m
            self.most_unanswered = max(self.most_unanswered, len(self.pushed))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        ready = [mid for mid in self.pushed if mid in set(message_ids)]
        if self.newest_first:
            ready.reverse()
        return [self._answer(self.pushed.pop(mid)) for mid in ready[: self.per_pull]]


def _factors(ranks=(2, 5)):
    g = torch.Generator().manual_seed(0)
    return {f"layer.{i}.q_proj": (torch.randn(r, 12, generator=g), torch.randn(7, r, generator=g)) for i, r in enumerate(ranks)}


def test_factors_round_trip_exactly_in_float32_and_at_half_size_in_float16():
    factors = _factors()
    exact = flower.record_to_factors(flower.factors_to_record(factors, "float32"))
    half_record = flower.factors_to_record(factors, "float16")
    half = flower.record_to_factors(half_record)
    assert set(exact) == set(factors)
    for m, (a, b) in factors.items():
        assert torch.equal(exact[m][0], a) and torch.equal(exact[m][1], b)
        assert half[m][0].dtype == torch.float32  # back to float32 for the math
        assert torch.allclose(half[m][0], a, rtol=1e-3, atol=1e-3) and not torch.equal(half[m][0], a)
    assert {a.dtype for a in half_record.values()} == {"float16"}
    full = RecordDict({flower.FACTORS: flower.factors_to_record(factors, "float32")})
    assert flower.payload_bytes(RecordDict({flower.FACTORS: half_record})) * 2 == flower.payload_bytes(full)
    assert flower.payload_bytes(full) == sum(4 * (a.numel() + b.numel()) for a, b in factors.values())


def test_float16_overflow_is_an_error_not_an_infinity():
    with pytest.raises(ValueError, match="not finite as float16"):
        flower.factors_to_record({"m": (torch.full((1, 2), 1e6), torch.ones(2, 1))}, "float16")


def test_task_and_update_codecs_round_trip(tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["method=fedit", "method_args={}"])
    task = ClientTask("c-1", 3, "T2", {"layer.0.q_proj": 2, "layer.1.q_proj": 5}, _factors(), 1234, {"lambda": 0.1})
    decoded, cfg2 = flower.decode_task(flower.encode_task(task, cfg))
    assert cfg2 == cfg
    assert (decoded.client_id, decoded.round, decoded.rank_type, decoded.module_ranks, decoded.seed, decoded.options) == (
        "c-1",
        3,
        "T2",
        task.module_ranks,
        1234,
        {"lambda": 0.1},
    )
    assert all(torch.equal(decoded.factors[m][1], task.factors[m][1]) for m in task.factors)
    fresh, _ = flower.decode_task(flower.encode_task(ClientTask("c-2", 1, "T1", {"m": 2}, None, 1), cfg))
    assert fresh.factors is None  # first round: the client starts from PEFT's init


def test_node_data_from_json_jsonl_and_folder(tmp_path):
    rows = [
        {"instruction": "Reverse", "input": "a b", "output": "b a", "category": "reverse"},
        {"instruction": "Up", "output": "X"},
    ]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    folder = tmp_path / "site-a"
    folder.mkdir()
    (folder / "train.jsonl").write_text((tmp_path / "c.jsonl").read_text())
    (folder / "test.json").write_text(json.dumps(rows[:1]))
    for path, cid in ((tmp_path / "c.json", "c"), (tmp_path / "c.jsonl", "c"), (folder, "site-a")):
        data = flower.load_node_data(path)
        assert data.client_id == cid and data.num_examples == 2 and data.train[1].input == ""
    assert len(flower.load_node_data(folder).test) == 1
    assert flower.load_node_data(tmp_path / "c.json", client_id="hospital-3").client_id == "hospital-3"
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="bad.json: record 1 needs"):
        flower.load_node_data(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="data-path not found"):
        flower.load_node_data(tmp_path / "missing.json")


def test_a_node_declares_its_rank_by_rank_memory_or_type():
    shapes = {"a.q_proj": (256, 256), "a.up_proj": (688, 256)}
    types = paper_rank_types(2, 4, 4, 16, 16)
    assert declared_rank_type({}, shapes, types) is None  # the run's profile decides
    r6 = declared_rank_type({"lora-rank": 6}, shapes, types)
    assert module_ranks(r6, shapes) == {"a.q_proj": 6, "a.up_proj": 6}
    assert declared_rank_type({"rank-type": "T3"}, shapes, types) is types["T3"]
    # The largest type whose adapter training state fits the budget.
    need = {t: adapter_training_bytes(module_ranks(rt, shapes), shapes) for t, rt in types.items()}
    assert need["T1"] < need["T2"] == need["T3"] - 16 * 12 * (688 + 256) < need["T4"]
    assert rank_type_for_memory(need["T3"] / 2**20, shapes, types).name == "T3"
    assert rank_type_for_memory((need["T4"] - 1) / 2**20, shapes, types).name == "T3"
    assert declared_rank_type({"memory-budget-mb": 100}, shapes, types).name == "T4"
    with pytest.raises(ValueError, match="below the smallest rank type's need"):
        rank_type_for_memory(0.001, shapes, types)
    with pytest.raises(ValueError, match="declare one of"):
        declared_rank_type({"lora-rank": 4, "rank-type": "T1"}, shapes, types)
    with pytest.raises(ValueError, match="unknown rank-type 'T9'"):
        declared_rank_type({"rank-type": "T9"}, shapes, types)
    with pytest.raises(ValueError, match="lora-rank must be an integer"):
        declared_rank_type({"lora-rank": 0}, shapes, types)


def test_declared_types_override_the_profile_in_the_server(tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["resources.profile=homo"])
    shapes = {"a.q_proj": (256, 256), "a.up_proj": (688, 256)}
    rank_types = paper_rank_types(2, 4, 4, 16, 16)
    server = FederatedServer(cfg, ["x", "y"], shapes, {"y": rank_types["T3"]})
    assert server.client_types == {"x": "T1", "y": "T3"}
    assert server.client_ranks["y"] == {"a.q_proj": 4, "a.up_proj": 16}


@pytest.fixture
def tiny_federation(tiny_overrides):
    cfg = load_config(overrides=tiny_overrides + ["resources.profile=[T1, T3, T4]", "data.num_clients=3"])
    data = load_federated_dataset(cfg.data, cfg.seed)  # what each node loads for its partition
    model, _ = load_model(TINY, "cpu", seed=cfg.seed)
    shapes = lora.module_shapes(model, default_target_modules(model))
    return cfg, data, shapes


def test_strategy_runs_under_flowers_own_loop_with_each_client_at_its_rank(tiny_federation, run_identity):
    cfg, data, shapes = tiny_federation
    server = FederatedServer(cfg, [c.client_id for c in data.clients], shapes)
    grid = InProcessGrid({100 + i: {"partition-id": i} for i in range(3)})
    found = flower.discover(grid, cfg, min_nodes=3)
    assert {cid: info["node_id"] for cid, info in found.items()} == {c.client_id: 100 + i for i, c in enumerate(data.clients)}
    strategy = flower.FederatedStrategy(server, {cid: info["node_id"] for cid, info in found.items()})

    result = strategy.start(grid, ArrayRecord(), num_rounds=2)

    assert server.round == 2 and server.state is not None
    assert set(result.arrays) == set(server.state)  # Flower's result holds the global state
    assert result.train_metrics_clientapp[2]["clients"] == 3
    updates = {u.client_id: u for u in strategy.last_results}
    assert len(updates) == 3
    for cid, update in updates.items():
        # Every client trained and replied at its own ranks (T1=2, T3=4/16, T4=16 here).
        assert {m: a.shape[0] for m, (a, b) in update.factors.items()} == server.client_ranks[cid]
        assert update.metrics["bytes_up"] >= update.metrics["payload_bytes_up"] > 0
        assert update.metrics["bytes_down"] >= update.metrics["payload_bytes_down"] > 0  # round 2 sends factors
    t1, t3, t4 = (updates[c.client_id].metrics["payload_bytes_up"] for c in data.clients)
    assert t1 < t3 < t4
    # Round-2 messages carry each client's own slice of the global model, in its own shapes.
    round2 = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.group_id == "2"]
    for m in round2:
        task, _ = flower.decode_task(m.content)
        assert {k: a.shape[0] for k, (a, b) in task.factors.items()} == server.client_ranks[task.client_id]


def test_16_bit_transport_halves_the_payload(tiny_federation, run_identity):
    cfg, data, shapes = tiny_federation
    server = FederatedServer(cfg, [c.client_id for c in data.clients], shapes)
    grid = InProcessGrid({100 + i: {"partition-id": i} for i in range(3)})
    strategy = flower.FederatedStrategy(server, {c.client_id: 100 + i for i, c in enumerate(data.clients)})
    runtime = flower.FlowerRuntime(strategy, grid)
    server.aggregate(list(runtime.train(server.configure(1, server.sample(1)))))
    tasks = server.configure(2, server.sample(2))
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        cfg.flower.transport_dtype = dtype
        results[dtype] = list(runtime.train(tasks))
        for message in grid.sent[-3:]:  # the tasks just sent: one packed array, every factor in the transport dtype
            index = json.loads(message.content.config_records[flower.TASK][flower.INDEX])[flower.FACTORS]
            assert {dtype_ for _, dtype_, _, _ in index["tensors"]} == {dtype}
            assert list(message.content.array_records[flower.FACTORS].keys()) == [flower.PACKED]
    for half in ("float16", "bfloat16"):
        for r32, r16 in zip(results["float32"], results[half]):
            assert r16.metrics["payload_bytes_up"] * 2 == r32.metrics["payload_bytes_up"]
            assert r16.metrics["payload_bytes_down"] * 2 == r32.metrics["payload_bytes_down"]
            assert r16.metrics["bytes_up"] < 0.6 * r32.metrics["bytes_up"]
            assert r16.factors.keys() == r32.factors.keys()
            assert all(a.dtype == torch.float32 for a, _ in r16.factors.values())  # decoded for the math
            # Half precision on the wire changes training only slightly.
            assert r16.metrics["train_loss_last"] == pytest.approx(r32.metrics["train_loss_last"], rel=1e-2)


def _same_result(a, b):
    assert type(a) is type(b) and a.client_id == b.client_id
    if isinstance(a, protocol.ClientFailure):
        assert a.reason == b.reason
        return
    assert a.num_examples == b.num_examples and a.factors.keys() == b.factors.keys()
    # The same metrics, but measured times; the reply's JSON carries them, so its byte count
    # may differ by the digits of a time.
    measured = ("time_s", "_at", "transport_up_s", "transport_down_s")  # clocks, not results
    timeless = lambda m: {k: v for k, v in m.items() if not k.endswith(measured) and k != "bytes_up"}  # noqa: E731
    assert timeless(a.metrics) == timeless(b.metrics)
    assert abs(a.metrics["bytes_up"] - b.metrics["bytes_up"]) <= 16
    for m, (A, B) in a.factors.items():
        assert torch.equal(b.factors[m][0], A) and torch.equal(b.factors[m][1], B)


def test_the_streaming_runtime_gives_the_all_at_once_results(tiny_federation, run_identity):
    """Pushed one at a time and pulled as they come (here one reply a pull, the newest first,
    so out of task order), each task gives the same update, with the same bytes metrics, as
    the whole round sent with send_and_receive and collected at once."""
    cfg, data, shapes = tiny_federation
    ids = [c.client_id for c in data.clients]
    server = FederatedServer(cfg, ids, shapes)
    nodes = {cid: 100 + i for i, cid in enumerate(ids)}
    node_configs = {100 + i: {"partition-id": i} for i in range(3)}
    grid = InProcessGrid(node_configs, per_pull=1, newest_first=True)
    strategy = flower.FederatedStrategy(server, nodes)
    runtime = flower.FlowerRuntime(strategy, grid, max_in_flight=2)
    server.complete_round(1, tasks := server.configure(1, ids), list(runtime.train(tasks)))
    tasks = server.configure(2, ids)  # with factors: round 2 sends each client its slice
    messages = strategy.task_messages(tasks)
    sent = [flower.Sent.of(t.client_id, m) for t, m in zip(tasks, messages)]
    at_once = strategy.collect(sent, InProcessGrid(node_configs).send_and_receive(messages))
    streamed = list(runtime.train(tasks))
    assert [r.client_id for r in streamed] == [ids[1], ids[2], ids[0]]  # as they came
    assert all(isinstance(r, protocol.ClientUpdate) for r in at_once)
    assert at_once[0].metrics["payload_bytes_down"] > 0
    by_id = {r.client_id: r for r in streamed}
    for expected in at_once:
        _same_result(expected, by_id[expected.client_id])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_same_global_state_through_flower(method, tiny_overrides, run_identity):
    """The Flower path (messages pushed and pulled, ClientApp, codecs) changes nothing: two
    streamed rounds give the in-process runtime's global state exactly, for every registered
    aggregation method."""
    cfg = load_config(
        overrides=tiny_overrides
        + [
            f"method={method}",
            "data.num_clients=2",
            "federation.clients_per_round=2",
            "train.steps=1",
            "resources.profile=[T1, T4]",
        ]
    )
    data = load_federated_dataset(cfg.data, cfg.seed)
    model, tokenizer = load_model(TINY, "cpu", seed=cfg.seed)
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    ids = [c.client_id for c in data.clients]
    local, through_flower = FederatedServer(cfg, ids, shapes), FederatedServer(cfg, ids, shapes)
    runtimes = {
        id(local): LocalRuntime(model, tokenizer, data.clients, cfg, targets),
        id(through_flower): flower.FlowerRuntime(
            flower.FederatedStrategy(through_flower, {cid: 100 + i for i, cid in enumerate(ids)}),
            InProcessGrid({100 + i: {"partition-id": i} for i in range(len(ids))}),
        ),
    }
    for round_ in (1, 2):
        for server in (local, through_flower):
            outcome = server.run_round(round_, runtimes[id(server)])  # streamed, as run_rounds does
            assert outcome.valid_updates == 2 and not outcome.failures and not outcome.rejected
    assert local.state.keys() == through_flower.state.keys()
    for key, value in local.state.items():
        assert torch.equal(through_flower.state[key], value), key


def test_node_failures_are_dropouts_not_crashes(tiny_federation, run_identity, capsys):
    cfg, data, shapes = tiny_federation
    grid = InProcessGrid({100: {"partition-id": 0}, 101: {"partition-id": 1}, 102: {}})  # 102 names no data
    found = flower.discover(grid, cfg, min_nodes=3, echo=print)
    cfg.resources.profile = "uniform"
    assert sorted(found) == [data.clients[0].client_id, data.clients[1].client_id]
    assert "node 102 left out: ValueError: the node config names no data" in capsys.readouterr().out
    server = FederatedServer(cfg, sorted(found), shapes)
    nodes = {cid: info["node_id"] for cid, info in found.items()}
    grid.node_configs[101] = {"partition-id": 2}  # now holds another client than the server thinks
    results = list(flower.FlowerRuntime(flower.FederatedStrategy(server, nodes), grid).train(server.configure(1, sorted(found))))
    assert [type(r).__name__ for r in results] == ["ClientUpdate", "ClientFailure"]
    assert "reached the node holding" in results[1].reason
    with pytest.raises(RuntimeError, match="only 3 of 4 Flower nodes connected"):
        flower.wait_for_nodes(grid, 4, wait_s=0.1)


def test_run_config_of_a_deployment(tmp_path):
    (tmp_path / "exp.yaml").write_text("method: fedit\nfederation:\n  rounds: 7\n")
    cfg, resume = flower.config_from_run_config(
        {"config-file": str(tmp_path / "exp.yaml"), "overrides": "federation.rounds=2 'output.name=a b'", "resume": ""}
    )
    assert (cfg.method, cfg.federation.rounds, cfg.output.name, cfg.engine, resume) == ("fedit", 2, "a b", "flower", None)
    assert flower.config_from_run_config({})[0].method == "flexlora"
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method: fedit\n")
    cfg, resume = flower.config_from_run_config({"resume": str(run_dir), "overrides": "federation.rounds=9"})
    assert (cfg.method, cfg.federation.rounds, resume) == ("fedit", 9, run_dir)
    with pytest.raises(ConfigError, match="not a run folder"):
        flower.config_from_run_config({"resume": str(tmp_path)})


def test_flower_certs_command_writes_a_verifiable_chain_and_node_keys(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from flexlora.cli import main

    assert main(["flower-certs", "--out", str(tmp_path), "--host", "10.1.2.3", "--host", "link.example.org", "--nodes", "2"]) == 0
    assert "supernode-2" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    private = load_ssh_private_key((tmp_path / "supernode-1").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "supernode-1.pub").read_bytes())
    assert private.curve.name == "secp384r1" and private.public_key() == public
    assert (tmp_path / "supernode-1").stat().st_mode & 0o077 == 0  # private keys: owner only


@pytest.mark.parametrize(
    "override, message",
    [
        ("engine=ray", "engine: must be local or flower"),
        ("flower.transport_dtype=float64", "flower.transport_dtype: must be float32, float16 or bfloat16"),
        ("flower.workers=0", "flower.workers: must be >= 1"),
        ("flower.round_timeout_s=0", "flower.round_timeout_s: must be > 0"),
        ("flower.max_in_flight=0", "flower.max_in_flight: must be >= 1"),
    ],
)
def test_bad_flower_settings_are_one_line_errors(override, message):
    from flexlora.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_node_declaring_a_billion_examples_is_capped_and_one_claiming_more_than_it_declared_is_rejected(
    tiny_federation, run_identity
):
    """Through the ClientApp and the codecs: node 100's operator declares num-examples=10⁹ at
    discovery; with federation.max_weight_share=0.5 it gets weight 0.5 and the global state is
    the aggregate of the decoded replies with the bounded weights. Node 101 declared its true
    size but its reply then claims 10⁹: rejected, with the reason."""
    from flexlora.methods.flexlora import dense_delta

    cfg, data, shapes = tiny_federation
    cfg.federation.max_weight_share = 0.5
    grid = InProcessGrid({100: {"partition-id": 0, "num-examples": 10**9}, 101: {"partition-id": 1}, 102: {"partition-id": 2}})
    found = flower.discover(grid, cfg, min_nodes=3)
    ids = [c.client_id for c in data.clients]
    assert [found[c]["num_examples"] for c in ids] == [10**9, len(data.clients[1].train), len(data.clients[2].train)]
    server = FederatedServer(cfg, ids, shapes, declared_sizes={c: found[c]["num_examples"] for c in ids})
    server.method.bound_ranks({m: min(shape) for m, shape in shapes.items()})  # ΔW is read back whole below
    strategy = flower.FederatedStrategy(server, {c: found[c]["node_id"] for c in ids})
    runtime = flower.FlowerRuntime(strategy, grid)

    tasks = server.configure(1, ids)
    results = list(runtime.train(tasks))
    assert results[0].num_examples == 10**9  # what the node claims, and declared
    outcome = server.complete_round(1, tasks, results)
    n1, n2 = len(data.clients[1].train), len(data.clients[2].train)
    assert outcome.rejected == {}
    assert outcome.weights[ids[0]] == 0.5
    assert outcome.weights[ids[1]] == pytest.approx(0.5 * n1 / (n1 + n2)) and sum(outcome.weights.values()) == pytest.approx(1.0)
    for module in shapes:
        expected = sum(
            outcome.weights[u.client_id] * u.scale(module) * (u.factors[module][1].double() @ u.factors[module][0].double())
            for u in results
        )
        torch.testing.assert_close(dense_delta(server.state, module).double(), expected, rtol=1e-5, atol=1e-6)

    grid.node_configs[101]["num-examples"] = 10**9  # after discovery: claims more than it declared
    tasks = server.configure(2, ids)
    outcome = server.complete_round(2, tasks, runtime.train(tasks))
    assert outcome.rejected == {ids[1]: f"num_examples 1000000000 is above the {n1} this client declared"}
    assert set(outcome.weights) == {ids[0], ids[2]} and outcome.weights[ids[0]] == 0.5
