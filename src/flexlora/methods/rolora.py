"""Alternating LoRA, after RoLoRA (Chen et al., 2024, "Robust Federated Finetuning of LLMs via
Alternating Optimization of LoRA"): the example method of docs/adding_a_method.md.

In odd rounds every client trains B with A frozen, in even rounds A with B frozen; the server
takes the data-weighted average of A and of the scaled B. One factor is the same for every client
in a round, so the average of the products is the product of the averages,
Σ_k p_k s B_k A = (Σ_k p_k s B_k) A: unlike FedIT's separate averages, the aggregation is exact.
Every client trains the federation's smallest rank per module (``homogeneous``).

State per module: f"{module}.A" (r, n) and f"{module}.B" (m, r) = Σ_k p_k s_k B_k (the LoRA scale
folded in); rank 0 before round 1, so that every client starts from the shared initial adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ClientHook, ClientTask, ClientUpdate, Factors, GlobalState, Method
from .helpers import (
    data_weights,
    module_names,
    module_seed,
    module_shape,
    slice_factors,
    weighted_padded_sum,
    zero_rank_state,
)


@dataclass(frozen=True)
class FreezeFactor(ClientHook):
    """Client option "freeze_factor": "A" or "B". That factor is not trained, and the server
    rejects an update in which it changed (beyond a half-precision transport's rounding)."""

    factor: str

    option: ClassVar[str] = "freeze_factor"
    needs_adapter: ClassVar[bool] = True

    @classmethod
    def parse(cls, value) -> FreezeFactor:
        if value not in ("A", "B"):
            raise ValueError(f"client option freeze_factor must be A or B, got {value!r}")
        return cls(value)

    @property
    def index(self) -> int:
        return 0 if self.factor == "A" else 1

    def start(self, local) -> None:
        for pair in local.weights.values():
            pair[self.index].requires_grad_(False)

    def check_module(self, module: str, sent, task: ClientTask, shape: tuple[int, int]) -> str | None:
        if not task.factors or module not in task.factors:
            return None
        got = sent[self.index]
        before = task.factors[module][self.index].to(device=got.device, dtype=got.dtype)
        if got.shape != before.shape or float(torch.linalg.norm(got - before)) > 1e-2 * float(torch.linalg.norm(before)) + 1e-6:
            return f"{self.factor} changed although the task froze it (freeze_factor)"
        return None


class AlternatingLoRA(Method):
    """Odd rounds train B, even rounds A; data-weighted averages of A and of s·B."""

    name = "rolora"
    homogeneous = True
    privacy_space = "factors"  # clipped and noised as (A, s·B), inside its weighted sums
    client_hooks = (FreezeFactor,)

    def __init__(self, seed: int = 0):
        """seed: of the shared initial A every client of round 1 starts from."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"rolora: seed must be an integer, got {seed!r}")
        self.seed = seed

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        return zero_rank_state(shapes)

    def client_options(self, state: GlobalState | None, round_: int, rank_type: str) -> dict:
        return {FreezeFactor.option: "A" if round_ % 2 == 1 else "B"}

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        weights = data_weights(updates)
        new: GlobalState = {}
        for module in module_names(updates):
            module_shape(updates, module)  # checks that every client's A and B fit one weight
            rank = updates[0].rank(module)
            A = [u.factors[module][0] for u in updates]
            B = [u.factors[module][1] for u in updates]
            new[f"{module}.A"] = weighted_padded_sum(A, weights, 0, rank)
            new[f"{module}.B"] = weighted_padded_sum(B, [p * u.scale(module) for p, u in zip(weights, updates)], 1, rank)
        return new

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        if state is None:
            return None
        return {
            module: slice_factors(state[f"{module}.A"], state[f"{module}.B"], rank, lora_alpha, module_seed(self.seed, module))
            for module, rank in module_ranks.items()
        }

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        ranks = {key[: -len(".A")]: t.shape[0] for key, t in state.items() if key.endswith(".A") and t.shape[0] > 0}
        return (self.client_factors(state, ranks, lora_alpha) if ranks else {}), ranks
