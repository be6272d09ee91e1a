"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024):
A frozen at a shared random init, only B trained and averaged.

The shared A of a module is one fixed (seeded) sequence of rows drawn like PEFT's init,
U(-1/√n, 1/√n); a client of rank r uses its first r rows, so the frozen A's of all ranks are
nested. Since every client's A_k is then a prefix of the same matrix, the average of the
zero-padded, scaled B's is exact: Σ_k p_k s_k B_k A_k = (Σ_k p_k s_k pad(B_k)) A[:R].

State keys per module: f"{module}.A" (R, n), the shared rows (R = the largest rank so far),
and f"{module}.B" (m, R) = Σ p_k s_k pad(B_k) (the LoRA scale folded in; a client of rank r
receives B[:, :r] / s_r). The state exists before round 1 (rank 0: B = 0) so that every
client of the first round starts from the shared A, not from its own random init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ClientHook, ClientTask, ClientUpdate, Factors, GlobalState, Method, inherits_rule
from .helpers import (
    data_weights,
    fresh_rows,
    mean_modules,
    module_names,
    module_seed,
    module_shape,
    padded_modules,
    weighted_padded_sum,
    zero_rank_state,
)

# Rows of the shared A are drawn in blocks, each from its own seed, so that the first r rows
# are the same whatever larger rank anyone asks for.
ROW_BLOCK = 16


def shared_A(seed: int, module: str, rank: int, n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The first `rank` rows of module's frozen A (deterministic in seed and module name)."""
    blocks = [fresh_rows(ROW_BLOCK, n, module_seed(seed, module, j), dtype, device) for j in range(-(-rank // ROW_BLOCK))]
    if not blocks:
        return torch.zeros(0, n, dtype=dtype, device=device)
    return torch.cat(blocks, dim=0)[:rank].contiguous()


@dataclass(frozen=True)
class FrozenA(ClientHook):
    """Client option "freeze_A": true: train B only. The server checks that A comes back as it
    was sent (the tolerance allows a half-precision transport)."""

    option: ClassVar[str] = "freeze_A"
    needs_adapter: ClassVar[bool] = True

    @classmethod
    def parse(cls, value) -> FrozenA | None:
        if not isinstance(value, bool):
            raise ValueError(f"client option freeze_A must be true or false, got {value!r}")
        return cls() if value else None

    def start(self, local) -> None:
        for A, _ in local.weights.values():
            A.requires_grad_(False)

    def check_module(self, module: str, sent, task: ClientTask, shape: tuple[int, int]) -> str | None:
        frozen = task.factors or {}
        if module not in frozen:
            return None
        A, A0 = sent[0], frozen[module][0].to(device=sent[0].device, dtype=sent[0].dtype)
        if A.shape != A0.shape or float(torch.linalg.norm(A - A0)) > 1e-2 * float(torch.linalg.norm(A0)) + 1e-6:
            return "A changed although the task froze it (freeze_A)"
        return None


class FFALoRA(Method):
    """Federated freeze-A LoRA: B averaged (zero-padded for heterogeneous ranks), A shared."""

    name = "ffa"
    client_hooks = (FrozenA,)
    privacy_space = "factors"  # clipped and noised as (A, s·B), inside its weighted sums

    def __init__(self, seed: int = 0):
        """seed: of the shared frozen A (the same for every client and round)."""
        self.seed = seed

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        """Rank-0 state: B = 0 and an empty A that records n; ranks grow at aggregation."""
        return zero_rank_state(shapes)

    def client_options(self, state: GlobalState | None, round_: int, rank_type: str) -> dict:
        return {"freeze_A": True}

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        weights = data_weights(updates)
        new: GlobalState = {}
        for module in module_names(updates):
            m, n = module_shape(updates, module)
            R = max(u.rank(module) for u in updates)
            if state is not None and f"{module}.A" in state:
                R = max(R, state[f"{module}.A"].shape[0])
            B = weighted_padded_sum(
                [u.factors[module][1] for u in updates], [p * u.scale(module) for p, u in zip(weights, updates)], 1, R
            )
            new[f"{module}.A"] = shared_A(self.seed, module, R, n, B.dtype, B.device)
            new[f"{module}.B"] = B
        return new

    def secure_summands(self) -> tuple[str, ...]:
        inherits_rule(self, FFALoRA)
        return ("B",)  # A is the shared frozen one: the server knows it

    def from_secure_mean(
        self, mean: dict[str, torch.Tensor], state: GlobalState | None, lora_alpha: float, ranks: dict[str, list[int]]
    ) -> GlobalState:
        """B = Σ p_k s_k pad(B_k), padded further to the previous state's rank (as ``aggregate``)."""
        if state is None:
            raise ValueError("ffa: the state must come from init_state (the frozen A is part of it)")
        new: GlobalState = {}
        for module in mean_modules(mean, "B"):
            B, n = mean[f"{module}.B"], state[f"{module}.A"].shape[1]
            R = max(B.shape[1], state[f"{module}.A"].shape[0])
            B = torch.cat([B, B.new_zeros(B.shape[0], R - B.shape[1])], dim=1) if R > B.shape[1] else B
            new[f"{module}.A"] = shared_A(self.seed, module, R, n, B.dtype, B.device)
            new[f"{module}.B"] = B
        return new

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """The shared A's first r rows and B[:, :r] / s_r (zero columns beyond the state's rank)."""
        if state is None:
            raise ValueError("ffa: the state must come from init_state (the frozen A is part of it)")
        out = {}
        for module, rank in module_ranks.items():
            if f"{module}.A" not in state:
                raise KeyError(f"module {module!r} is not in the FFA-LoRA state")
            A_state, B_state = state[f"{module}.A"], state[f"{module}.B"]
            A = shared_A(self.seed, module, rank, A_state.shape[1], A_state.dtype, A_state.device)
            k = min(rank, B_state.shape[1])
            B = B_state.new_zeros(B_state.shape[0], rank)
            B[:, :k] = B_state[:, :k] / (lora_alpha / rank)
            out[module] = (A, B)
        return out

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        ranks = {module: state[f"{module}.A"].shape[0] for module in padded_modules(state)}
        ranks = {module: r for module, r in ranks.items() if r > 0}
        return self.client_factors(state, ranks, lora_alpha) if ranks else {}, ranks
