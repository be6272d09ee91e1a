"""Client resources: the paper's rank types and resource profiles.

A rank type says which LoRA rank a client can afford on each kind of module; a profile says
how often each type occurs in the federation. Types are drawn once per run from the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RankType:
    """Ranks by module kind; `default` covers any module not named in `by_module`."""

    name: str
    default: int
    by_module: tuple[tuple[str, int], ...] = ()

    def rank_for(self, module_name: str) -> int:
        leaf = module_name.rsplit(".", 1)[-1]
        for suffix, rank in self.by_module:
            if leaf == suffix:
                return rank
        return self.default

    def max_rank(self) -> int:
        return max([self.default, *(r for _, r in self.by_module)])


# The paper's four types (Bai et al. 2024, Sec. 5.1).
def paper_rank_types(t1: int = 8, t2: int = 30, t3_attention: int = 30, t3_mlp: int = 200, t4: int = 200):
    return {
        "T1": RankType("T1", t1),
        "T2": RankType("T2", t2),
        "T3": RankType("T3", t3_attention, tuple((m, t3_mlp) for m in MLP)),
        "T4": RankType("T4", t4),
    }


# Probability of each type per profile (Sec. 5.1 of the paper).
PROFILES: dict[str, dict[str, float]] = {
    "homo": {"T1": 1.0},
    "uniform": {"T1": 0.25, "T2": 0.25, "T3": 0.25, "T4": 0.25},
    "heavy-tail-light": {"T1": 0.80, "T2": 0.05, "T3": 0.05, "T4": 0.10},
    "heavy-tail-strong": {"T1": 0.05, "T2": 0.05, "T3": 0.10, "T4": 0.80},
    "normal": {"T1": 0.10, "T2": 0.40, "T3": 0.40, "T4": 0.10},
}


def assign_rank_types(client_ids: list[str], profile: str | list[str], seed: int) -> dict[str, str]:
    """Client id -> type name, drawn once per run. `profile` may also be an explicit list of
    type names, one per client in order."""
    if isinstance(profile, (list, tuple)):
        if len(profile) != len(client_ids):
            raise ValueError(
                f"explicit rank-type list has {len(profile)} entries for {len(client_ids)} clients"
            )
        return dict(zip(client_ids, profile))
    if profile not in PROFILES:
        raise ValueError(f"unknown resource profile '{profile}'; choose from: {', '.join(PROFILES)}")
    names, probs = zip(*PROFILES[profile].items())
    rng = random.Random(f"rank-types-{seed}")
    return {cid: rng.choices(names, weights=probs)[0] for cid in client_ids}


def module_ranks(rank_type: RankType, module_shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Per-module rank of a client, capped at min(d_out, d_in) so small models stay valid."""
    return {name: min(rank_type.rank_for(name), min(shape)) for name, shape in module_shapes.items()}


# AdamW training state of one float32 LoRA parameter: the weight, its gradient, two moments.
TRAINING_BYTES_PER_PARAM = 16


def adapter_training_bytes(ranks: dict[str, int], module_shapes: dict[str, tuple[int, int]]) -> int:
    """Memory of an adapter's training state: r * (d_out + d_in) parameters per module, 16 bytes
    each. Activations and the frozen base model come on top and do not depend on the rank."""
    return TRAINING_BYTES_PER_PARAM * sum(r * sum(module_shapes[m]) for m, r in ranks.items())


def rank_type_for_memory(
    budget_mb: float, module_shapes: dict[str, tuple[int, int]], rank_types: dict[str, RankType]
) -> RankType:
    """The rank type with the largest adapter whose training state fits `budget_mb` (MiB of
    memory the client sets aside for LoRA), see adapter_training_bytes."""
    budget = budget_mb * 2**20
    cost = {name: adapter_training_bytes(module_ranks(rt, module_shapes), module_shapes) for name, rt in rank_types.items()}
    fitting = [name for name in rank_types if cost[name] <= budget]
    if not fitting:
        cheapest = min(cost, key=cost.get)
        raise ValueError(
            f"memory budget {budget_mb} MiB is below the smallest rank type's need "
            f"({cheapest}: {cost[cheapest] / 2**20:.1f} MiB)"
        )
    return rank_types[max(fitting, key=lambda name: (cost[name], name))]


def declared_rank_type(
    declaration: dict, module_shapes: dict[str, tuple[int, int]], rank_types: dict[str, RankType]
) -> RankType | None:
    """A client's own resources (from a Flower node config) as a rank type: `lora-rank` (one
    rank on every module), `rank-type` (a type name, e.g. T3) or `memory-budget-mb`; None if it
    declares none of them (the run's resource profile decides)."""
    given = [k for k in ("lora-rank", "rank-type", "memory-budget-mb") if declaration.get(k) not in (None, "")]
    if len(given) > 1:
        raise ValueError(f"declare one of lora-rank, rank-type, memory-budget-mb, got {', '.join(given)}")
    if not given:
        return None
    value = declaration[given[0]]
    if given[0] == "lora-rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lora-rank must be an integer >= 1, got {value!r}")
        return RankType(f"r{value}", value)
    if given[0] == "rank-type":
        if value not in rank_types:
            raise ValueError(f"unknown rank-type {value!r}; choose from: {', '.join(rank_types)}")
        return rank_types[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"memory-budget-mb must be a number > 0, got {value!r}")
    return rank_type_for_memory(float(value), module_shapes, rank_types)
