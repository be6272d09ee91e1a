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
