"""A federated round, independent of transport: sample, configure, aggregate, evaluate, log.

A runtime (in-process, Flower) only moves ClientTasks out and ClientUpdates back; it never
knows which aggregation method runs.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from flexlora.aggregation import make_method
from flexlora.aggregation.base import ClientUpdate, GlobalState
from flexlora.client import ClientTask
from flexlora.config import ExperimentConfig
from flexlora.resources import RankType, assign_rank_types, module_ranks, paper_rank_types


@dataclass
class ClientFailure:
    client_id: str
    reason: str


class Runtime(Protocol):
    def train(self, tasks: list[ClientTask]) -> list[ClientUpdate | ClientFailure]: ...


Evaluator = Callable[[GlobalState | None, int], dict]  # (global state, round) -> metrics


class FederatedServer:
    """Holds the global state and decides, each round, who trains at which rank from what."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        client_ids: list[str],
        shapes: dict[str, tuple[int, int]],
        declared_types: dict[str, RankType] | None = None,
    ):
        """`declared_types`: rank types that clients state themselves (a Flower node's config);
        every other client gets one drawn from the resource profile."""
        self.cfg = cfg
        self.client_ids = list(client_ids)
        self.shapes = shapes
        self.method = make_method(cfg.method, **cfg.method_args)
        r = cfg.resources
        self.rank_types = paper_rank_types(r.t1, r.t2, r.t3_attention, r.t3_mlp, r.t4)
        self.client_types = assign_rank_types(self.client_ids, r.profile, cfg.seed)
        for cid, rank_type in (declared_types or {}).items():
            self.rank_types.setdefault(rank_type.name, rank_type)
            self.client_types[cid] = rank_type.name
        self.client_ranks = {cid: module_ranks(self.rank_types[t], shapes) for cid, t in self.client_types.items()}
        if getattr(self.method, "homogeneous", False):
            # Homogeneous baselines: every client is cut down to the federation's smallest
            # rank per module (the "bucket effect" FlexLoRA avoids).
            floor = {m: min(ranks[m] for ranks in self.client_ranks.values()) for m in shapes}
            self.client_ranks = {cid: dict(floor) for cid in self.client_ids}
        self.state: GlobalState | None = None
        self.round = 0

    def sample(self, round_: int) -> list[str]:
        fed = self.cfg.federation
        k = math.ceil(fed.fraction * len(self.client_ids)) if fed.fraction else fed.clients_per_round
        rng = random.Random(f"sample-{self.cfg.seed}-{round_}")
        return sorted(rng.sample(self.client_ids, min(k, len(self.client_ids))))

    def configure(self, round_: int, client_ids: list[str]) -> list[ClientTask]:
        tasks = []
        for i, cid in enumerate(client_ids):
            ranks = self.client_ranks[cid]
            tasks.append(
                ClientTask(
                    client_id=cid,
                    round=round_,
                    rank_type=self.client_types[cid],
                    module_ranks=ranks,
                    factors=self.method.client_factors(self.state, ranks, self.cfg.lora.alpha),
                    seed=hash_seed(self.cfg.seed, round_, cid),
                )
            )
        return tasks

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        self.state = self.method.aggregate(updates, self.state)

    def global_adapter(self, rank: int | None = None):
        """(factors, ranks) of the global model, optionally truncated to `rank`."""
        factors, ranks = self.method.global_factors(self.state, self.cfg.lora.alpha)
        if rank is not None:
            capped = {m: min(rank, r) for m, r in ranks.items()}
            factors = self.method.client_factors(self.state, capped, self.cfg.lora.alpha)
            ranks = capped
        return factors, ranks


def hash_seed(*parts) -> int:
    """A stable 31-bit seed from parts (Python's hash() of str is salted per process)."""
    return random.Random("-".join(map(str, parts))).getrandbits(31)


def run_rounds(server: FederatedServer, runtime: Runtime, evaluate: Evaluator, log: Callable[[dict], None]) -> None:
    """The federated loop; `log` receives one JSON-ready record per round (round 0 = zero-shot)."""
    cfg = server.cfg
    if server.round == 0:
        log({"round": 0, "eval": evaluate(None, 0), "time": {}})
    for round_ in range(server.round + 1, cfg.federation.rounds + 1):
        started = time.perf_counter()
        selected = server.sample(round_)
        tasks = server.configure(round_, selected)
        results = runtime.train(tasks)
        updates = [r for r in results if isinstance(r, ClientUpdate)]
        failures = [r for r in results if isinstance(r, ClientFailure)]
        train_time = time.perf_counter() - started
        t = time.perf_counter()
        if updates:
            server.aggregate(updates)
        aggregation_time = time.perf_counter() - t
        server.round = round_
        t = time.perf_counter()
        is_eval_round = round_ % cfg.eval.every == 0 or round_ == cfg.federation.rounds
        metrics = evaluate(server.state, round_) if is_eval_round else None
        eval_time = time.perf_counter() - t
        total = time.perf_counter() - started
        log(
            {
                "round": round_,
                "clients": {u.client_id: u.metrics for u in updates},
                "failures": {f.client_id: f.reason for f in failures},
                "eval": metrics,
                "time": {
                    "client_training_s": train_time,
                    "aggregation_s": aggregation_time,
                    "evaluation_s": eval_time,
                    "other_s": total - train_time - aggregation_time - eval_time,
                    "total_s": total,
                },
            }
        )
