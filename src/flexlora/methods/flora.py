"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024): stacking.

Each round the server forms the exact ΔW = Σ_k p_k s_k B_k A_k (what FLoRA's stacked
[B_1 … B_K] [A_1; …; A_K] computes) and merges it into the base weights; every client then
starts the next round from a fresh LoRA at its own rank on the merged weights. Nothing is
truncated, so heterogeneous ranks aggregate exactly; the price is a dense change of the base
weights, which the server must send (here: the global base offset, see ``base_offset``).

State keys per module: f"{module}.offset" (m, n) = the sum of every round's ΔW so far, and
f"{module}.shape" ([m, n], int64) so that clients can be handed their fresh start: the same
adapter for all (the module's shared seeded A rows, B = 0), as for every other method.
"""

from __future__ import annotations

import torch

from .base import ClientUpdate, Factors, GlobalState, Method, inherits_rule
from .helpers import data_weights, delta_matrix, mean_modules, module_names, module_seed, module_shape, slice_factors


def merged(deltas: dict[str, torch.Tensor], state: GlobalState | None) -> GlobalState:
    """The state after merging this round's ΔW per module into the offset."""
    new: GlobalState = {k: v for k, v in (state or {}).items() if k.endswith(".shape")}
    for module, delta in deltas.items():
        previous = None if state is None else state.get(f"{module}.offset")
        new[f"{module}.offset"] = delta if previous is None else previous.to(delta) + delta
    return new


class FLoRA(Method):
    """Stacking: the exact weighted sum of the clients' updates is merged into the base."""

    name = "flora"
    changes_base_weights = True  # every round's update is merged into the base (base_offset)
    privacy_refusal = "not implemented: its ΔW sum is formed and merged inside aggregate(), where noise cannot join it yet"

    def __init__(self, seed: int = 0):
        """seed: of the shared A rows of every round's fresh start."""
        self.seed = seed

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        return {f"{module}.shape": torch.tensor(shape, dtype=torch.int64) for module, shape in shapes.items()}

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        weights = data_weights(updates)
        deltas = {}
        for module in module_names(updates):
            module_shape(updates, module)
            deltas[module] = delta_matrix(updates, module, weights)
        return merged(deltas, state)

    def secure_summands(self) -> tuple[str, ...]:
        inherits_rule(self, FLoRA)
        return ("dense",)

    def from_secure_mean(
        self, mean: dict[str, torch.Tensor], state: GlobalState | None, lora_alpha: float, ranks: dict[str, list[int]]
    ) -> GlobalState:
        """The mean is this round's ΔW = Σ p_k s_k B_k A_k: merged into the offset."""
        return merged({module: mean[f"{module}.dense"] for module in mean_modules(mean, "dense")}, state)

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """A fresh start every round (the previous rounds live in the base offset), the same for
        every client: A = the module's shared seeded rows, B = 0."""
        if state is None:
            return None
        out = {}
        for module, rank in module_ranks.items():
            if f"{module}.shape" in state:
                m, n = (int(v) for v in state[f"{module}.shape"])
            elif f"{module}.offset" in state:
                m, n = state[f"{module}.offset"].shape
            else:
                raise KeyError(f"module {module!r} is not in the {self.name} state")
            empty_A, empty_B = torch.zeros(0, n), torch.zeros(m, 0)
            out[module] = slice_factors(empty_A, empty_B, rank, lora_alpha, module_seed(self.seed, module))
        return out

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        """No adapter: the whole global model is base + offset."""
        return {}, {}

    def base_offset(self, state: GlobalState | None) -> dict | None:
        if state is None:
            return None
        offsets = {key[: -len(".offset")]: value for key, value in state.items() if key.endswith(".offset")}
        return offsets or None
