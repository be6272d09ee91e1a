"""FLoRIST (Ramesh & Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate
Federated Fine-Tuning of Large Language Models", MLSys 2026, arXiv 2506.09199; code:
github.com/Anonymous-user-00/FLoRIST).

Per module, each round:
1. Stack the clients' factors so that their product is the exact weighted sum (FLoRA's
   stacking): B̃ = [p_1 s_1 B_1, …, p_K s_K B_K] (m × R), Ã = [A_1; …; A_K] (R × n), R = Σ r_k,
   p_k = n_k / Σ n_j, s_k = α_k / r_k; ΔW_t = B̃ Ã.
2. Take the SVD of ΔW_t from the stacks without forming it: orthogonalise each stack, SVD of the
   small core, rotate back (svd.truncated_svd; the paper takes an SVD of each stack and of the
   core Σ_B V_Bᵀ U_A Σ_A, which gives the same singular triplets).
3. Keep the smallest global rank k whose singular values hold a share τ of the energy:
   k = min{k : Σ_{i≤k} σ_i² ≥ τ Σ_i σ_i²}; the global pair is B_g = U_k S_k, A_g = V_kᵀ.
4. The global pair is merged into the base weights, and every client, whatever its own rank,
   starts the next round from a fresh LoRA at its own rank on the merged weights.

Step 4 is what the authors' code does (main.py: after ``FedAvg(..., florist=True)`` the global
pair is loaded into a client model and ``merge_and_unload`` merges it into the model from which
every next-round client is copied, with a fresh ``get_peft_model`` at its own rank). So a client
of lower rank than k is served like any other: it merges the rank-k pair (the server sends it
the merged change of the base, see ``base_offset``) and trains its own rank on top; the global
rank k is never a training rank. tests/fixtures/florist_reference.json holds what their
``FedAvg`` produced on seeded heterogeneous-rank inputs; tests/test_florist.py reproduces it.

Where this differs from the authors' code, and why:
- Scale: their stack has no LoRA scale (B unweighted, A weighted by p_k) and the merge multiplies
  by one client's α/r; their heterogeneous runs set α_k = 2 r_k, so every scale is 2 and this is
  exact. Here the scales are α / r_k, which differ by rank, so each client's own s_k goes into its
  column block of B̃ (with one scale the product, the spectrum and k are theirs, times the scale).
- Which factor carries p_k (theirs: A; here: B) changes neither the product nor its SVD.
- When R ≥ min(m, n) the core of step 2 is as large as ΔW itself (min(m, R) × min(n, R)), so
  ΔW is formed once (one product) and decomposed densely, as FlexLoRA does; below that the m × n
  matrix is never formed during aggregation. The merge into the dense base offset forms
  U_k S_k V_kᵀ once per module (the authors' clients do the same when merging).
- Communication: the authors send the rank-k pair; this library's engines send the dense offset
  (as for FLoRA). The global model is the same.
- Round 1: the authors' clients each draw their own PEFT init; here every client of every round
  starts from the module's shared seeded A rows with B = 0 (comparison hygiene; with B = 0 the
  start adds nothing to the aggregate either way).

State keys per module: f"{module}.shape" ([m, n], int64); from round 1 on f"{module}.offset"
(m, n), the sum of every round's merged global pair; f"{module}.spectrum" (float64), the
singular values of the last round's ΔW_t (for the truncation report); f"{module}.global_rank"
(int64, 0-dim), the last round's k.
"""

from __future__ import annotations

import math

import torch

from .base import ClientUpdate, GlobalState
from .flora import FLoRA
from .helpers import data_weights, module_names, module_shape, stack_factors, truncation_summary
from .svd import truncated_svd


def threshold_rank(S: torch.Tensor, energy_threshold: float) -> int:
    """The smallest k with Σ_{i<k} S_i² >= energy_threshold · Σ_i S_i² (S descending), in
    float64; 0 for an all-zero spectrum (nothing to keep)."""
    cumulative = S.detach().to(torch.float64).square().cumsum(0)
    if cumulative.numel() == 0 or not float(cumulative[-1]) > 0:
        return 0
    reached = (cumulative >= energy_threshold * cumulative[-1]).nonzero()
    return int(reached[0]) + 1 if reached.numel() else cumulative.numel()


def florist_pair(B_stack: torch.Tensor, A_stack: torch.Tensor, energy_threshold: float, max_rank: int | None = None):
    """(B_g (m, k), A_g (k, n), spectrum, k) of ΔW = B_stack @ A_stack: its SVD from the stacks,
    cut at the smallest rank holding `energy_threshold` of the energy (and at most max_rank).
    B_g = U_k S_k, A_g = V_kᵀ, as in the authors' code."""
    (m, R), n = B_stack.shape, A_stack.shape[1]
    U, S, Vh = truncated_svd(B_stack, A_stack, min(R, m, n), mode="auto")  # every singular value
    k = threshold_rank(S, energy_threshold)
    if max_rank is not None:
        k = min(k, max_rank)
    return U[:, :k] * S[:k], Vh[:k], S.detach().to(torch.float64), k


class FLoRIST(FLoRA):
    """Stacking, then an SVD of the stacks cut at an energy threshold; the global pair is merged
    into the base. FLoRA's state layout and client side (a fresh shared LoRA every round on base +
    offset); only the aggregate differs: the rank-k pair is merged, not the exact sum."""

    name = "florist"
    privacy_refusal = "not implemented: its global rank is a threshold on the spectrum of the clients' stacked factors, taken inside aggregate()"

    def __init__(self, energy_threshold: float = 0.9, max_global_rank: int | None = None, seed: int = 0):
        """energy_threshold: τ in (0, 1], the share of ΔW_t's energy (Σσ²) the global rank keeps
        (the authors' default 0.9; 1 keeps every singular value: FLoRA). max_global_rank: an
        optional cap on k (None: none). seed: of the shared A rows every round's clients start from."""
        ok = isinstance(energy_threshold, (int, float)) and not isinstance(energy_threshold, bool)
        if not (ok and math.isfinite(energy_threshold) and 0 < energy_threshold <= 1):
            raise ValueError(f"florist: energy_threshold must be a number in (0, 1], got {energy_threshold!r}")
        if max_global_rank is not None and not (
            isinstance(max_global_rank, int) and not isinstance(max_global_rank, bool) and max_global_rank >= 1
        ):
            raise ValueError(f"florist: max_global_rank must be an integer >= 1 or null, got {max_global_rank!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"florist: seed must be an integer, got {seed!r}")
        self.energy_threshold = float(energy_threshold)
        self.max_global_rank = max_global_rank
        self.seed = seed

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        if not updates:
            raise ValueError("aggregation needs at least one client")
        weights = data_weights(updates)
        new: GlobalState = {k: v for k, v in (state or {}).items() if k.endswith(".shape")}
        for module in module_names(updates):
            m, n = module_shape(updates, module)
            B_stack, A_stack = stack_factors(updates, module, weights)
            B_g, A_g, spectrum, k = florist_pair(B_stack, A_stack, self.energy_threshold, self.max_global_rank)
            merged = B_g @ A_g  # (m, n); zeros when k = 0
            previous = None if state is None else state.get(f"{module}.offset")
            new[f"{module}.shape"] = torch.tensor([m, n], dtype=torch.int64)
            new[f"{module}.offset"] = merged if previous is None else previous.to(merged) + merged
            new[f"{module}.spectrum"] = spectrum
            new[f"{module}.global_rank"] = torch.tensor(k, dtype=torch.int64)
        return new

    def truncation(self, state: GlobalState, module_ranks: dict[str, set[int]]) -> dict | None:
        """Per module kind and chosen global rank k: the share of the round's ΔW_t energy the
        merged rank-k pair keeps (>= τ) and its error ratio ‖ΔW_t − pair‖/‖ΔW_t‖ (see
        helpers.truncation_summary; here keyed by k, not by client rank)."""
        spectra = {key[: -len(".spectrum")]: value for key, value in state.items() if key.endswith(".spectrum")}
        if not spectra:
            return None
        chosen = {module: {int(state[f"{module}.global_rank"])} for module in spectra}
        return truncation_summary({f"{module}.S": S for module, S in spectra.items()}, chosen)
