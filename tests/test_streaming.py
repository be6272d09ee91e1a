"""Streaming rounds: a round whose results are taken one at a time (validated, folded into the
method's accumulator, dropped) gives the global state that aggregating all of them at once gives,
for every method and resource profile, with a server optimizer and with a weight cap; and the
server holds one task and a bounded number of updates, whatever the round's size."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch

from flexlora.config import ExperimentConfig, ResourcesConfig, validate
from flexlora.methods import METHODS
from flexlora.methods.server_opt import starting_point
from flexlora.protocol import ClientTask, ClientUpdate, SparseDelta
from flexlora.resources import PROFILES
from flexlora.server import FederatedServer

SHAPES = {"l0.q_proj": (12, 10), "l0.down_proj": (10, 16)}
ALPHA = 16.0
CLIENTS = [f"c{i:02d}" for i in range(14)]
ARGS = {"slora": {"sparse_rounds": 1, "densities": 0.2}, "ffa": {}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def make_server(method: str, profile: str, **federation) -> FederatedServer:
    cfg = ExperimentConfig(method=method, method_args=dict(ARGS.get(method, {}), **federation.pop("method_args", {})))
    # Ranks that make Σr cross min(m, n) within a round: FlexLoRA's accumulator switches from
    # stacked factors to a dense ΔW mid-round.
    cfg.resources = ResourcesConfig(profile=profile, t1=1, t2=2, t3_attention=3, t3_mlp=4, t4=6)
    cfg.federation.rounds = 3
    cfg.federation.clients_per_round = 9
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    validate(cfg)
    return FederatedServer(cfg, CLIENTS, SHAPES, declared_sizes={c: 100 for c in CLIENTS})


def trained(task: ClientTask, dtype=torch.float32) -> ClientUpdate:
    """A client's plausible result for its task: the factors it was handed plus a step (a
    frozen A comes back as it was), or a sparse delta where the task asks for one."""
    g = torch.Generator().manual_seed(task.seed)
    size = 3 + task.seed % 40
    if "sparse" in task.options:
        deltas = {}
        for module, (m, n) in SHAPES.items():
            idx = torch.randperm(m * n, generator=g)[: m * n // 5].sort().values
            deltas[module] = SparseDelta(idx, 0.01 * torch.randn(idx.numel(), generator=g), (m, n))
        return ClientUpdate(task.client_id, size, ALPHA, {}, deltas=deltas)
    if "lora_a2" in task.options:  # the change of some components of the trained factor, within the budget
        from flexlora.methods.lora_a2 import component_delta

        train, deltas = task.options["lora_a2"]["train"], {}
        for module, (A, B) in task.factors.items():
            change = 0.05 * torch.randn((A if train == "A" else B).shape, generator=g).to(dtype)
            picked = torch.randperm(A.shape[0], generator=g)[: task.module_ranks[module]].sort().values.tolist()
            deltas[module] = component_delta(change, picked, train, SHAPES[module])
        return ClientUpdate(task.client_id, size, ALPHA, {}, deltas=deltas)
    factors = {}
    for module, r in task.module_ranks.items():
        m, n = SHAPES[module]
        A, B = task.factors[module] if task.factors else (0.3 * torch.randn(r, n, generator=g), torch.zeros(m, r))
        frozen = "A" if task.options.get("freeze_A") else task.options.get("freeze_factor")
        dA = 0.02 * torch.randn(A.shape, generator=g) * (frozen != "A")
        dB = 0.05 * torch.randn(B.shape, generator=g) * (frozen != "B")
        factors[module] = ((A + dA).to(dtype), (B + dB).to(dtype))
    return ClientUpdate(task.client_id, size, ALPHA, factors)


def all_at_once(server: FederatedServer, round_: int, dtype=torch.float32) -> None:
    """The reference: every task built, every update in hand, one call of the method's aggregate
    with the round's weights, then the server step (what the server did before streaming)."""
    tasks = server.configure(round_, server.sample(round_))
    valid, _ = server.validate([trained(t, dtype) for t in tasks], tasks)
    weights = server.weights([u.num_examples for u in valid], round_)
    valid = [dataclasses.replace(u, weight=w) for u, w in zip(valid, weights)]
    previous = server.state
    state = server.method.aggregate(valid, previous)
    if server.server_step is not None:
        start = server.method.aggregate([starting_point(server.method, u, previous) for u in valid], previous)
        state = server.server_step(server.method, start, state)
    server.state, server.round = state, round_
    server.after_aggregation({u.client_id: {m: A.shape[0] for m, (A, _) in u.factors.items()} for u in valid})


class Clients:
    """A streaming runtime: takes a task only when the previous result was consumed."""

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype

    def train(self, tasks):
        for task in tasks:
            yield trained(task, self.dtype)


def assert_same_model(a: FederatedServer, b: FederatedServer, tol: float = 1e-6) -> None:
    fa, ra = a.method.global_factors(a.state, ALPHA)
    fb, rb = b.method.global_factors(b.state, ALPHA)
    assert ra == rb
    for module in fa:
        wa = (ALPHA / ra[module]) * fa[module][1].double() @ fa[module][0].double()
        wb = (ALPHA / rb[module]) * fb[module][1].double() @ fb[module][0].double()
        assert torch.linalg.norm(wa - wb) <= tol * max(1.0, float(torch.linalg.norm(wa))), module
    oa, ob = a.base_offset() or {}, b.base_offset() or {}
    assert oa.keys() == ob.keys()
    for module in oa:
        assert torch.linalg.norm(oa[module] - ob[module]) <= tol * max(1.0, float(torch.linalg.norm(oa[module])))
    # The next round's clients start from the same factors.
    for ta, tb in zip(a.configure(a.round + 1, CLIENTS[:3]), b.configure(b.round + 1, CLIENTS[:3])):
        for module in ta.factors or {}:
            pa, pb = ta.factors[module], tb.factors[module]
            wa, wb = pa[1].double() @ pa[0].double(), pb[1].double() @ pb[0].double()
            assert torch.linalg.norm(wa - wb) <= tol * max(1.0, float(torch.linalg.norm(wa)))


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_streamed_round_equals_aggregating_all_updates_at_once(method, profile):
    """float64 updates, so that what is compared is the algorithm, not float32 rounding (the
    streamed sum is formed in another order, with raw weights normalised at the end)."""
    streamed, reference = make_server(method, profile), make_server(method, profile)
    for round_ in (1, 2, 3):
        outcome = streamed.run_round(round_, Clients(torch.float64))
        all_at_once(reference, round_, torch.float64)
        assert outcome.valid_updates == 9 and not outcome.rejected
        assert_same_model(streamed, reference)
    assert streamed.client_ranks == reference.client_ranks  # HetLoRA's pruned ranks too


@pytest.mark.parametrize("method", ["flexlora", "fedit", "hetlora"])
@pytest.mark.parametrize(
    "federation",
    [
        {"max_weight_share": 0.15},  # the cap binds: the largest updates are held to the end
        {"max_weight_share": 0.05},  # infeasible with 9 updates: every client gets 1/9
        {"method_args": {"server_opt": {"name": "fedadam", "lr": 0.01}}},
    ],
)
def test_weight_caps_and_server_optimizers_stream_exactly(method, federation):
    if method == "hetlora" and "method_args" in federation:
        pytest.skip("server_opt is available with flexlora and fedit only")
    streamed, reference = make_server(method, "uniform", **dict(federation)), make_server(method, "uniform", **dict(federation))
    # float64 with an adaptive optimizer: its step m/(√v + τ) turns float32 rounding of entries
    # with Δ ≈ 0 into steps of about lr·1e-3, whichever way the sum is formed.
    # float32 otherwise: its rounding (about 1e-7 a sum, compounded over three rounds) is the
    # only difference.
    dtype = torch.float64 if "method_args" in federation else torch.float32
    for round_ in (1, 2, 3):
        outcome = streamed.run_round(round_, Clients(dtype))
        all_at_once(reference, round_, dtype)
        assert_same_model(streamed, reference, tol=1e-6 if dtype == torch.float64 else 1e-5)
    if "max_weight_share" in federation:
        cap = max(federation["max_weight_share"], 1 / 9)
        assert max(outcome.weights.values()) <= cap + 1e-12 and sum(outcome.weights.values()) == pytest.approx(1.0)


def test_the_server_holds_one_task_and_a_bounded_number_of_updates():
    """With the norm rule on and no weight cap: the server keeps no reference to a task once
    its client answered, nor to an update once the warm-up of the norm rule is over."""
    server = make_server("flexlora", "heavy-tail-strong", clients_per_round=12)
    alive_tasks, alive_updates, most = [], [], {"tasks": 0, "updates": 0}

    def count(refs):
        gc.collect()
        return sum(r() is not None for r in refs)

    class Watching:
        def train(self, tasks):
            for task in tasks:
                alive_tasks.append(weakref.ref(task))
                most["tasks"] = max(most["tasks"], count(alive_tasks))
                update = trained(task)
                del task
                alive_updates.append(weakref.ref(update))
                most["updates"] = max(most["updates"], count(alive_updates))
                yield update
                del update

    outcome = server.run_round(1, Watching())
    assert outcome.valid_updates == 12
    from flexlora.methods import helpers
    from flexlora.validation import NORM_WARMUP

    assert not helpers._fresh_rows_cache  # round 1's shared seeded rows are dropped once handed out

    assert most["tasks"] <= 2  # the one being trained (and, while its result is folded, the previous)
    assert most["updates"] <= NORM_WARMUP + 1


@pytest.mark.parametrize("method", ["flexlora", "fedex"])
def test_a_subclass_with_its_own_aggregate_is_streamed_through_that_rule(method):
    """FlexLoRA and FedEx-LoRA stream through their own running sums; a subclass that overrides
    aggregate must not be fed to its parent's sums, or its rule would be silently skipped."""
    server = make_server(method, "heavy-tail-light")
    parent = type(server.method)

    class Marked(parent):
        def aggregate(self, updates, state=None):
            return {**parent.aggregate(self, updates, state), "marker": torch.ones(1)}

    tasks = server.configure(1, server.sample(1))
    updates, _ = server.validate([trained(t) for t in tasks], tasks)
    subclassed = copy.copy(server.method)
    subclassed.__class__ = Marked  # the same arguments, the subclass's rule
    for owner, marked in ((server.method, False), (subclassed, True)):
        accumulator = owner.accumulator(None)
        for update in updates:
            accumulator.add(update, update.num_examples)
        assert ("marker" in accumulator.result()) is marked
