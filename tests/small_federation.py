"""The small federation of the server-level checks every method gets (round-1 start, a streamed
round, checkpoint and resume, the Flower codecs): two modules, eight clients of 100 examples, the
five rank types at ranks 1-6, five clients a round; each client returns the factors it was
handed plus a seeded step."""

from __future__ import annotations

import torch

from flexlora.config import ExperimentConfig, ResourcesConfig, validate
from flexlora.methods.base import ClientTask, ClientUpdate
from flexlora.server import FederatedServer

SHAPES = {"l0.q_proj": (12, 10), "l0.down_proj": (10, 16)}
CLIENTS = [f"c{i:02d}" for i in range(8)]
ALPHA = 16.0


def make_server(method: str, profile: str = "uniform", **method_args) -> FederatedServer:
    cfg = ExperimentConfig(method=method, method_args=method_args)
    cfg.resources = ResourcesConfig(profile=profile, t1=1, t2=2, t3_attention=3, t3_mlp=4, t4=6)
    cfg.federation.rounds = 3
    cfg.federation.clients_per_round = 5
    validate(cfg)
    return FederatedServer(cfg, CLIENTS, SHAPES, declared_sizes={c: 100 for c in CLIENTS})


def trained(task: ClientTask) -> ClientUpdate:
    g = torch.Generator().manual_seed(task.seed)
    factors = {
        module: (
            A + 0.02 * torch.randn(A.shape, generator=g, dtype=A.dtype),
            B + 0.05 * torch.randn(B.shape, generator=g, dtype=B.dtype),
        )
        for module, (A, B) in task.factors.items()
    }
    return ClientUpdate(task.client_id, 3 + task.seed % 40, ALPHA, factors)


class SyntheticClients:
    def train(self, tasks):
        for task in tasks:
            yield trained(task)


class RecordingClients(SyntheticClients):
    """SyntheticClients that keep the updates of their last round in `seen`."""

    def __init__(self):
        self.seen: list[ClientUpdate] = []

    def train(self, tasks):
        self.seen.clear()
        for update in super().train(tasks):
            self.seen.append(update)
            yield update


def resume_after_checkpoint(make_server, tmp_path) -> tuple[FederatedServer, FederatedServer]:
    """(uninterrupted, resumed): three rounds on one server; on another two rounds, a checkpoint
    on disk (safetensors + JSON), a fresh server restored from it, and round 3."""
    from flexlora.checkpoint import load_checkpoint, save_checkpoint

    uninterrupted, interrupted = make_server(), make_server()
    for round_ in (1, 2):
        uninterrupted.run_round(round_, SyntheticClients())
        interrupted.run_round(round_, SyntheticClients())
    save_checkpoint(tmp_path, interrupted, [], {"method": interrupted.cfg.method})
    resumed = make_server()
    load_checkpoint(tmp_path).restore(resumed)
    assert resumed.round == 2 and resumed.client_ranks == uninterrupted.client_ranks
    uninterrupted.run_round(3, SyntheticClients())
    resumed.run_round(3, SyntheticClients())
    return uninterrupted, resumed


def assert_round_one_clients_share_one_start(overrides: list[str]) -> FederatedServer:
    """Round 1's clients of rank types T1, T4, T3, T2 all start from the first r rows of one
    shared A, with B = 0 (the check every method gets). Returns the server."""
    from flexlora.config import load_config

    cfg = load_config(overrides=[*overrides, "resources.profile=[T1, T4, T3, T2]"])
    server = FederatedServer(cfg, ["a", "b", "c", "d"], SHAPES)
    tasks = server.configure(1, ["a", "b", "c", "d"])
    for module in SHAPES:
        starts = sorted(((t.factors[module], t.module_ranks[module]) for t in tasks), key=lambda x: -x[1])
        (A_max, _), _ = starts[0]
        assert len({r for _, r in starts}) > 1
        for (A, B), r in starts:
            assert torch.equal(A, A_max[:r]) and not B.any()
    return server


# Heterogeneous updates for the aggregation checks: random float64 factors at each client's own
# ranks per module (no training), the first `clients` of these.
UPDATE_SHAPES = {"attn": (24, 16), "mlp": (10, 18)}
UPDATE_CLIENTS = [
    ("c0", 10, {"attn": 2, "mlp": 3}),
    ("c1", 50, {"attn": 5, "mlp": 5}),
    ("c2", 7, {"attn": 8, "mlp": 2}),
    ("c3", 21, {"attn": 5, "mlp": 3}),
]


def random_updates(seed: int = 0, ranks: dict[str, int] | None = None, clients: int = 4) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for cid, n_ex, own in UPDATE_CLIENTS[:clients]:
        factors = {
            module: (
                torch.randn((ranks or own)[module], n, generator=gen, dtype=torch.float64),
                torch.randn(m, (ranks or own)[module], generator=gen, dtype=torch.float64),
            )
            for module, (m, n) in UPDATE_SHAPES.items()
        }
        out.append(ClientUpdate(cid, n_ex, ALPHA, factors))
    return out


def two_clients() -> list[ClientUpdate]:
    """The by-hand pair of the rank-partitioned rules (raFLoRA, HetLoRA's replication padding), one
    module "m" of 3x3 in float64, α = r so s = 1 for both. Client a: rank 1, 30 examples,
    ΔW_a = 2·e1e1ᵀ. Client b: rank 2, 10 examples, ΔW_b = 4·e1e1ᵀ + 8·e2e2ᵀ."""
    f64 = torch.float64
    a = ClientUpdate("a", 30, 1.0, {"m": (torch.tensor([[1.0, 0, 0]], dtype=f64), torch.tensor([[2.0], [0], [0]], dtype=f64))})
    b = ClientUpdate(
        "b",
        10,
        2.0,
        {"m": (torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=f64), torch.tensor([[4.0, 0], [0, 8], [0, 0]], dtype=f64))},
    )
    return [a, b]
