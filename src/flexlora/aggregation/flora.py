"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024): stacking.

Each round the server forms the exact ΔW = Σ_k p_k s_k B_k A_k (what FLoRA's stacked
[B_1 … B_K] [A_1; …; A_K] computes) and merges it into the base weights; every client then
starts the next round from a fresh LoRA at its own rank on the merged weights. Nothing is
truncated, so heterogeneous ranks aggregate exactly; the price is a dense change of the base
weights, which the server must send (here: the global base offset, see ``base_offset``).

State keys per module: f"{module}.offset" (m, n) = the sum of every round's ΔW so far.
"""

from __future__ import annotations

from .base import ClientUpdate, Factors, GlobalState, data_weights, module_names, module_shape
from .flexlora import delta_matrix


class FLoRA:
    """Stacking: the exact weighted sum of the clients' updates is merged into the base."""

    name = "flora"

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        weights = data_weights(updates)
        new: GlobalState = {}
        for module in module_names(updates):
            module_shape(updates, module)
            delta = delta_matrix(updates, module, weights)
            previous = None if state is None else state.get(f"{module}.offset")
            new[f"{module}.offset"] = delta if previous is None else previous.to(delta) + delta
        return new

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """Always a fresh PEFT init: the previous rounds live in the base offset."""
        return None

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        """No adapter: the whole global model is base + offset."""
        return {}, {}

    def base_offset(self, state: GlobalState | None) -> dict | None:
        if state is None:
            return None
        return {key[: -len(".offset")]: value for key, value in state.items() if key.endswith(".offset")}
