"""FedIT / homogeneous FedAvg of LoRA (Zhang et al., 2023): average A and B separately.

Every client trains the same rank per module and the same lora_alpha; the server takes
A = Σ p_k A_k and B = Σ p_k B_k (p_k = n_k / Σ n_j). FedIT and FedAvg differ only in the
local optimizer (AdamW vs SGD), which is the client's business, not the aggregator's.

State keys per module: f"{module}.A" (r, n), f"{module}.B" (m, r), f"{module}.alpha" (0-dim).
Before round 1 the state has rank 0 (see helpers.zero_rank_state): every client starts from the
same adapter, A = the module's shared seeded rows and B = 0, so the first average of A and B
is an average around one point (clients with their own random A's would average to noise).
"""

from __future__ import annotations

import torch

from .base import ClientUpdate, Factors, GlobalState, Method, inherits_rule
from .helpers import (
    compute_dtype,
    data_weights,
    mean_modules,
    module_names,
    module_seed,
    module_shape,
    slice_factors,
    zero_rank_state,
)


def check_homogeneous(updates: list[ClientUpdate], module: str) -> int:
    """The common rank of a module; ValueError naming the first client that differs."""
    first = updates[0]
    rank = first.rank(module)
    for u in updates[1:]:
        if u.rank(module) != rank:
            raise ValueError(
                f"FedIT needs one rank per module: client {u.client_id} has rank {u.rank(module)} "
                f"on module {module}, client {first.client_id} has rank {rank}"
            )
    return rank


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ p_k t_k, accumulated in float32 (float64 if any input is), on the first tensor's device."""
    dtype, device = compute_dtype(*tensors), tensors[0].device
    out = torch.zeros(tensors[0].shape, dtype=dtype, device=device)
    for p, t in zip(weights, tensors):
        out += p * t.to(dtype=dtype, device=device)
    return out


class FedIT(Method):
    """FedIT aggregation: data-weighted mean of A and of B, one rank and one alpha for all."""

    name = "fedit"
    homogeneous = True  # the server cuts every client to the federation's smallest rank
    privacy_space = "factors"  # clipped and noised as (A, s·B), inside its weighted sums

    def __init__(self, seed: int = 0):
        """seed: of the shared initial A every client of round 1 starts from."""
        self.seed = seed

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        return zero_rank_state(shapes)

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        weights = data_weights(updates)
        alpha = updates[0].lora_alpha
        for u in updates[1:]:
            if u.lora_alpha != alpha:
                raise ValueError(
                    f"FedIT needs one lora_alpha: client {u.client_id} has {u.lora_alpha}, "
                    f"client {updates[0].client_id} has {alpha}"
                )
        new: GlobalState = {}
        for module in module_names(updates):
            check_homogeneous(updates, module)
            module_shape(updates, module)
            new[f"{module}.A"] = weighted_mean([u.factors[module][0] for u in updates], weights)
            new[f"{module}.B"] = weighted_mean([u.factors[module][1] for u in updates], weights)
            new[f"{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float64)
        return new

    def secure_summands(self) -> tuple[str, ...]:
        inherits_rule(self, FedIT)
        return ("A", "B")

    def from_secure_mean(
        self, mean: dict[str, torch.Tensor], state: GlobalState | None, lora_alpha: float, ranks: dict[str, list[int]]
    ) -> GlobalState:
        """Σ p_k A_k and Σ p_k s B_k / s: one rank and one α, so the plain means of A and B."""
        new: GlobalState = {}
        for module in mean_modules(mean, "A"):
            A = mean[f"{module}.A"]
            new[f"{module}.A"] = A
            new[f"{module}.B"] = mean[f"{module}.B"] / (lora_alpha / A.shape[0])
            new[f"{module}.alpha"] = torch.tensor(float(lora_alpha), dtype=torch.float64)
        return new

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """The averaged (A, B), copied. A client asking for another rank is an error. If its
        lora_alpha differs from the state's, B is rescaled so that s·B·A is unchanged."""
        if state is None:
            return None
        out = {}
        for module, rank in module_ranks.items():
            if f"{module}.A" not in state:
                raise KeyError(f"module {module!r} is not in the FedIT state")
            state_rank = state[f"{module}.A"].shape[0]
            if state_rank == 0:  # before the first aggregation: the shared initial adapter
                A, B = state[f"{module}.A"], state[f"{module}.B"]
                out[module] = slice_factors(A, B, rank, lora_alpha, module_seed(self.seed, module))
                continue
            if rank != state_rank:
                raise ValueError(f"FedIT state has rank {state_rank} on module {module}; a client asked for rank {rank}")
            out[module] = self._factors(state, module, lora_alpha)
        return out

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        modules = sorted(key[: -len(".A")] for key in state if key.endswith(".A") and state[key].shape[0] > 0)
        factors = {module: self._factors(state, module, lora_alpha) for module in modules}
        return factors, {module: A.shape[0] for module, (A, _) in factors.items()}

    # The parameters a server optimizer steps (see server_opt.py): A and B of every module.

    def server_params(self, state: GlobalState) -> dict[str, torch.Tensor]:
        return {key: value for key, value in state.items() if key.endswith((".A", ".B"))}

    def from_server_params(self, params: dict[str, torch.Tensor], like: GlobalState) -> GlobalState:
        return {**like, **params}

    @staticmethod
    def _factors(state: GlobalState, module: str, lora_alpha: float) -> Factors:
        A, B = state[f"{module}.A"], state[f"{module}.B"]
        ratio = float(state[f"{module}.alpha"]) / lora_alpha  # same rank, so s_state/s_client
        return A.clone(), (B * ratio if ratio != 1.0 else B.clone())
