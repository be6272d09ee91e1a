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
    factors = {module: (A + 0.02 * torch.randn(A.shape, generator=g, dtype=A.dtype), B + 0.05 * torch.randn(B.shape, generator=g, dtype=B.dtype))
               for module, (A, B) in task.factors.items()}
    return ClientUpdate(task.client_id, 3 + task.seed % 40, ALPHA, factors)


class SyntheticClients:
    def train(self, tasks):
        for task in tasks:
            yield trained(task)
