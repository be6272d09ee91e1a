"""Fault injection at the server, without a model: malformed updates are rejected with a reason
while the round still completes from the valid ones; too few valid updates keep the previous
state; checkpoints round-trip and are atomic. Runs in a few seconds. Claimed dataset sizes and
the cap on a client's weight are in tests/test_weight_cap.py, on the servers and clients here."""

from __future__ import annotations

import dataclasses
import math
import random
import types
from typing import NamedTuple

import pytest
import torch

import flexlora.checkpoint as checkpoint_module
from flexlora.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from flexlora.config import ExperimentConfig, ResourcesConfig, validate
from flexlora.methods import FlexLoRA, make_method
from flexlora.methods.base import ClientUpdate
from flexlora.server import ClientFailure, FederatedServer, run_rounds
from flexlora.validation import norm_outliers, update_norm, validate_round

SHAPES = {"l0.q_proj": (8, 6), "l0.gate_proj": (12, 6), "l1.q_proj": (8, 6)}
CLIENTS = [f"c{i}" for i in range(4)]
BAD = "c1"


def make_server(method="flexlora", rounds=2, **federation) -> FederatedServer:
    cfg = ExperimentConfig(method=method)
    cfg.resources = ResourcesConfig(profile=["T1", "T2", "T3", "T4"], t1=2, t2=3, t3_attention=3, t3_mlp=5, t4=5)
    cfg.federation.rounds = rounds
    cfg.federation.clients_per_round = len(CLIENTS)
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    validate(cfg)
    return FederatedServer(cfg, CLIENTS, SHAPES)


def honest_update(task) -> ClientUpdate:
    """A plausible trained update: the factors the server sent (or a fresh init) plus a step."""
    g = torch.Generator().manual_seed(task.seed)
    factors = {}
    for module, r in task.module_ranks.items():
        m, n = SHAPES[module]
        if task.factors is None:
            A, B = torch.randn(r, n, generator=g) * 0.3, torch.zeros(m, r)
        else:
            A, B = (t.clone() for t in task.factors[module])
        factors[module] = (A + 0.01 * torch.randn(r, n, generator=g), B + 0.05 * torch.randn(m, r, generator=g))
    return ClientUpdate(task.client_id, 10 + int(task.client_id[1:]), 16.0, factors, {"train_loss_last": 1.0})


class FakeRuntime:
    """Honest clients, except that `tamper(update, task)` rewrites what client BAD sends."""

    def __init__(self, tamper=None):
        self.tamper = tamper
        self.honest: dict[str, ClientUpdate] = {}

    def train(self, tasks):
        results = []
        for task in tasks:
            self.round = task.round
            if task.options.get("inject_failure"):
                results.append(ClientFailure(task.client_id, "InjectedFailure"))
                continue
            update = self.honest[task.client_id] = honest_update(task)
            if self.tamper is not None and task.client_id == BAD:
                out = self.tamper(update, task)
                results.extend(out if isinstance(out, list) else [out])
            else:
                results.append(update)
        return results


def with_factors(update, fn):
    """A copy of `update` whose factors are fn(module, A, B) -> (A, B)."""
    return dataclasses.replace(update, factors={m: fn(m, A, B) for m, (A, B) in update.factors.items()})


def first_module_only(fn):
    first = sorted(SHAPES)[0]
    return lambda m, A, B: fn(A, B) if m == first else (A, B)


def extra_module(u, t):
    factors = dict(u.factors)
    factors["l9.v_proj"] = (torch.zeros(2, 6), torch.zeros(8, 2))
    return dataclasses.replace(u, factors=factors)


def missing_module(u, t):
    factors = dict(u.factors)
    factors.pop(sorted(factors)[-1])
    return dataclasses.replace(u, factors=factors)


def set_value(which, value):
    def fn(A, B):
        A, B = A.clone(), B.clone()
        (A if which == "A" else B)[0, 0] = value
        return A, B

    return fn


# (kind, tamper, rejected client key, reason substring, valid updates left)
MALFORMED = [
    ("missing module", missing_module, BAD, "missing 1 module(s)", 3),
    ("extra module", extra_module, BAD, "unexpected module(s), e.g. l9.v_proj", 3),
    ("empty update", lambda u, t: dataclasses.replace(u, factors={}), BAD, "empty update", 3),
    ("zero-rank factors", lambda u, t: with_factors(u, lambda m, A, B: (A[:0], B[:, :0])), BAD, "empty factors", 3),
    (
        "wrong input dim",
        lambda u, t: with_factors(u, first_module_only(lambda A, B: (torch.zeros(A.shape[0], 7), B))),
        BAD,
        "do not fit weight",
        3,
    ),
    (
        "wrong output dim",
        lambda u, t: with_factors(u, first_module_only(lambda A, B: (A, torch.zeros(3, B.shape[1])))),
        BAD,
        "do not fit weight",
        3,
    ),
    (
        "A/B rank mismatch",
        lambda u, t: with_factors(u, first_module_only(lambda A, B: (A, B[:, :-1]))),
        BAD,
        "do not fit weight",
        3,
    ),
    (
        "rank above assigned",
        lambda u, t: with_factors(u, lambda m, A, B: (torch.cat([A, A[:1]]), torch.cat([B, B[:, :1]], dim=1))),
        BAD,
        "above the assigned rank",
        3,
    ),
    ("not 2-D", lambda u, t: with_factors(u, first_module_only(lambda A, B: (A[None], B))), BAD, "must be 2-D", 3),
    ("NaN", lambda u, t: with_factors(u, first_module_only(set_value("A", math.nan))), BAD, "A contains NaN", 3),
    ("Inf", lambda u, t: with_factors(u, first_module_only(set_value("B", math.inf))), BAD, "B contains Inf", 3),
    ("integer dtype", lambda u, t: with_factors(u, first_module_only(lambda A, B: (A.long(), B))), BAD, "dtype torch.int64", 3),
    (
        "complex dtype",
        lambda u, t: with_factors(u, first_module_only(lambda A, B: (A, B.to(torch.complex64)))),
        BAD,
        "dtype torch.complex64",
        3,
    ),
    ("not a tensor", lambda u, t: with_factors(u, first_module_only(lambda A, B: (A.tolist(), B))), BAD, "A is a list", 3),
    ("norm 1000x", lambda u, t: with_factors(u, lambda m, A, B: (A, B * 1000)), BAD, "above the bound 10x", 3),
    ("negative weight", lambda u, t: dataclasses.replace(u, num_examples=-50), BAD, "num_examples must be a positive integer", 3),
    ("zero weight", lambda u, t: dataclasses.replace(u, num_examples=0), BAD, "num_examples must be a positive integer", 3),
    ("inflated lora_alpha", lambda u, t: dataclasses.replace(u, lora_alpha=1600.0), BAD, "lora_alpha 1600.0 differs", 3),
    ("metrics not JSON", lambda u, t: dataclasses.replace(u, metrics={"x": object()}), BAD, "metrics are not JSON", 3),
    ("not a ClientUpdate", lambda u, t: types.SimpleNamespace(client_id=BAD, factors=u.factors), BAD, "not a ClientUpdate", 3),
    ("unsampled client", lambda u, t: [u, dataclasses.replace(u, client_id="intruder")], "intruder", "not sampled this round", 4),
    ("duplicate update", lambda u, t: [u, u], f"{BAD}#duplicate", "second update", 4),
]


@pytest.mark.parametrize("kind, tamper, key, reason, valid", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_update_is_rejected_and_round_completes(kind, tamper, key, reason, valid):
    server = make_server()
    runtime = FakeRuntime(tamper)
    records, states = [], []

    def log(record):
        records.append(record)
        states.append(server.state)
        if record["round"]:  # the state is exactly the aggregate of the valid updates
            method = make_method("flexlora")
            method.bound_ranks(server.method.rank_bound)  # the state goes up to the largest client rank
            expected = method.aggregate([runtime.honest[c] for c in record["clients"]])
            assert server.state.keys() == expected.keys()
            assert all(torch.equal(server.state[k], expected[k]) for k in expected)

    run_rounds(server, runtime, lambda state, r: {"evaluated": r}, log)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert list(record["rejected"]) == [key], record["rejected"]
        assert reason in record["rejected"][key]
        assert "\n" not in record["rejected"][key]
        assert record["valid_updates"] == valid and len(record["clients"]) == valid
        assert record["kept_previous_state"] is False
        assert record["eval"] == {"evaluated": record["round"]}
    assert states[1] is not states[2]


def test_honest_round_rejects_nothing():
    server = make_server()
    records = []
    run_rounds(server, FakeRuntime(), lambda s, r: {}, records.append)
    assert all(r["rejected"] == {} and r["valid_updates"] == 4 for r in records[1:])


def test_smaller_rank_is_accepted_by_flexlora_but_not_by_a_homogeneous_method():
    def shrink(u, t):
        return with_factors(u, lambda m, A, B: (A[:-1], B[:, :-1]) if A.shape[0] > 1 else (A, B))

    records = []
    run_rounds(make_server("flexlora"), FakeRuntime(shrink), lambda s, r: {}, records.append)
    assert records[1]["rejected"] == {} and records[1]["valid_updates"] == 4

    records = []
    server = make_server("fedit")
    assert all(r > 1 for r in server.client_ranks[BAD].values())
    run_rounds(server, FakeRuntime(shrink), lambda s, r: {}, records.append)
    assert "needs exactly the assigned rank" in records[1]["rejected"][BAD]
    assert records[1]["valid_updates"] == 3


def test_too_few_valid_updates_keep_the_previous_state():
    server = make_server(rounds=3, min_updates=4)

    class Runtime(FakeRuntime):
        def train(self, tasks):
            results = super().train(tasks)
            if self.round == 2:  # round 2: one client sends NaN, so only 3 valid updates
                results[1] = with_factors(results[1], first_module_only(set_value("A", math.nan)))
            return results

    records, states = [], []
    run_rounds(
        server, Runtime(), lambda s, r: {"state_id": id(s)}, lambda rec: (records.append(rec), states.append(server.state))
    )
    assert [r["kept_previous_state"] for r in records[1:]] == [False, True, False]
    assert records[2]["valid_updates"] == 3 and "A contains NaN" in records[2]["rejected"]["c1"]
    assert states[2] is states[1]  # round 2 kept round 1's global state, untouched
    assert states[3] is not states[2]


def test_first_round_without_enough_updates_stays_at_the_base_model():
    server = make_server(rounds=1, min_updates=4)
    initial = server.state  # rank 0: the shared starting adapter, no update
    records = []
    evaluate = lambda s, r: {"initial": s is initial, "adapter": server.global_adapter() if s is not None else None}  # noqa: E731
    run_rounds(server, FakeRuntime(lambda u, t: dataclasses.replace(u, factors={})), evaluate, records.append)
    assert records[1]["kept_previous_state"] is True and records[1]["eval"] == {"initial": True, "adapter": (None, None)}
    assert server.state is initial and server.round == 1


def test_dropout_injection_is_seeded_and_near_its_rate():
    server = make_server(rounds=40, dropout_rate=0.3)
    records = []
    run_rounds(server, FakeRuntime(), lambda s, r: {}, records.append)
    dropped = sum(len(r["failures"]) for r in records[1:])
    assert 0.2 < dropped / (40 * 4) < 0.4
    again = make_server(rounds=40, dropout_rate=0.3)
    assert [t.options for t in again.configure(7, CLIENTS)] == [t.options for t in server.configure(7, CLIENTS)]
    assert all(r["valid_updates"] + len(r["failures"]) == 4 for r in records[1:])


def test_update_norm_matches_the_dense_product():
    server = make_server()
    u = honest_update(server.configure(1, CLIENTS)[3])
    u = with_factors(u, lambda m, A, B: (A, B + 0.1))
    dense = math.sqrt(
        sum(float(torch.linalg.matrix_norm(u.scale(m) * B.double() @ A.double())) ** 2 for m, (A, B) in u.factors.items())
    )
    assert update_norm(u) == pytest.approx(dense, rel=1e-6)


def test_norm_bound_uses_the_median_of_the_others():
    assert set(norm_outliers({"a": 1.0, "b": 50.0}, 10)) == {"b"}
    assert set(norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 9.0}, 10)) == set()
    assert norm_outliers({"a": 1.0, "b": 1e9}, None) == {}
    assert norm_outliers({"a": 1e9}, 10) == {}
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 1.0}, 10) == {}  # zero median: nothing to compare with


# --- checkpoints -------------------------------------------------------------------------


class FlexLoRAWithMoments(FlexLoRA):
    """A method with state outside server.state (like a server optimizer), via the hook."""

    name = "flexlora"

    def __init__(self):
        super().__init__()
        self.moment = torch.zeros(3)
        self.steps = 0

    def aggregate(self, updates, state=None):
        self.steps += 1
        self.moment = self.moment + torch.tensor([1.0, 2.0, float(self.steps)])
        return super().aggregate(updates, state)

    def extra_state(self):
        return {"moment": self.moment}, {"steps": self.steps}

    def load_extra_state(self, tensors, meta):
        self.moment, self.steps = tensors["moment"], meta["steps"]


def test_checkpoint_round_trip_restores_server_method_and_rng(tmp_path):
    server = make_server(rounds=2)
    server.method = FlexLoRAWithMoments()
    history = run_rounds(server, FakeRuntime(), lambda s, r: {"r": r}, lambda rec: None)
    server.client_ranks[BAD] = {m: 1 for m in SHAPES}  # e.g. a HetLoRA client pruned its rank
    random.seed(123)
    torch.manual_seed(456)
    save_checkpoint(tmp_path, server, history, server.cfg.to_dict())
    expected_draws = (random.random(), torch.rand(3))

    ckpt = load_checkpoint(tmp_path)
    fresh = make_server(rounds=2)
    fresh.method = FlexLoRAWithMoments()
    fresh.load_state_dict(ckpt.tensors, ckpt.meta)
    assert fresh.round == 2 and ckpt.history == history
    assert fresh.state.keys() == server.state.keys()
    assert all(torch.equal(fresh.state[k], server.state[k]) for k in server.state)
    assert fresh.client_ranks == server.client_ranks and fresh.client_types == server.client_types
    assert torch.equal(fresh.method.moment, server.method.moment) and fresh.method.steps == 2
    restore_rng(ckpt.rng["tensors"], ckpt.rng["meta"])
    assert random.random() == expected_draws[0] and torch.equal(torch.rand(3), expected_draws[1])
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_crash_inside_a_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    server = make_server(rounds=3)
    saved = []

    def checkpoint(server, history):
        save_checkpoint(tmp_path, server, history, server.cfg.to_dict())
        saved.append({k: v.clone() for k, v in server.state.items()} if server.state else None)

    def crash_in_round_3(point, round_):
        if point == "checkpoint_write" and round_ == 3:
            raise KeyboardInterrupt("simulated crash between the tensor file and the index")

    monkeypatch.setattr(checkpoint_module, "fault_point", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_rounds(server, FakeRuntime(), lambda s, r: {}, lambda rec: None, checkpoint)
    assert (tmp_path / "state-000003.safetensors").exists()  # written, but never committed
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2 and [r["round"] for r in ckpt.history] == [0, 1, 2]
    assert all(torch.equal(ckpt.tensors[f"state/{k}"], v) for k, v in saved[-1].items())


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    server = make_server(rounds=1)
    history = run_rounds(server, FakeRuntime(), lambda s, r: {}, lambda rec: None)
    save_checkpoint(tmp_path, server, history, server.cfg.to_dict())
    state_file = next(tmp_path.glob("state-*.safetensors"))
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(checkpoint_module.CheckpointError, match="missing or truncated") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    assert load_checkpoint(tmp_path / "nothing-here") is None


# --- sparse deltas (SLoRA's first stage) and frozen A (FFA-LoRA) ---------------------------


class Delta(NamedTuple):  # the fields of aggregation.base.SparseDelta (duck-typed by validation)
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple


if "deltas" in ClientUpdate.__dataclass_fields__:
    DeltaUpdate = ClientUpdate
else:  # before SLoRA's ClientUpdate.deltas is on this branch

    @dataclasses.dataclass(frozen=True)
    class DeltaUpdate(ClientUpdate):
        deltas: dict = dataclasses.field(default_factory=dict)


def sparse_round(tamper):
    """validate_round on 3 clients in a sparse round; `tamper(update)` rewrites c1's."""
    tasks = [
        types.SimpleNamespace(
            client_id=c, module_ranks={m: 2 for m in SHAPES}, factors=None, options={"sparse": {"density": 0.1}}
        )
        for c in CLIENTS[:3]
    ]
    updates = []
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(i)
        deltas = {
            m: Delta(torch.arange(0, m_ * n, 3), 0.01 * torch.randn(len(range(0, m_ * n, 3)), generator=g), (m_, n))
            for m, (m_, n) in SHAPES.items()
        }
        u = DeltaUpdate(task.client_id, 10, 16.0, {}, {}, deltas=deltas)
        updates.append(tamper(u) if task.client_id == BAD else u)
    return validate_round(updates, tasks, SHAPES, 16.0, max_norm_ratio=10.0)


def with_delta(fn):
    first = sorted(SHAPES)[0]
    return lambda u: dataclasses.replace(u, deltas={m: fn(d) if m == first else d for m, d in u.deltas.items()})


SPARSE_MALFORMED = [
    (
        "factors instead of deltas",
        lambda u: dataclasses.replace(u, factors={m: (torch.zeros(2, n), torch.zeros(m_, 2)) for m, (m_, n) in SHAPES.items()}),
        "sent factors where the task asked for deltas",
    ),
    ("no deltas", lambda u: dataclasses.replace(u, deltas={}), "empty update (no deltas)"),
    ("delta shape", with_delta(lambda d: d._replace(shape=(3, 3))), "delta shape (3, 3) differs"),
    ("int32 indices", with_delta(lambda d: d._replace(indices=d.indices.int())), "delta indices must be 1-D int64"),
    ("index out of range", with_delta(lambda d: d._replace(indices=d.indices + 10**6)), "delta indices out of range"),
    ("negative index", with_delta(lambda d: d._replace(indices=d.indices - 1)), "delta indices out of range"),
    ("values/indices length", with_delta(lambda d: d._replace(values=d.values[:-1])), "match the indices"),
    ("NaN values", with_delta(lambda d: d._replace(values=d.values * math.nan)), "delta values contain NaN"),
    (
        "delta norm 1000x",
        lambda u: dataclasses.replace(u, deltas={m: d._replace(values=d.values * 1000) for m, d in u.deltas.items()}),
        "above the bound",
    ),
]


@pytest.mark.parametrize("kind, tamper, reason", SPARSE_MALFORMED, ids=[m[0] for m in SPARSE_MALFORMED])
def test_malformed_sparse_delta_is_rejected(kind, tamper, reason):
    valid, rejected = sparse_round(tamper)
    assert list(rejected) == [BAD] and reason in rejected[BAD], rejected
    assert [u.client_id for u in valid] == ["c0", "c2"]


def test_honest_sparse_round_rejects_nothing():
    valid, rejected = sparse_round(lambda u: u)
    assert rejected == {} and len(valid) == 3


def test_frozen_A_must_come_back_unchanged():
    server = make_server(rounds=2)
    run_rounds(server, FakeRuntime(), lambda s, r: {}, lambda rec: None)  # a state to start from
    tasks = server.configure(3, CLIENTS)
    for t in tasks:
        t.options["freeze_A"] = True
    updates = [with_factors(honest_update(t), lambda m, A, B, t=t: (t.factors[m][0].clone(), B)) for t in tasks]
    updates[1] = with_factors(updates[1], first_module_only(lambda A, B: (A + 0.5, B)))
    valid, rejected = server.validate(updates, tasks)
    assert list(rejected) == [BAD] and "A changed although the task froze it" in rejected[BAD]
    # A half-precision transport's rounding is not a change.
    half = [with_factors(u, lambda m, A, B: (A.half().float(), B)) for u in updates]
    assert list(server.validate(half, tasks)[1]) == [BAD]
