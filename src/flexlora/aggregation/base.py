"""The one interface every aggregation method implements.

Everything here is pure tensor math: no I/O, no model, no transport. A method sees the
LoRA factors the clients sent and the previous global state, and returns the new global
state; it also tells a client of a given rank which factors to start its next round from.

Conventions (PEFT's): for a target module with weight W of shape (m, n) (out, in),
a client of rank r holds A (r, n) and B (m, r), and its update is  s * B @ A  with
s = lora_alpha / r.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B): A (r, n), B (m, r)
GlobalState = dict[str, torch.Tensor]  # flat and safetensors-ready; keys are method-defined


class SparseDelta(NamedTuple):
    """A sparse change of one weight matrix (m, n) = `shape`: the entries at the flat
    (row-major) `indices` change by `values`. Sent by SLoRA's sparse phase instead of factors."""

    indices: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,)
    shape: tuple[int, int]

    def to_dense(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype or self.values.dtype, device=device)
        out[self.indices.to(out.device)] = self.values.to(dtype=out.dtype, device=out.device)
        return out.view(self.shape)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: str
    num_examples: int  # n_k: the aggregation weight is n_k / sum_j n_j over the round
    lora_alpha: float
    factors: dict[str, Factors]  # target-module name -> (A, B); empty in SLoRA's sparse phase
    metrics: dict = field(default_factory=dict)
    # Changes of the base weights themselves (SLoRA's sparse phase): module name -> delta.
    deltas: dict[str, SparseDelta] = field(default_factory=dict)
    # The aggregation weight p_k the server assigned this round (num_examples bounded by
    # federation.max_weight_share, see capped_weights); None: n_k / sum_j n_j.
    weight: float | None = None

    def rank(self, module: str) -> int:
        return self.factors[module][0].shape[0]

    def scale(self, module: str) -> float:
        return self.lora_alpha / self.rank(module)


def data_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k of each update: the weight the server assigned (`ClientUpdate.weight`, set on every
    update of a round by FederatedServer, already summing to 1), else n_k / sum_j n_j over the
    clients of this round. Every method takes its weights from here, so a bound the server
    puts on the weights holds whatever the method."""
    if updates and all(u.weight is not None for u in updates):
        return [float(u.weight) for u in updates]
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("aggregation needs at least one client with num_examples > 0")
    return [u.num_examples / total for u in updates]


def capped_weights(sizes: list[float], max_share: float | None) -> tuple[list[float], bool]:
    """(weights, feasible): p_k = n_k / sum_j n_j, except that no p_k exceeds `max_share`; the
    excess is spread over the others in proportion to their n_k (water-filling: clients at the
    cap stay there, the rest share what is left, repeated until nobody is above it), so the
    weights still sum to 1. With max_share * K < 1 no such weights exist: every client then
    gets 1/K and `feasible` is False. max_share=None: the plain proportional weights."""
    total = sum(sizes)
    if not sizes or total <= 0 or any(n < 0 for n in sizes):
        raise ValueError("weights need non-negative sizes with a positive sum")
    plain = [n / total for n in sizes]
    if max_share is None or max(plain) <= max_share:
        return plain, True
    k = len(sizes)
    if max_share * k < 1:
        return [1.0 / k] * k, False
    capped: set[int] = set()
    while True:
        free = [i for i in range(k) if i not in capped]
        left = 1.0 - max_share * len(capped)
        free_total = sum(sizes[i] for i in free)
        weights = [max_share] * k
        for i in free:
            weights[i] = left * sizes[i] / free_total if free_total > 0 else left / len(free)
        over = {i for i in free if weights[i] > max_share}
        if not over:
            return weights, True
        capped |= over


def module_names(updates: list[ClientUpdate]) -> list[str]:
    names = sorted(updates[0].factors)
    for u in updates[1:]:
        if sorted(u.factors) != names:
            raise ValueError(f"client {u.client_id} sent a different set of modules")
    return names


def module_shape(updates: list[ClientUpdate], module: str) -> tuple[int, int]:
    """(m, n) of a module's weight, checking every client's A (r, n) and B (m, r) agree."""
    shape = None
    for u in updates:
        A, B = u.factors[module]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"client {u.client_id}, module {module}: need A (r, n) and B (m, r), "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
        mn = (B.shape[0], A.shape[1])
        if shape is None:
            shape = mn
        elif mn != shape:
            raise ValueError(f"client {u.client_id}, module {module}: weight shape {mn}, others have {shape}")
    if shape is None:
        raise ValueError("aggregation needs at least one client")
    return shape


def module_seed(seed: int, module: str, *parts: int) -> int:
    """A deterministic 63-bit seed for (run seed, module name, parts...), stable across processes."""
    value = seed * 1_000_003 + zlib.crc32(module.encode())
    for part in parts:
        value = value * 1_000_003 + part
    return value % 2**63


def fresh_rows(count: int, n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """`count` rows of a LoRA A drawn like PEFT's fresh init (kaiming-uniform: U(-1/√n, 1/√n)),
    from a generator seeded with `seed` (deterministic, the global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    rows = (torch.rand(count, n, generator=gen, dtype=torch.float64) * 2 - 1) / n**0.5
    return rows.to(dtype=dtype, device=device)


def zero_rank_state(shapes: dict[str, tuple[int, int]], a_key: str = "A", b_key: str = "B") -> GlobalState:
    """A state of rank 0 per module (A (0, n), B (m, 0): no update yet) that still records every
    module's shape, so that a client of round 1 starts from the shared initial adapter (see
    slice_factors) instead of its own random PEFT init: FedAvg-style averaging of A and B
    assumes every client started from one point."""
    state: GlobalState = {}
    for module, (m, n) in shapes.items():
        state[f"{module}.{a_key}"] = torch.zeros(0, n)
        state[f"{module}.{b_key}"] = torch.zeros(m, 0)
    return state


def weighted_padded_sum(tensors: list[torch.Tensor], weights: list[float], dim: int, size: int) -> torch.Tensor:
    """Σ_k w_k · t_k with each t_k zero-padded along `dim` (0: rows, 1: columns) to `size`,
    accumulated in float32 (float64 if any input is) on the first tensor's device."""
    dtype, device = compute_dtype(*tensors), tensors[0].device
    shape = list(tensors[0].shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=dtype, device=device)
    for w, t in zip(weights, tensors):
        if w == 0:
            continue
        target = out.narrow(dim, 0, t.shape[dim])
        target.add_(t.to(dtype=dtype, device=device), alpha=w)
    return out


def slice_factors(
    A: torch.Tensor, B_scaled: torch.Tensor, rank: int, lora_alpha: float, pad_seed: int
) -> Factors:
    """A client's (A, B) of `rank` from global factors A (R, n) and B_scaled (m, R) whose
    product B_scaled @ A is the global update (the LoRA scale folded into B): the first `rank`
    rows of A, the first `rank` columns of B_scaled divided by the client's scale α/rank.
    If rank > R, B gets zero columns (the product is unchanged) and A fresh rows (PEFT-like,
    seeded with `pad_seed`) so that the extra rank can learn; with R = 0 (a zero_rank_state)
    this is the shared initial adapter, the same rows for every client of the module (a
    prefix of one seeded draw, so nested across ranks). Never aliases the inputs."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = min(rank, A.shape[0])
    a = A[:k].clone()
    b = B_scaled[:, :k] / (lora_alpha / rank)
    if rank > k:
        a = torch.cat([a, fresh_rows(rank - k, A.shape[1], pad_seed, a.dtype, a.device)], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a.contiguous(), b.contiguous()


def update_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖B A‖_F from the r×r Gram matrices (‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)), no (m, n) matrix formed."""
    A64, B64 = A.detach().double(), B.detach().double()
    return float(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0).sqrt())


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is promoted for the sums)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class AggregationMethod(Protocol):
    """One class per method (cf. Flower strategies); its math lives in module-level helpers."""

    name: str

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None) -> GlobalState:
        """New global state from this round's updates (and the previous state, if any)."""

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """Factors a client with these per-module ranks starts from; None = fresh PEFT init."""

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        """The global model as LoRA factors (at its full rank) and the rank of each module."""

    # Optional hooks (looked up with getattr; a method defines only those it needs):
    #
    # init_state(shapes: dict[str, (m, n)]) -> GlobalState | None
    #     The state before round 1 (FFA-LoRA: its frozen A). Default: None.
    # client_options(state, round_: int, rank_type: str) -> dict
    #     Plain-JSON settings for the client's local step (see flexlora.client_options):
    #     a regularizer, a frozen A, a proximal term, sparse full-weight training...
    # base_offset(state) -> dict[str, Tensor (m, n)] | None
    #     A dense change of the base weights that is part of the global model (FLoRA's merged
    #     updates, SLoRA's sparse phase): clients train on base + offset, evaluation and export
    #     include it. Default: None.
    # prunes_ranks: bool
    #     Clients may send back a smaller rank than assigned and keep it (HetLoRA).
    # homogeneous: bool
    #     The server cuts every client to the federation's smallest rank (FedIT).
