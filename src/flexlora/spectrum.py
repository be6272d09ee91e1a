"""The spectrum of the global update ΔW: how its energy spreads over the rank bands that the
clients' ranks define, and its effective rank (issue 20, "rank collapse").

raFLoRA (arXiv 2602.13486) claims that SVD-based redistribution concentrates ΔW's energy in the
rank every client shares, the components only high-rank clients contribute fading round after
round. Two numbers per module measure that, from ΔW's singular values σ_1 ≥ σ_2 ≥ …:

- band shares: with the sorted distinct client ranks r_1 < … < r_k of the module, the bands
  [0, r_1), [r_1, r_2), …, [r_{k-1}, r_k) and [r_k, ∞) of singular-value indices, and the share
  Σ_{i in band} σ_i² / Σ_i σ_i² of ΔW's energy (squared Frobenius norm) in each. Band [0, r_1)
  is what a client of the smallest rank receives (its best rank-r_1 approximation); everything
  after it is energy only higher-rank clients can hold;
- effective rank exp(H), H = −Σ p_i log p_i with p_i = σ_i² / Σ_j σ_j² (Roy & Vetterli, 2007):
  1 for a rank-1 update, r for r equal singular values.

σ² is read from the aggregation where it computed them (FlexLoRA keeps ΔW's SVD as its state:
Method.global_singular_values; route "aggregation"); else it comes from the factors where the
global model is a LoRA adapter (ΔW = B̃ Ã with B̃ (m, R),
Ã (R, n), R < min(m, n): QR of both, singular values of the R×R core, as methods/svd.py's
factored kernel does),
never forming the m×n matrix; from the eigenvalues of ΔW's smaller Gram matrix (float64) where
it is a dense change of the base weights (FLoRA, SLoRA's sparse stage, an adapter on top of an
offset) or R >= min(m, n). Pure functions on tensors: the server hands them the method's global
factors and base offset (FederatedServer.spectrum).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from flexlora.methods.helpers import module_kind
from flexlora.methods.threads import map_modules
from flexlora.resources import ATTENTION, MLP

# Module kinds pooled into the two groups the issue names (attention, MLP).
GROUPS = {"attention": ATTENTION, "mlp": MLP}


def band_labels(edges: Sequence[int]) -> list[str]:
    """['[0,8)', '[8,30)', '[30,200)', '[200,∞)'] for edges [8, 30, 200]."""
    bounds = [0, *edges]
    return [f"[{lo},{hi})" for lo, hi in zip(bounds, bounds[1:])] + [f"[{bounds[-1]},∞)"]


def check_edges(edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in edges]
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"rank band edges must be strictly increasing positive ranks, got {list(edges)}")
    return edges


def band_energies(sigma_sq: torch.Tensor, edges: Sequence[int]) -> list[float]:
    """Σ σ_i² over the singular-value indices i (0-based, σ descending) of each band [0, r_1),
    [r_1, r_2), …, [r_k, ∞): len(edges) + 1 numbers whose sum is Σ σ_i². A band past the end of
    the spectrum (the module's rank is capped below its edge) holds 0."""
    edges = check_edges(edges)
    values = sigma_sq.detach().to(torch.float64).flatten()
    bounds = [0, *edges, max(values.shape[0], edges[-1])]
    return [float(values[lo:hi].sum()) for lo, hi in zip(bounds, bounds[1:])]


def band_shares(sigma_sq: torch.Tensor, edges: Sequence[int]) -> list[float]:
    """band_energies as shares of ΔW's energy Σ σ_i² (all 0 for ΔW = 0)."""
    energies = band_energies(sigma_sq, edges)
    total = sum(energies)
    return [e / total if total > 0 else 0.0 for e in energies]


def effective_rank(sigma_sq: torch.Tensor) -> float:
    """exp(−Σ p_i log p_i), p_i = σ_i² / Σ σ_j² (0 for ΔW = 0)."""
    values = sigma_sq.detach().to(torch.float64).flatten().clamp_min(0)
    total = values.sum()
    if not bool(total > 0):
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def factored_sigma_sq(B_scaled: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """σ_i² of B_scaled @ A (B_scaled (m, R), A (R, n)), descending, float64, without forming
    the product: B = Q_b R_b, Aᵀ = Q_a R_a  =>  σ(B A) = σ(R_b R_aᵀ), the R×R core of
    methods/svd.py's factored kernel. Only the R factors of the (Householder, float64) QRs
    are formed and only the core's singular values: the kernel's rotation back to U and Vh
    is half its time here (1536×576, R = 200, one thread: 13.5 ms against 24 ms) and unneeded.
    Householder QR is backward stable whatever the conditioning (rank-deficient factors, e.g.
    an adapter padded with zero columns, included)."""
    R = B_scaled.shape[1]
    if R == 0:
        return torch.zeros(0, dtype=torch.float64)
    Rb = torch.linalg.qr(B_scaled.detach().double(), mode="r").R  # (min(m, R), R)
    Ra = torch.linalg.qr(A.detach().double().to(B_scaled.device).T, mode="r").R  # (min(n, R), R)
    return torch.linalg.svdvals(Rb @ Ra.T).square().cpu()


def dense_sigma_sq(dense: torch.Tensor) -> torch.Tensor:
    """σ_i² of a dense matrix, descending, float64: the eigenvalues of its smaller Gram matrix
    (float64; the squares are what the shares need, and the rounding of an eigenvalue is
    ~1e-16·σ_1², far below any share or entropy term that matters)."""
    X = dense.detach().double()
    if X.shape[0] > X.shape[1]:
        X = X.T
    eigenvalues = torch.linalg.eigvalsh(X @ X.T)  # ascending
    return eigenvalues.flip(0).clamp_min(0).cpu()


def module_sigma_sq(
    factors: tuple[torch.Tensor, torch.Tensor] | None, scale: float, offset: torch.Tensor | None
) -> tuple[torch.Tensor, str]:
    """(σ² of ΔW = offset + scale·B@A, the route: 'factored' or 'dense'). `factors`: the global
    adapter's (A (R, n), B (m, R)) or None; `offset`: a dense base offset (m, n) or None."""
    if factors is None and offset is None:
        raise ValueError("a module's ΔW needs an adapter, a base offset or both")
    if factors is not None:
        A, B = factors
        (m, R), n = B.shape, A.shape[1]
        if offset is None and R < min(m, n):
            return factored_sigma_sq(B.double() * scale, A), "factored"
        product = (B.double() * scale) @ A.double().to(B.device)  # dense anyway: an offset, or R >= min(m, n)
        dense = product if offset is None else product + offset.double().to(product.device)
    else:
        dense = offset
    return dense_sigma_sq(dense), "dense"


# More distinct client ranks than this (a rank distribution draws one per client) get octave bands.
MAX_EDGES = 8


def coarse_edges(edges: Sequence[int]) -> list[int]:
    """The band edges themselves when there are at most MAX_EDGES; else octaves of them: the
    smallest rank (the one every client holds: the collapse claim is about energy beyond it),
    then each next edge at least twice the previous, and the largest rank. Every coarse edge is
    one of `edges`, so a record measured with `edges` can be merged into these (coarsen)."""
    edges = check_edges(edges)
    if len(edges) <= MAX_EDGES:
        return edges
    out = [edges[0]]
    for e in edges[1:]:
        if e >= 2 * out[-1]:
            out.append(e)
    return out if out[-1] == edges[-1] else [*out, edges[-1]]


def coarsen(record: Mapping) -> dict:
    """A summarize_modules record with its band shares merged into coarse_edges(record's edges):
    coarse band j sums the fine bands that start inside it (exact: coarse edges are fine edges)."""
    fine = list(record["edges"])
    edges = coarse_edges(fine)
    if edges == fine:
        return dict(record)
    starts = [0, *fine]
    position = {edge: j + 1 for j, edge in enumerate(edges)}  # fine band starting at edge -> coarse band
    share = [0.0] * (len(edges) + 1)
    band = 0
    for start, value in zip(starts, record["share"]):
        band = position.get(start, band)
        share[band] += value
    return {**record, "edges": edges, "bands": band_labels(edges), "share": share}


def rank_edges(client_ranks: Mapping[str, Mapping[str, int]]) -> dict[str, list[int]]:
    """Per module kind, the sorted distinct ranks clients hold on modules of that kind (each
    already capped at the module's min(m, n)): the edges of its rank bands (octaves of them
    past MAX_EDGES distinct ranks, see coarse_edges)."""
    kinds: dict[str, set[int]] = {}
    for ranks in client_ranks.values():
        for module, r in ranks.items():
            kinds.setdefault(module_kind(module), set()).add(int(r))
    return {
        kind: coarse_edges(sorted(r for r in ranks if r > 0))
        for kind, ranks in sorted(kinds.items())
        if any(r > 0 for r in ranks)
    }


def summarize_modules(per_module: Sequence[tuple[list[float], float]], edges: Sequence[int]) -> dict:
    """A record over modules given as (band energies, effective rank): band shares pooled over the
    modules (Σ_modules band energy / Σ_modules energy, i.e. the energy-weighted mean of the
    modules' shares) and the effective rank's mean, median, min and max over the modules."""
    pooled = [sum(column) for column in zip(*(energies for energies, _ in per_module))]
    total = sum(pooled)
    ranks = [rank for _, rank in per_module]
    return {
        "edges": list(edges),
        "bands": band_labels(edges),
        "share": [e / total if total > 0 else 0.0 for e in pooled],
        "energy": total,
        "effective_rank_mean": statistics.fmean(ranks),
        "effective_rank_median": statistics.median(ranks),
        "effective_rank_min": min(ranks),
        "effective_rank_max": max(ranks),
        "modules": len(ranks),
    }


def spectrum_record(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
    ranks: Mapping[str, int] | None,
    offsets: Mapping[str, torch.Tensor] | None,
    lora_alpha: float,
    edges: Mapping[str, Sequence[int]],
    singular_values: Mapping[str, torch.Tensor] | None = None,
) -> dict | None:
    """The per-round record of the global ΔW's spectrum, or None when the global model has no ΔW
    (yet): {"kinds": {kind: summarize_modules}, "groups": {"attention" | "mlp": summarize_modules
    + "kinds"}, "routes": {"factored" | "dense": modules}}. `factors`/`ranks`: the global adapter
    (A (R, n), B (m, R), scale lora_alpha / R); `offsets`: the dense base offset per module;
    `edges`: rank_edges of the run (modules of other kinds are left out); `singular_values`: the
    global adapter's σ per module where the aggregation computed them already (no base offset):
    nothing is computed for those. The work runs where the tensors are (on the CPU, modules side
    by side: threads.map_modules).

    A group pools its kinds band by band: band j of every module is its own band j, so k_proj,
    whose top rank is capped at 192 where q_proj has 200, adds its [30, 192) to the group's
    [30, 200) (the same rank types). Its edges are the largest of its kinds' at each position.
    Kinds with different numbers of bands cannot be pooled that way: the group is left out."""
    factors, offsets, ranks = dict(factors or {}), dict(offsets or {}), dict(ranks or {})
    known = {m: s for m, s in (singular_values or {}).items() if m not in offsets}
    modules = sorted(m for m in set(factors) | set(offsets) | set(known) if module_kind(m) in edges)
    if not modules:
        return None

    def one(module: str) -> tuple[list[float], float, str]:
        if module in known:
            sigma_sq, route = known[module].detach().to(device="cpu", dtype=torch.float64).square(), "aggregation"
        else:
            scale = lora_alpha / ranks[module] if module in factors else 0.0
            sigma_sq, route = module_sigma_sq(factors.get(module), scale, offsets.get(module))
        return band_energies(sigma_sq, edges[module_kind(module)]), effective_rank(sigma_sq), route

    computed = [m for m in modules if m not in known]
    results = {m: one(m) for m in modules if m in known}
    if computed:
        module = computed[0]
        device = (factors[module][0] if module in factors else offsets[module]).device
        results.update(zip(computed, map_modules(one, computed, device)))
    by_kind: dict[str, list[tuple[list[float], float]]] = {}
    routes: dict[str, int] = {}
    for module in modules:
        energies, rank, route = results[module]
        by_kind.setdefault(module_kind(module), []).append((energies, rank))
        routes[route] = routes.get(route, 0) + 1
    kinds = {kind: summarize_modules(per_module, edges[kind]) for kind, per_module in sorted(by_kind.items())}
    groups = {}
    for group, members in GROUPS.items():
        present = [k for k in members if k in by_kind]
        if not present or len({len(edges[k]) for k in present}) != 1:
            continue
        group_edges = [max(column) for column in zip(*(edges[k] for k in present))]
        groups[group] = {**summarize_modules([pm for k in present for pm in by_kind[k]], group_edges), "kinds": present}
    return {"kinds": kinds, "groups": groups, "routes": routes}


def beyond_shared(record: Mapping) -> float:
    """The share of energy beyond the smallest client rank: 1 − share of band [0, r_1)."""
    return max(0.0, 1.0 - float(record["share"][0]))


def geometric_rate(rounds: Sequence[int], values: Sequence[float]) -> float | None:
    """exp(slope) of the least-squares line through (round, log value): the per-round ratio of a
    geometric decay (1: flat). None with fewer than two positive values."""
    points = [(float(r), math.log(v)) for r, v in zip(rounds, values) if v is not None and v > 0]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return math.exp(slope)


def spectrum_line(record: Mapping | None) -> str | None:
    """'ΔW energy beyond r_min: attention 0.31, mlp 0.30; effective rank: attention 5.1, mlp 5.0
    (0.8 s)': a round's spectrum record in one line (groups, else kinds)."""
    if not record:
        return None
    parts = record.get("groups") or record.get("kinds") or {}
    if not parts:
        return None
    beyond = ", ".join(f"{name} {beyond_shared(r):.3g}" for name, r in parts.items())
    ranks = ", ".join(f"{name} {r['effective_rank_mean']:.1f}" for name, r in parts.items())
    seconds = f" ({record['seconds']:.1f} s)" if "seconds" in record else ""
    return f"ΔW energy beyond the smallest client rank: {beyond}; effective rank: {ranks}{seconds}"
