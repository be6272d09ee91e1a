"""FedEx-LoRA (Singhal, Ponkshe & Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", ACL 2025; code: github.com/CERT-Lab/fedex-lora).

FedIT's averages plus the residual that makes the average exact. Per module, with p_k the
clients' weights and s_k = α_k / r_k their LoRA scales:

    Ā = Σ p_k A_k,   B̄ = Σ p_k s_k B_k                     (what clients start from)
    residual = Σ p_k s_k B_k A_k − B̄ Ā                     (dense, m × n)
    offset ← offset + residual                             (folded into the base weights)

so the global model W₀ + offset + B̄Ā equals W₀ + the previous offset + the exact weighted sum of
the clients' updates, every round. The authors' ``aggregate_models_ours`` (fed_agg.py, commit
2fa2e4a) does this with one rank and one scale; tests/fixtures/fedex_reference.json holds the
numbers it produced on seeded inputs, which this module reproduces (tests/test_fedex.py).

Where this differs from the authors' code, and why:
- Weights: they take the plain mean over clients; here p_k = n_k / Σ n_j (data_weights), as for
  every method of this library. With equal n_k the two are the same (the fixture's case).
- Scale: they multiply the residual by one α/r (α/√r with rsLoRA). Here each client's own
  s_k = α_k / r_k multiplies its B_k, as HetLoRA does in this library; with one rank it is theirs.
- Heterogeneous ranks: their code stacks the clients' A's with ``torch.stack`` and fails
  ("stack expects each tensor to be equal size"): FedEx-LoRA is defined for one rank. Here the
  averages are zero-padded to the round's largest rank R (HetLoRA's padding) and the residual is
  still exact: the global model is the exact weighted sum whatever the ranks. A client of rank
  r < R starts from the first r rows of Ā and columns of B̄ (divided by its own scale), so its
  start lacks the padded average's components beyond r (as in HetLoRA); the global model that is
  evaluated and exported lacks nothing.
- Layout: they add the residual transposed (``torch.transpose(residue * s, 1, 0)``), right for
  GPT-2's Conv1D weights (in, out) of their E2E runs; on an nn.Linear weight (out, in) that is not
  square it fails, and on a square one it adds the transpose. Here W is (out, in) and the residual
  is added as is.

State keys per module: f"{module}.A" (R, n) = Ā, f"{module}.B" (m, R) = B̄ (the scale folded in),
and from round 1 on f"{module}.offset" (m, n), the sum of every round's residual (the method's
base offset: clients train on W₀ + offset, evaluation and export include it). Before round 1 the
state has rank 0 (see helpers.zero_rank_state): every client starts from the shared adapter.
"""

from __future__ import annotations

import torch

from .base import Accumulator, ClientUpdate, Factors, GlobalState, Method, accumulate, inherits_rule, streaming_accumulator
from .helpers import compute_dtype, mean_modules, module_names, module_seed, module_shape, slice_factors, zero_rank_state


class FedExAccumulator(Accumulator):
    """FedEx-LoRA's aggregation one update at a time, in bounded memory: per module the running
    sums Σ w_k pad(A_k), Σ w_k s_k pad(B_k) (padding grows with the largest rank seen) and the
    dense Σ w_k s_k B_k A_k, normalised by Σ w_k at the end. ``FedEx.aggregate`` is this
    accumulator over a list, so a streamed round and one aggregate call give the same numbers."""

    def __init__(self, method: FedEx, previous: GlobalState | None):
        self.method, self.previous = method, previous
        self.total = 0.0
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.exact: dict[str, torch.Tensor] = {}  # Σ w_k s_k B_k A_k, dense

    def add(self, update: ClientUpdate, weight: float) -> None:
        if weight <= 0:  # adds nothing to any sum
            return
        self.total += weight
        for module, (A, B) in update.factors.items():
            module_shape([update], module)  # A (r, n), B (m, r) consistent
            dtype = compute_dtype(A, B)
            if module in self.exact and self.exact[module].shape != (B.shape[0], A.shape[1]):
                raise ValueError(
                    f"client {update.client_id}, module {module}: weight shape {(B.shape[0], A.shape[1])}, "
                    f"others have {tuple(self.exact[module].shape)}"
                )
            scaled_B = B.to(dtype) * (weight * update.scale(module))
            exact = self.exact.get(module)
            if exact is None:
                exact = self.exact[module] = torch.zeros(B.shape[0], A.shape[1], dtype=dtype, device=A.device)
            elif exact.dtype != torch.promote_types(exact.dtype, dtype):
                exact = self.exact[module] = exact.to(torch.promote_types(exact.dtype, dtype))
            exact.addmm_(scaled_B.to(exact.dtype), A.to(device=exact.device, dtype=exact.dtype))
            self.A[module] = _padded_add(self.A.get(module), A.to(dtype) * weight, dim=0)
            self.B[module] = _padded_add(self.B.get(module), scaled_B, dim=1)

    def result(self) -> GlobalState:
        if self.total <= 0:
            raise ValueError("aggregation needs at least one client with num_examples > 0")
        new: GlobalState = {}
        for module in sorted(self.exact):
            exact = self.exact[module].div_(self.total)
            new.update(with_residual(module, self.A[module] / self.total, self.B[module] / self.total, exact, self.previous))
        return new


def with_residual(
    module: str, A: torch.Tensor, B: torch.Tensor, exact: torch.Tensor, previous: GlobalState | None
) -> GlobalState:
    """A module's state from the means Ā, B̄ and the exact Σ p_k s_k B_k A_k (overwritten): the
    residual exact − B̄Ā added to the previous offset."""
    residual = exact.sub_(B.to(exact.dtype) @ A.to(exact.dtype))
    offset = None if previous is None else previous.get(f"{module}.offset")
    return {
        f"{module}.A": A,
        f"{module}.B": B,
        f"{module}.offset": residual if offset is None else offset.to(residual) + residual,
    }


def _padded_add(total: torch.Tensor | None, t: torch.Tensor, dim: int) -> torch.Tensor:
    """total + t, the smaller of the two zero-padded along `dim` (0: rows, 1: columns)."""
    if total is None:
        return t.clone()
    dtype = torch.promote_types(total.dtype, t.dtype)
    if t.shape[dim] > total.shape[dim]:
        total, t = t.to(dtype).clone(), total
    else:
        total = total.to(dtype)
    total.narrow(dim, 0, t.shape[dim]).add_(t.to(dtype=dtype, device=total.device))
    return total


class FedEx(Method):
    """FedEx-LoRA: FedIT's (padded) averages for the clients, the exact residual folded into the base."""

    name = "fedex"
    changes_base_weights = True  # the residual is folded into the base (base_offset)
    privacy_refusal = "not implemented: it sums the factors' averages and their product's dense residual (two spaces)"

    def __init__(self, seed: int = 0):
        """seed: of the shared A rows of round 1 (and of rows beyond the state's rank)."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"fedex: seed must be an integer, got {seed!r}")
        self.seed = seed

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        return zero_rank_state(shapes)

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        """Ā, B̄ and the offset plus this round's residual, weights ClientUpdate.weight (else n_k)."""
        for module in module_names(updates):
            module_shape(updates, module)
        return accumulate(FedExAccumulator(self, state), updates)

    def accumulator(self, state: GlobalState | None) -> Accumulator:
        return streaming_accumulator(self, FedEx, FedExAccumulator, state)

    def secure_summands(self) -> tuple[str, ...]:
        inherits_rule(self, FedEx)
        return ("A", "B", "dense")

    def from_secure_mean(
        self, mean: dict[str, torch.Tensor], state: GlobalState | None, lora_alpha: float, ranks: dict[str, list[int]]
    ) -> GlobalState:
        """Ā, B̄ and the exact weighted sum are the mean's; the residual is folded into the offset."""
        new: GlobalState = {}
        for module in mean_modules(mean, "dense"):
            exact = mean[f"{module}.dense"].clone()
            new.update(with_residual(module, mean[f"{module}.A"], mean[f"{module}.B"], exact, state))
        return new

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """The first r rows of Ā and columns of B̄ (divided by the client's scale α/r); rows beyond
        the state's rank are the module's shared seeded rows, with B = 0."""
        if state is None:
            return None
        out = {}
        for module, rank in module_ranks.items():
            if f"{module}.A" not in state:
                raise KeyError(f"module {module!r} is not in the FedEx state")
            out[module] = slice_factors(
                state[f"{module}.A"], state[f"{module}.B"], rank, lora_alpha, module_seed(self.seed, module)
            )
        return out

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        """The adapter part of the global model, B̄ Ā, at its rank R (the rest is ``base_offset``)."""
        ranks = {key[: -len(".A")]: value.shape[0] for key, value in state.items() if key.endswith(".A") and value.shape[0] > 0}
        return self.client_factors(state, ranks, lora_alpha) or {}, ranks

    def base_offset(self, state: GlobalState | None) -> dict[str, torch.Tensor] | None:
        """The sum of every round's residual per module (None before round 1)."""
        if state is None:
            return None
        offsets = {key[: -len(".offset")]: value for key, value in state.items() if key.endswith(".offset")}
        return offsets or None
