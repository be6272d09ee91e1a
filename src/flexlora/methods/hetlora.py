"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", 2023/2024): zero-padding aggregation of heterogeneous ranks.

Per module, every client's A_k (r_k, n) is zero-padded to R = max_k r_k rows and B_k (m, r_k) to
R columns; the server takes the weighted averages and a client of rank r starts from their first
r rows / columns. Weights are either the data sizes p_k = n_k / Σ n_j (as in the FlexLoRA paper's
comparison) or HetLoRA's sparsity weights, p_k ∝ ‖s_k B_k A_k‖_F per module.

Scale: PEFT multiplies B A by s = α / r, which differs between ranks. The server averages the
*scaled* B (s_k B_k) and a client of rank r divides by its own s_r, so that a client's update
keeps its size whatever rank it is read back at; with one rank (and one α) this is exactly the
plain average of B_k. State keys per module: f"{module}.A" = Σ p_k pad(A_k) (R, n) and
f"{module}.B" = Σ p_k s_k pad(B_k) (m, R); the global update is B @ A.

Padding (argument ``padding``): "zero" (HetLoRA's, the default) or "replication", Byun & Lee
("Towards Federated Low-Rank Adaptation of Language Models with Rank Heterogeneity", NAACL
2025): "we propose a replication-based padding strategy that better retains valuable
information from clients with high-quality data" (abstract). The rank components a low-rank
client lacks are filled from the aggregate of the clients that have them instead of with zeros
(their example: a rank-2 client's (a₂,₁, a₂,₂) padded to rank 4 becomes (a₂,₁, a₂,₂, a₁,₃, a₁,₄),
the last two from the rank-4 client). Chosen here (the paper's text beyond its abstract and a
summary of it was not reachable): the fill of component j is the covering clients' weighted
mean ā_j = Σ_{k: r_k > j} p_k a_kj / P_j, P_j = Σ_{k: r_k > j} p_k (the same weights as the
round, renormalised over those clients); the padded average Σ_{r_k > j} p_k a_kj + (1 − P_j) ā_j
then equals ā_j. So replication = each row j of A and column j of s·B averaged over the
clients that have it; a component every client has is averaged as with zero padding.

Client side (ClientTask.options["rank_regularizer"], the RankRegularizer hook below):
the rank self-pruning regularizer λ·‖A[t:]‖_F·‖B[:, t:]‖_F per module, t = ⌊γ r⌋ (at most
r − 1), with a real gradient, and optionally pruning: when ‖A[t:]‖‖B[:, t:]‖ ≤ prune_threshold ·
‖A‖‖B‖ after local training the client keeps only the first t ranks (this round and after).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ClientHook, ClientUpdate, Factors, GlobalState, Method, inherits_rule
from .helpers import (
    data_weights,
    mean_modules,
    module_names,
    module_seed,
    module_shape,
    option_keys,
    option_number,
    padded_modules,
    slice_factors,
    update_norm,
    weighted_padded_sum,
    zero_rank_state,
)

WEIGHTINGS = ("data", "sparsity")
PADDINGS = ("zero", "replication")


def sparsity_weights(updates: list[ClientUpdate], module: str) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation: p_k ∝ ‖s_k B_k A_k‖_F (falls back to data
    weights when every update of the module is zero)."""
    norms = [u.scale(module) * update_norm(*u.factors[module]) for u in updates]
    total = sum(norms)
    if not total > 0:
        return data_weights(updates)
    return [v / total for v in norms]


def padded_average(updates: list[ClientUpdate], module: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ p_k pad(A_k), Σ p_k s_k pad(B_k)), padded to the largest rank among the clients."""
    R = max(u.rank(module) for u in updates)
    A = weighted_padded_sum([u.factors[module][0] for u in updates], weights, dim=0, size=R)
    B = weighted_padded_sum(
        [u.factors[module][1] for u in updates], [p * u.scale(module) for p, u in zip(weights, updates)], dim=1, size=R
    )
    return A, B


def covering_weights(ranks: list[int], weights: list[float]) -> torch.Tensor:
    """P_j, j = 0 .. max(ranks) − 1: the total weight of the clients whose rank exceeds j (float64)."""
    P = torch.zeros(max(ranks), dtype=torch.float64)
    for r, w in zip(ranks, weights):
        P[:r] += float(w)
    return P


def replicated_average(updates: list[ClientUpdate], module: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Replication padding: row j of Σ p_k pad(A_k) and column j of Σ p_k s_k pad(B_k) divided
    by P_j, i.e. each component averaged over the clients that have it (see the module doc:
    the same as padding the others with that average). A component no weighted client has
    stays 0."""
    A, B = padded_average(updates, module, weights)
    P = covering_weights([u.rank(module) for u in updates], weights)
    inverse = torch.where(P > 0, 1.0 / P.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(P))
    return A * inverse.to(A.dtype)[:, None], B * inverse.to(B.dtype)[None, :]


def padded_client_factors(state: GlobalState, module_ranks: dict[str, int], lora_alpha: float, seed: int) -> dict[str, Factors]:
    out = {}
    for module, rank in module_ranks.items():
        if f"{module}.A" not in state:
            raise KeyError(f"module {module!r} is not in the global state")
        out[module] = slice_factors(state[f"{module}.A"], state[f"{module}.B"], rank, lora_alpha, module_seed(seed, module))
    return out


def padded_global_factors(state: GlobalState, lora_alpha: float, seed: int) -> tuple[dict[str, Factors], dict[str, int]]:
    ranks = {module: state[f"{module}.A"].shape[0] for module in padded_modules(state)}
    ranks = {module: r for module, r in ranks.items() if r > 0}  # rank 0: no update yet
    return padded_client_factors(state, ranks, lora_alpha, seed), ranks


# ---------------------------------------------------------------- client side: rank self-pruning


def tail_start(rank: int, gamma: float) -> int:
    """First regularized (and prunable) rank index, ⌊γ r⌋, at most r − 1 so the tail is never empty."""
    return min(int(math.floor(gamma * rank)), rank - 1)


@dataclass(frozen=True)
class RankRegularizer(ClientHook):
    """Client option "rank_regularizer": {"lambda": λ, "gamma": γ, "prune_threshold": t | null}:
    add λ·Σ_modules ‖A[s:]‖_F·‖B[:, s:]‖_F to the loss, s = tail_start(r, γ); after training,
    prune a module to rank s when ‖A[s:]‖‖B[:, s:]‖ ≤ t·‖A‖‖B‖."""

    lam: float
    gamma: float
    prune_threshold: float | None = None

    option: ClassVar[str] = "rank_regularizer"
    needs_adapter: ClassVar[bool] = True

    @classmethod
    def parse(cls, value) -> RankRegularizer | None:
        if value is None:
            return None
        option_keys(value, "rank_regularizer", ("lambda", "gamma", "prune_threshold"))
        threshold = value.get("prune_threshold")
        return cls(
            option_number(value.get("lambda", 0.0), "rank_regularizer.lambda", 0, math.inf),
            option_number(value.get("gamma", 0.99), "rank_regularizer.gamma", 0, 1, open_low=True),
            None if threshold is None else option_number(threshold, "rank_regularizer.prune_threshold", 0, 1),
        )

    def penalty(self, local) -> torch.Tensor | None:
        return rank_regularizer_loss(local.weights, self) if self.lam > 0 else None

    def finish(self, factors: dict[str, Factors], metrics: dict) -> dict[str, Factors]:
        factors, pruned = prune_factors(factors, self)
        if pruned:
            metrics["pruned_ranks"] = pruned
        return factors


def rank_regularizer_loss(lora_weights: dict[str, tuple[torch.Tensor, torch.Tensor]], reg: RankRegularizer) -> torch.Tensor:
    """λ·Σ_modules ‖A[s:]‖_F·‖B[:, s:]‖_F over the (A, B) parameters (differentiable)."""
    total = None
    for A, B in lora_weights.values():
        s = tail_start(A.shape[0], reg.gamma)
        term = torch.linalg.vector_norm(A[s:]) * torch.linalg.vector_norm(B[:, s:])
        total = term if total is None else total + term
    return reg.lam * total


def prune_factors(factors: dict[str, Factors], reg: RankRegularizer) -> tuple[dict[str, Factors], dict[str, int]]:
    """Cut a module to rank s = tail_start(r, γ) when ‖A[s:]‖‖B[:, s:]‖ ≤ threshold·‖A‖‖B‖.

    B is rescaled by s / r so that the kept part of the update, (α/r)·B[:, :s]·A[:s], is what
    the client sends at its new scale α/s. Returns (factors, {module: new rank} of pruned ones)."""
    if reg.prune_threshold is None:
        return factors, {}
    out, pruned = {}, {}
    for module, (A, B) in factors.items():
        r = A.shape[0]
        s = tail_start(r, reg.gamma)
        tail = torch.linalg.vector_norm(A[s:]) * torch.linalg.vector_norm(B[:, s:])
        whole = torch.linalg.vector_norm(A) * torch.linalg.vector_norm(B)
        if s >= 1 and float(tail) <= reg.prune_threshold * float(whole):
            out[module] = (A[:s].clone(), B[:, :s] * (s / r))
            pruned[module] = s
        else:
            out[module] = (A, B)
    return out, pruned


# ---------------------------------------------------------------- server side


class HetLoRA(Method):
    """Zero- (or replication-) padding aggregation with a rank self-pruning regularizer on the
    clients."""

    name = "hetlora"
    prunes_ranks = True  # a client may send back (and keep) a smaller rank than assigned
    client_hooks = (RankRegularizer,)
    privacy_space = "factors"  # clipped and noised as (A, s·B), inside its weighted sums

    def __init__(
        self,
        weighting: str = "data",
        reg_lambda: float = 1e-3,
        reg_gamma: float = 0.99,
        prune_threshold: float | None = None,
        seed: int = 0,
        padding: str = "zero",
    ):
        """weighting: "data" (p_k ∝ n_k) or "sparsity" (p_k ∝ ‖s_k B_k A_k‖). reg_lambda,
        reg_gamma: the regularizer λ·‖A[⌊γr⌋:]‖‖B[:, ⌊γr⌋:]‖ (λ = 0 turns it off).
        prune_threshold: prune a module's rank to ⌊γr⌋ when its tail norm is at most this
        fraction of ‖A‖‖B‖ (None: never). seed: for rows given to ranks above the state's.
        padding: "zero" (HetLoRA) or "replication" (Byun & Lee, NAACL 2025; module doc)."""
        if padding not in PADDINGS:
            raise ValueError(f"hetlora: padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"hetlora: weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if not (isinstance(reg_lambda, (int, float)) and math.isfinite(reg_lambda) and reg_lambda >= 0):
            raise ValueError(f"hetlora: reg_lambda must be a number >= 0, got {reg_lambda!r}")
        if not (isinstance(reg_gamma, (int, float)) and 0 < reg_gamma < 1):
            raise ValueError(f"hetlora: reg_gamma must be in (0, 1), got {reg_gamma!r}")
        if prune_threshold is not None and not (isinstance(prune_threshold, (int, float)) and 0 <= prune_threshold < 1):
            raise ValueError(f"hetlora: prune_threshold must be in [0, 1) or null, got {prune_threshold!r}")
        self.weighting = weighting
        if weighting == "sparsity":  # weights from each update's norm: one client moves the others' shares
            self.privacy_space, self.privacy_refusal = None, "its sparsity weights depend on each update's norm"
        if prune_threshold is not None:  # a pruned rank is chosen from the client's data and kept in the clear
            self.privacy_space, self.privacy_refusal = None, "its clients prune their ranks from their own updates"
        self.padding = padding
        self.reg_lambda = float(reg_lambda)
        self.reg_gamma = float(reg_gamma)
        self.prune_threshold = None if prune_threshold is None else float(prune_threshold)
        self.seed = seed

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        """Rank 0: every client of round 1 starts from the shared initial adapter (seeded A
        rows, nested across ranks; B = 0)."""
        return zero_rank_state(shapes)

    def client_options(self, state: GlobalState | None, round_: int, rank_type: str) -> dict:
        if self.reg_lambda == 0 and self.prune_threshold is None:
            return {}
        return {
            "rank_regularizer": {
                "lambda": self.reg_lambda,
                "gamma": self.reg_gamma,
                "prune_threshold": self.prune_threshold,
            }
        }

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        """Padded weighted averages of A and of s·B; the previous state is not needed (each
        client's factors already start from its slice of it)."""
        new: GlobalState = {}
        data = data_weights(updates)
        for module in module_names(updates):
            module_shape(updates, module)
            weights = data if self.weighting == "data" else sparsity_weights(updates, module)
            average = padded_average if self.padding == "zero" else replicated_average
            new[f"{module}.A"], new[f"{module}.B"] = average(updates, module, weights)
        return new

    def secure_summands(self) -> tuple[str, ...]:
        """Zero padding with data weights only: its state is the mean of the padded A_k and s_k B_k."""
        inherits_rule(self, HetLoRA)
        if self.weighting != "data":
            raise ValueError(
                "hetlora: weighting=sparsity weighs each client by the norm of its own update, which secure aggregation hides; use weighting=data"
            )
        if self.padding != "zero":
            raise ValueError(
                "hetlora: padding=replication averages each rank component over the clients that sent it; secure aggregation supports zero padding only"
            )
        if self.prune_threshold is not None:
            raise ValueError(
                "hetlora: pruning (prune_threshold) changes a client's rank after training, which secure aggregation hides"
            )
        return ("A", "B")

    def from_secure_mean(
        self, mean: dict[str, torch.Tensor], state: GlobalState | None, lora_alpha: float, ranks: dict[str, list[int]]
    ) -> GlobalState:
        """The state is the mean itself: Σ p_k pad(A_k) and Σ p_k s_k pad(B_k)."""
        return {f"{module}.{part}": mean[f"{module}.{part}"] for module in mean_modules(mean, "A") for part in ("A", "B")}

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """The first r rows of A and columns of s·B (divided by the client's s); rows beyond
        the state's rank are the module's shared seeded rows (with B = 0)."""
        if state is None:
            return None
        return padded_client_factors(state, module_ranks, lora_alpha, self.seed)

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        """The global update B @ A per module, as factors at the state's rank R."""
        return padded_global_factors(state, lora_alpha, self.seed)
