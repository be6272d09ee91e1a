"""raFLoRA (Wu, Hu, Min & Wang, "Preventing Rank Collapse in Federated Low-Rank Adaptation with
Client Heterogeneity", arXiv 2602.13486, 2026): rank-partitioned aggregation, then FlexLoRA's
SVD-based allocation.

The paper, abstract (v2): "we identify a previously overlooked phenomenon in heterogeneous
FedLoRA with SVD-based allocation, termed rank collapse, where the energy of the global update
becomes concentrated in the minimum shared rank [...] the root cause of rank collapse: a
mismatch between rank-agnostic aggregation weights and rank-dependent client contributions
[...] we propose raFLoRA, a rank-partitioned aggregation method that decomposes local updates
into rank partitions and then aggregates each partition weighted by its effective client
contributions."

The per-partition rule (the paper's Algorithm 1 / Eq. (8)) is unreadable in every stored copy of
the paper. The rule below rests on the sentence above and on a third-party reimplementation
whose own header calls it "paper-oriented", not strictly faithful (a machine-generated summary,
pith.science/p/2602.13486, reads it the same way; neither is the paper's text):
partitions [l, h) between the sorted distinct client ranks; C_h = {k | r_k >= h}
(the clients that cover the partition); N_h = Σ_{k∈C_h} n_k;
ΔW_h = Σ_{k∈C_h} (n_k / N_h) · s_k B_k[:, l:h] A_k[l:h, :]; ΔW = Σ_h ΔW_h; its truncated SVD
is the global model and a client of rank r gets the best rank-r approximation (FlexLoRA's
allocation). docs/baselines.md says what is open.

Since C_h changes only at a client rank, the partitions are the same as weighting each rank
component j (0-based) by p_k / P_j with P_j = Σ_{k: r_k > j} p_k: component j of every client
that has it, renormalised over exactly those clients. That is what is computed (per module,
with the ranks each client sent for that module), by scaling column j of each B_k by 1 / P_j
and handing the result to FlexLoRA's aggregation (stacked factors, no m×n matrix where
Σ r_k < min(m, n)). With one rank every P_j = 1 and this is FlexLoRA; weighting every
component over all clients (P_j = 1 throughout) is FlexLoRA, the rank-agnostic rule the paper
says causes the collapse.

State, client factors, global factors and the truncation report are FlexLoRA's (U, S, Vh, E
per module), so per-round spectrum metrics read it the same way.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Accumulator, ClientUpdate, GlobalState, Method
from .flexlora import FlexLoRA
from .helpers import data_weights, module_names, module_shape


def coverage(ranks: list[int], weights: list[float]) -> list[float]:
    """P_j for j = 0 .. max(ranks) − 1: the total weight of the clients whose rank exceeds j
    (those that have a rank component j), in float64 arithmetic."""
    if len(ranks) != len(weights):
        raise ValueError(f"coverage needs one weight per rank, got {len(ranks)} ranks and {len(weights)} weights")
    R = max(ranks, default=0)
    out = [0.0] * R
    for r, w in zip(ranks, weights):
        for j in range(r):
            out[j] += float(w)
    return out


def partition_bands(ranks: list[int]) -> list[tuple[int, int]]:
    """The rank partitions [l, h) between the sorted distinct ranks (e.g. ranks 8, 30, 200:
    [0, 8), [8, 30), [30, 200)); every component in a band has the same covering clients."""
    bands, low = [], 0
    for high in sorted(set(ranks)):
        if high > low:
            bands.append((low, high))
            low = high
    return bands


def column_scales(rank: int, covered: list[float], dtype: torch.dtype, device=None) -> torch.Tensor:
    """1 / P_j for the first `rank` components (0 where nothing covers j: no weight there)."""
    P = torch.tensor(covered[:rank], dtype=torch.float64)
    return torch.where(P > 0, 1.0 / P.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(P)).to(
        dtype=dtype, device=device
    )


def partition_weighted(updates: list[ClientUpdate], weights: list[float]) -> list[ClientUpdate]:
    """The updates with column j of each B_k divided by P_j (per module), so that
    Σ_k p_k s_k B'_k A_k = Σ_j Σ_{k: r_k > j} (p_k / P_j) s_k b_kj a_kjᵀ, and weight p_k set."""
    out = [dict() for _ in updates]
    for module in module_names(updates):
        module_shape(updates, module)
        covered = coverage([u.rank(module) for u in updates], weights)
        for slot, u in zip(out, updates):
            A, B = u.factors[module]
            slot[module] = (A, B * column_scales(B.shape[1], covered, B.dtype, B.device))
    return [dataclasses.replace(u, factors=f, weight=p) for u, f, p in zip(updates, out, weights)]


class RaFLoRA(FlexLoRA):
    """Rank-partitioned aggregation (each rank component over the clients that have it, data
    weights renormalised over them), then FlexLoRA's truncated SVD and allocation."""

    name = "raflora"
    privacy_space = None  # not FlexLoRA's: its sum is partitioned by rank
    privacy_refusal = "not implemented: each rank partition is a sum over the clients covering it, with a sensitivity of its own"
    # The paper pairs the rule with no server optimizer; FlexLoRA's would step the dense ΔW of
    # a rule that is not a weighted mean of the starting points: off (check_composable says so).
    server_params = Method.server_params
    from_server_params = Method.from_server_params

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        """ΔW = Σ_j Σ_{k: r_k > j} (p_k / P_j) s_k b_kj a_kjᵀ per module (p_k: ClientUpdate.weight,
        else n_k / Σ n), kept as its top-K SVD like FlexLoRA's. The previous state is not needed."""
        if not updates:
            raise ValueError("aggregation needs at least one client")
        return FlexLoRA.aggregate(self, partition_weighted(updates, data_weights(updates)), state)

    def accumulator(self, state: GlobalState | None) -> Accumulator:
        """P_j depends on every client of the round: the updates are kept to the end."""
        return Accumulator(self, state)
