"""Client-side behaviour a method asks for, and the small pieces of local training it needs.

A method sends plain JSON in ``ClientTask.options`` (it travels over any transport); the client
parses it with ``ClientOptions.parse`` (unknown keys or bad values: one-line ValueError) and
``client.train_client`` applies it. Keys:

- "rank_regularizer": {"lambda": λ, "gamma": γ, "prune_threshold": t | null} (HetLoRA): add
  λ·Σ_modules ‖A[s:]‖_F·‖B[:, s:]‖_F to the loss, s = tail_start(r, γ); after training, prune
  a module to rank s when ‖A[s:]‖‖B[:, s:]‖ ≤ t·‖A‖‖B‖.
- "freeze_A": true (FFA-LoRA): train B only.
- "fedprox_mu": μ (FedProx): add μ/2·Σ ‖w − w₀‖² over the trainable parameters.
- "sparse": {"density": d | "lora_budget", "seed": s, "lr": η (optional)} (SLoRA stage 1):
  train the target modules' weights themselves, each only where its fixed random mask is set
  (``sparse_mask``), and send back the sparse change instead of LoRA factors.

Keys the reliability layer adds (e.g. "timeout_s") are passed through untouched.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from flexlora.aggregation.base import Factors, SparseDelta

# Options handled elsewhere (by the runtime / reliability layer), accepted as they are.
PASSTHROUGH = ("timeout_s", "inject_failure")


@dataclass(frozen=True)
class RankRegularizer:
    lam: float
    gamma: float
    prune_threshold: float | None = None


@dataclass(frozen=True)
class SparseTraining:
    density: float | str  # a fraction in (0, 1], or "lora_budget": r (m + n) / (m n) per module
    seed: int
    lr: float | None = None


@dataclass(frozen=True)
class ClientOptions:
    rank_regularizer: RankRegularizer | None = None
    freeze_A: bool = False
    fedprox_mu: float = 0.0
    sparse: SparseTraining | None = None

    @classmethod
    def parse(cls, options: dict | None) -> ClientOptions:
        options = dict(options or {})
        known = ("rank_regularizer", "freeze_A", "fedprox_mu", "sparse", *PASSTHROUGH)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"client option {unknown[0]!r} is unknown; known options: {', '.join(known)}")
        reg = options.get("rank_regularizer")
        if reg is not None:
            _keys(reg, "rank_regularizer", ("lambda", "gamma", "prune_threshold"))
            threshold = reg.get("prune_threshold")
            reg = RankRegularizer(
                _number(reg.get("lambda", 0.0), "rank_regularizer.lambda", 0, math.inf),
                _number(reg.get("gamma", 0.99), "rank_regularizer.gamma", 0, 1, open_low=True),
                None if threshold is None else _number(threshold, "rank_regularizer.prune_threshold", 0, 1),
            )
        sparse = options.get("sparse")
        if sparse is not None:
            _keys(sparse, "sparse", ("density", "seed", "lr"))
            density = sparse.get("density", "lora_budget")
            if density != "lora_budget":
                density = _number(density, "sparse.density", 0, 1, open_low=True, closed_high=True)
            seed = sparse.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"client option sparse.seed must be an integer, got {seed!r}")
            lr = sparse.get("lr")
            sparse = SparseTraining(density, seed, None if lr is None else _number(lr, "sparse.lr", 0, math.inf, open_low=True))
        freeze = options.get("freeze_A", False)
        if not isinstance(freeze, bool):
            raise ValueError(f"client option freeze_A must be true or false, got {freeze!r}")
        if sparse is not None and (freeze or reg is not None):
            raise ValueError("client option sparse trains the weights, not an adapter: it excludes freeze_A and rank_regularizer")
        mu = _number(options.get("fedprox_mu", 0.0), "fedprox_mu", 0, math.inf)
        return cls(reg, freeze, mu, sparse)


def _keys(value, name: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"client option {name} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"client option {name}.{unknown[0]} is unknown; known: {', '.join(allowed)}")


def _number(value, name: str, low: float, high: float, *, open_low=False, closed_high=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value <= high if closed_high else value < high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise ValueError(f"client option {name} must be a number in {interval}, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- HetLoRA rank self-pruning


def tail_start(rank: int, gamma: float) -> int:
    """First regularized (and prunable) rank index, ⌊γ r⌋, at most r − 1 so the tail is never empty."""
    return min(int(math.floor(gamma * rank)), rank - 1)


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


# ---------------------------------------------------------------- FedProx


def proximal_loss(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """μ/2·Σ ‖w − w₀‖² (FedProx)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


# ---------------------------------------------------------------- SLoRA sparse stage


def lora_budget_density(rank: int, shape: tuple[int, int]) -> float:
    """The fraction of an (m, n) weight a rank-r LoRA trains: r (m + n) / (m n), at most 1."""
    m, n = shape
    return min(1.0, rank * (m + n) / (m * n))


def sparse_mask(shape: tuple[int, int], density: float, seed: int, module: str, device=None) -> torch.Tensor:
    """Boolean (m, n) mask {u < density}, u uniform from a generator seeded by (seed, module):
    the same for every client and round, and nested across densities."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63)
    return (torch.rand(shape, generator=gen) < density).to(device)


def sparse_delta(after: torch.Tensor, before: torch.Tensor, mask: torch.Tensor) -> SparseDelta:
    """The change after − before at the mask's entries, as a SparseDelta on the CPU."""
    indices = mask.flatten().nonzero().squeeze(1).cpu()
    values = (after.detach() - before).flatten().cpu()[indices]
    return SparseDelta(indices, values, tuple(after.shape))
