"""The one interface every aggregation method implements.

Everything here is pure tensor math: no I/O, no model, no transport. A method sees the
LoRA factors the clients sent and the previous global state, and returns the new global
state; it also tells a client of a given rank which factors to start its next round from.

Conventions (PEFT's): for a target module with weight W of shape (m, n) (out, in),
a client of rank r holds A (r, n) and B (m, r), and its update is  s * B @ A  with
s = lora_alpha / r.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B): A (r, n), B (m, r)
GlobalState = dict[str, torch.Tensor]  # flat and safetensors-ready; keys are method-defined


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: str
    num_examples: int  # n_k: the aggregation weight is n_k / sum_j n_j over the round
    lora_alpha: float
    factors: dict[str, Factors]  # target-module name -> (A, B)
    metrics: dict = field(default_factory=dict)

    def rank(self, module: str) -> int:
        return self.factors[module][0].shape[0]

    def scale(self, module: str) -> float:
        return self.lora_alpha / self.rank(module)


def data_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j over the clients of this round."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("aggregation needs at least one client with num_examples > 0")
    return [u.num_examples / total for u in updates]


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
