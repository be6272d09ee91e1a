"""The math methods share, as pure functions on tensors (no model, no I/O): client weights,
module names and shapes, seeded rows, padded and stacked factors, the dense ΔW of a round, the
energy a rank-r slice keeps, and the parsing of client options. ``base.py`` holds the
interface (Method, ClientHook, TrainingView, Accumulator); a method module imports both.

Conventions (PEFT's): a client of rank r holds A (r, n) and B (m, r) of a module whose weight
is (m, n), and its update is s * B @ A with s = lora_alpha / r.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flexlora.protocol import ClientUpdate, Factors

if TYPE_CHECKING:  # annotations only: base.py imports this module
    from .base import GlobalState

# ---------------------------------------------------------------- weights and modules


def data_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k of each update: the weight the server assigned (`ClientUpdate.weight`, set on every
    update by the round's Accumulator, already summing to 1), else n_k / sum_j n_j over the
    clients of this round. Every method's aggregate takes its weights from here (FlexLoRA's
    accumulator normalises the same weights itself), so a bound the server puts on the weights
    holds whatever the method."""
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
    if not updates:
        raise ValueError("aggregation needs at least one client")
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


def state_modules(state: GlobalState) -> list[str]:
    """Module names present in a FlexLoRA state."""
    return sorted(key[: -len(".U")] for key in state if key.endswith(".U"))


def padded_modules(state: GlobalState) -> list[str]:
    """Module names present in a state of padded factors (f"{module}.A", f"{module}.B")."""
    return sorted(key[: -len(".A")] for key in state if key.endswith(".A"))


def mean_modules(mean: dict[str, torch.Tensor], kind: str) -> list[str]:
    """Module names of a secure-aggregation mean (keys f"{module}.{kind}", see Method.secure_summands)."""
    suffix = f".{kind}"
    return sorted(key[: -len(suffix)] for key in mean if key.endswith(suffix))


def module_kind(module: str) -> str:
    """'model.layers.3.self_attn.k_proj' -> 'k_proj'."""
    return module.rsplit(".", 1)[-1]


# ---------------------------------------------------------------- tensors


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is promoted for the sums)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def nonfinite(t: torch.Tensor) -> str | None:
    """'contains NaN' / 'contains Inf', or None. Any NaN or Inf makes the sum non-finite, so the
    elementwise scan only runs when the (cheap, allocation-free) sum says something is wrong.
    The sum is in the tensor's own precision (float32 for 16-bit tensors, whose sums overflow
    early): a float64 sum of float32 values takes a converting path, measured 12x slower."""
    if t.numel() == 0:
        return None
    if bool(torch.isfinite(t.sum(dtype=t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32))):
        return None
    if bool(torch.isnan(t).any()):
        return "contains NaN"
    if bool(torch.isinf(t).any()):
        return "contains Inf"
    return None  # finite values whose sum overflowed: left to the norm bound


def update_norm(A: torch.Tensor, B: torch.Tensor, *, squared: bool = False, exact: bool = True) -> float:
    """‖B A‖_F (or its square) from the r×r Gram matrices (‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)), no (m, n)
    matrix formed; in float64 (`exact`), else in compute_dtype (float32 unless an input is float64)."""
    dtype = torch.float64 if exact else compute_dtype(A, B)
    A, B = A.detach().to(dtype), B.detach().to(dtype)
    sq = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0)
    return float(sq) if squared else float(sq.sqrt())


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


def carry_noise(updates: list[ClientUpdate], draw: Callable[[str, tuple[int, ...]], torch.Tensor]) -> list[ClientUpdate]:
    """Client-level DP in the "factors" space: the updates (raw weights in ClientUpdate.weight)
    with noise z_A = draw(f"{module}.A", (R, n)) and z_B = draw(f"{module}.B", (m, R)) on the
    update of the largest rank R of each module (the first such), as A + z_A / w and
    B + z_B / (w·s): a method that takes Σ p_k pad(A_k) and Σ p_k s_k pad(B_k) (or Σ p_k B_k
    at one rank) with p_k = w_k / Σ w_j then finds z / Σ w_j in its sums (z_B / (s·Σ w_j) in an
    unscaled B), on every padded row and column, before anything else it does with them."""
    updates = list(updates)
    for module in updates[0].factors if updates else ():
        j = max(range(len(updates)), key=lambda i: (updates[i].rank(module), -i))
        carrier = updates[j]
        A, B = carrier.factors[module]
        dtype, w, s = compute_dtype(A, B), float(carrier.weight), carrier.scale(module)
        noisy = (
            A.to(dtype) + draw(f"{module}.A", tuple(A.shape)).to(dtype=dtype, device=A.device) / w,
            B.to(dtype) + draw(f"{module}.B", tuple(B.shape)).to(dtype=dtype, device=B.device) / (w * s),
        )
        updates[j] = dataclasses.replace(carrier, factors={**carrier.factors, module: noisy})
    return updates


# ---------------------------------------------------------------- factors: shared rows, slices, stacks


# fresh_rows keeps its latest draws, up to this many bytes: in round 1 every client of a module
# is handed a prefix of the same seeded draw (the shared initial adapter), which is then drawn
# once per module instead of once per client (80 clients a round: 24.5 s of building tasks).
FRESH_ROWS_CACHE_BYTES = 256 * 2**20
_fresh_rows_cache: dict[tuple, torch.Tensor] = {}  # (n, seed, dtype, device) -> the largest draw, oldest first


def fresh_rows(count: int, n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """`count` rows of a LoRA A drawn like PEFT's fresh init (kaiming-uniform: U(-1/√n, 1/√n)),
    from a generator seeded with `seed` (deterministic, the global RNG untouched). The generator
    fills rows in order, so fewer rows of the same seed are a prefix of more: a smaller request
    is answered from a cached larger draw (a copy: the caller may train it in place)."""
    key = (n, seed, dtype, str(device))
    cached = _fresh_rows_cache.get(key)
    if cached is not None and cached.shape[0] >= count:
        return cached[:count].clone()
    gen = torch.Generator().manual_seed(seed)
    rows = ((torch.rand(count, n, generator=gen, dtype=torch.float64) * 2 - 1) / n**0.5).to(dtype=dtype, device=device)
    _fresh_rows_cache.pop(key, None)
    _fresh_rows_cache[key] = rows
    size = sum(t.numel() * t.element_size() for t in _fresh_rows_cache.values())
    while size > FRESH_ROWS_CACHE_BYTES and _fresh_rows_cache:
        oldest = _fresh_rows_cache.pop(next(iter(_fresh_rows_cache)))
        size -= oldest.numel() * oldest.element_size()
    return rows.clone()


def clear_fresh_rows() -> None:
    """Drop fresh_rows's cached draws (the server does after building a round's tasks)."""
    _fresh_rows_cache.clear()


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


def slice_factors(A: torch.Tensor, B_scaled: torch.Tensor, rank: int, lora_alpha: float, pad_seed: int) -> Factors:
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


def stack_pieces(
    pieces: list[tuple[torch.Tensor, torch.Tensor, float]], divide_by: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """B̃ = [c_1 B_1 / divide_by, …] (m, R) and Ã = [A_1; …] (R, n) of pieces (B_k, A_k, c_k), in
    float32 (float64 if any piece is float64), so that B̃ Ã = Σ c_k B_k A_k / divide_by."""
    dtype = compute_dtype(*(t for B, A, _ in pieces for t in (B, A)))
    B = torch.cat([B.to(dtype) * (c / divide_by) for B, _, c in pieces], dim=1)
    return B, torch.cat([A.to(dtype) for _, A, _ in pieces], dim=0)


def stack_factors(updates: list[ClientUpdate], module: str, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """B̃ = [p_1 s_1 B_1, …] (m, R) and Ã = [A_1; …] (R, n), so that B̃ Ã = Σ p_k s_k B_k A_k.

    Clients with zero weight are left out: they add nothing to ΔW but would add rank.
    The result lives on the device of the first client's tensors.
    """
    pairs = [(p, u) for p, u in zip(weights, updates) if p > 0]
    device = pairs[0][1].factors[module][0].device
    return stack_pieces([(B.to(device), A.to(device), p * u.scale(module)) for p, u in pairs for A, B in [u.factors[module]]])


# Clients are stacked into groups of about this total rank for the dense product: each group
# is one full-speed matrix product accumulated in place, and memory stays one ΔW plus one
# group's factors instead of every client's factors stacked at once.
DENSE_GROUP_RANK = 2048


def delta_matrix(
    updates: list[ClientUpdate],
    module: str,
    weights: list[float],
    *,
    device: torch.device | None = None,
    group_rank: int = DENSE_GROUP_RANK,
) -> torch.Tensor:
    """ΔW = Σ_k p_k s_k B_k A_k as one dense (m, n) matrix, on `device` (default: the first
    client's), in float32 (float64 if any factor is float64)."""
    pairs = [(p, u) for p, u in zip(weights, updates) if p > 0]
    tensors = [t for _, u in pairs for t in u.factors[module]]
    dtype = compute_dtype(*tensors)
    device = device if device is not None else tensors[0].device
    m, n = pairs[0][1].factors[module][1].shape[0], pairs[0][1].factors[module][0].shape[1]
    out = torch.zeros(m, n, dtype=dtype, device=device)
    group: list[tuple[float, ClientUpdate]] = []

    def flush():
        if group:
            B, A = stack_factors([u for _, u in group], module, [p for p, _ in group])
            out.addmm_(B.to(device), A.to(device))
            group.clear()

    rank = 0
    for p, u in pairs:
        group.append((p, u))
        rank += u.rank(module)
        if rank >= group_rank:
            flush()
            rank = 0
    flush()
    return out


# ---------------------------------------------------------------- what a rank-r slice keeps


def energy_kept(S: torch.Tensor, ranks, total: float | None = None) -> dict[int, float]:
    """Per rank r, the share of ΔW's energy (squared Frobenius norm) that its best rank-r
    approximation keeps: Σ_{i<r} S_i² / ‖ΔW‖²_F. The paper's approximation error ratio
    ‖ΔW − Ŵ_r‖_F / ‖ΔW‖_F is sqrt(1 − kept). `total`: ‖ΔW‖²_F (the state's E); None: Σ S_i²,
    right only when S is ΔW's whole spectrum."""
    energy = S.detach().to(torch.float64).square()
    total = float(energy.sum()) if total is None else float(total)
    cumulative = energy.cumsum(0)
    out = {}
    for r in ranks:
        k = min(int(r), energy.shape[0])
        out[int(r)] = 1.0 if total == 0 else min(1.0, float(cumulative[k - 1]) / total)  # zero ΔW: nothing lost
    return out


def truncation_summary(state: GlobalState, module_ranks: dict[str, set[int]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per module kind (q_proj, k_proj, ...) and per client rank r of the round: the energy
    share kept by the rank-r slice and the approximation error ratio, averaged over layers
    (err_max: the worst layer). JSON-ready: {kind: {str(r): {kept, err, err_max}}}."""
    per_kind: dict[str, dict[int, list[float]]] = {}
    for module, ranks in module_ranks.items():
        key = f"{module}.S"
        if key not in state:
            continue
        slot = per_kind.setdefault(module_kind(module), {})
        total = state.get(f"{module}.E")
        for r, kept in energy_kept(state[key], ranks, None if total is None else float(total.sum())).items():
            slot.setdefault(r, []).append(kept)
    out = {}
    for kind in sorted(per_kind):
        out[kind] = {}
        for r in sorted(per_kind[kind]):
            kept = per_kind[kind][r]
            errs = [max(0.0, 1.0 - k) ** 0.5 for k in kept]
            out[kind][str(r)] = {"kept": sum(kept) / len(kept), "err": sum(errs) / len(errs), "err_max": max(errs)}
    return out


# ---------------------------------------------------------------- client options


def option_keys(value, name: str, allowed: tuple[str, ...]) -> None:
    """A client option that is a mapping with only `allowed` keys (else a one-line ValueError)."""
    if not isinstance(value, dict):
        raise ValueError(f"client option {name} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"client option {name}.{unknown[0]} is unknown; known: {', '.join(allowed)}")


def option_number(value, name: str, low: float, high: float, *, open_low=False, closed_high=False) -> float:
    """A client option's finite number in the interval (else a one-line ValueError)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value <= high if closed_high else value < high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise ValueError(f"client option {name} must be a number in {interval}, got {value!r}")
    return float(value)
