"""Client-level differential privacy: DP-FedAvg's recipe (McMahan et al., ICLR 2018) on any
method whose aggregate is a weighted sum of the clients' updates. Each client's change over the
round is clipped to norm C in the space its method aggregates, and Gaussian noise of standard
deviation σ·C·w_max (w_max: the largest weight a client can have) is added to the round's
weighted sum before the method divides it by Σ w_k and post-processes it (FlexLoRA's truncated
SVD and redistribution). So the aggregate moves by at most C·w_max / Σ w_k when one client's
update changes, and carries noise σ times that. Pure functions on tensors, and ``ClientLevelDP``,
what a run's server and clients call (round_aggregation.py, client.py). The (ε, δ) it spends:
accountant.py; what it guarantees and what not: docs/privacy.md.

The spaces (``Method.privacy_space``):
- "delta": the update is ΔW = s·B·A per module (FlexLoRA); a client's change is
  s·B·A − s₀·B₀·A₀, (A₀, B₀) what it was handed, s = α/r. Its norm comes from the stacked
  factors [s·B, −s₀·B₀][A; A₀] and their r×r Gram matrices, never an (m, n) matrix.
- "factors": the update is (A, s·B) per module (FedIT, HetLoRA, FFA-LoRA, RoLoRA), the tensors
  whose padded weighted sums those methods take; the change is (A − A₀, s·(B − B₀)).
A client's norm is over all its modules at once (one vector, as in DP-FedAvg).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from flexlora.methods.helpers import compute_dtype, module_seed, option_keys, option_number, update_norm
from flexlora.protocol import ClientUpdate, Factors

SPACES = ("delta", "factors")
CLIP_OPTION = "dp_clip"  # the client option of client-side clipping: {"norm": C, "space": ...}
# A clipped change is scaled to C·(1 − MARGIN), not C: its float32 factors then stay within C
# after rounding, the bound the noise needs (a client's float16 transport can push it over: the
# server then clips it again).
MARGIN = 1e-5

NoiseDraw = Callable[[str, tuple[int, ...]], torch.Tensor]  # (tensor name, shape) -> float64 noise


def change_factors(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, lora_alpha: float) -> Factors:
    """(Ã, B̃) with B̃ Ã = s·B·A − s₀·B₀·A₀ (s = α/r, s₀ = α/r₀): a ΔW change as stacked
    factors of rank r + r₀, so that its norm needs no (m, n) matrix."""
    dtype = compute_dtype(A, B, A0, B0)
    s, s0 = lora_alpha / A.shape[0], lora_alpha / A0.shape[0]
    A0, B0 = A0.to(dtype=dtype, device=A.device), B0.to(dtype=dtype, device=B.device)
    return torch.cat([A.to(dtype), A0]), torch.cat([B.to(dtype) * s, B0 * -s0], dim=1)


def change_norm(factors: dict[str, Factors], start: dict[str, Factors], lora_alpha: float, space: str) -> float:
    """‖x − x₀‖ over all modules (float64): the change of a client's update in `space` from
    `start`, the factors it was handed (at the ranks it sent)."""
    if space not in SPACES:
        raise ValueError(f"privacy: unknown space {space!r}; choose from: {', '.join(SPACES)}")
    total = 0.0
    for module, (A, B) in factors.items():
        A0, B0 = start[module]
        if space == "delta":
            total += update_norm(*change_factors(A, B, A0, B0, lora_alpha), squared=True)
        else:
            s = lora_alpha / A.shape[0]
            dA = A.double() - A0.to(device=A.device, dtype=torch.float64)
            dB = B.double() - B0.to(device=B.device, dtype=torch.float64)
            total += float(dA.square().sum()) + s * s * float(dB.square().sum())
    return math.sqrt(total)


def scale_change(factors: dict[str, Factors], start: dict[str, Factors], lora_alpha: float, space: str, c: float):
    """x₀ + c·(x − x₀) per module, as factors the method aggregates like any update (float32,
    float64 if an input is). "factors": the same shapes. "delta": the sum of two products,
    c·s·B·A + (1 − c)·s₀·B₀·A₀, as rank r + r₀ factors [A; A₀], [B, B₀]·scales, with B scaled
    so that the LoRA scale α/(r + r₀) the method reads from the rank gives that sum."""
    out = {}
    for module, (A, B) in factors.items():
        dtype = compute_dtype(A, B)
        A, B = A.to(dtype), B.to(dtype)
        A0, B0 = (t.to(dtype=dtype, device=A.device) for t in start[module])
        if space == "factors":
            out[module] = (A0 + c * (A - A0), B0 + c * (B - B0))
            continue
        r, r0 = A.shape[0], A0.shape[0]
        B_new = torch.cat([B * (c * (r + r0) / r), B0 * ((1 - c) * (r + r0) / r0)], dim=1)
        out[module] = (torch.cat([A, A0]).contiguous(), B_new.contiguous())
    return out


def _inner(X1: torch.Tensor, Y1: torch.Tensor, X2: torch.Tensor, Y2: torch.Tensor) -> float:
    """⟨X1·Y1, X2·Y2⟩_F from the small Gram products: Σ (X1ᵀX2) ⊙ (Y1·Y2ᵀ)."""
    return float(((X1.T @ X2) * (Y1 @ Y2.T)).sum())


def path_clip(factors: dict[str, Factors], start: dict[str, Factors], lora_alpha: float, bound: float):
    """(factors, t): client-side clipping of a ΔW change that keeps the client's rank (what a
    client sends must fit its rank; scale_change's exact scaling doubles it). The factors move
    back along the line from the start, A(t) = A₀ + t(A − A₀), B(t) = B₀ + t(B − B₀), to a t in
    [0, 1] whose change s·B(t)·A(t) − s·B₀·A₀ = t·L + t²·Q (L = s(ΔB·A₀ + B₀·ΔA), Q = s·ΔB·ΔA)
    has norm `bound`: a root of the quartic g(t) = a·t² + 2b·t³ + c·t⁴ = bound², whose
    coefficients are Gram products of rank-2r factors, found by bisection from g(0) = 0 and
    g(1) > bound² (the t returned has g(t) <= bound²). t = 1: already within the bound. Needs
    the start at the ranks of `factors`."""
    a = b = c = 0.0
    for module, (A, B) in factors.items():
        A64, B64 = A.double(), B.double()
        A0, B0 = (t.to(device=A.device, dtype=torch.float64) for t in start[module])
        s = lora_alpha / A.shape[0]
        dA, dB = A64 - A0, B64 - B0
        LX, LY = torch.cat([s * dB, s * B0], dim=1), torch.cat([A0, dA])  # L = LX @ LY
        QX, QY = s * dB, dA  # Q = QX @ QY
        a += _inner(LX, LY, LX, LY)
        b += _inner(LX, LY, QX, QY)
        c += _inner(QX, QY, QX, QY)
    target = bound * bound

    def g(t: float) -> float:
        return t * t * (a + t * (2 * b + t * c))

    if g(1.0) <= target:
        return factors, 1.0
    low, high = 0.0, 1.0  # g(low) <= bound² < g(high), kept while the interval halves
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if g(middle) <= target else (low, middle)
    t = low
    out = {}
    for module, (A, B) in factors.items():
        A0, B0 = (x.to(dtype=A.dtype, device=A.device) for x in start[module])
        out[module] = (A0 + t * (A - A0), B0 + t * (B - B0))
    return out, t


def start_at_ranks(start: dict[str, Factors], factors: dict[str, Factors]) -> dict[str, Factors]:
    """The start at the ranks the client sends: a client that pruned its rank r to p (HetLoRA)
    keeps A[:p] and B[:, :p]·p/r (its product keeps its size at the scale α/p), and so does its
    start, which is then what the server hands a client of rank p."""
    out = {}
    for module, (A, _) in factors.items():
        A0, B0 = start[module]
        r, p = A0.shape[0], A.shape[0]
        out[module] = (A0, B0) if p == r else (A0[:p], B0[:, :p] * (p / r))
    return out


def gaussian(seed: int, round_: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Gaussian noise N(0, std²) of `shape` (float64, CPU), seeded by (run seed, round, tensor
    name): reproducible, the same on every engine and after a resume, whatever the order the
    accumulator asks in."""
    generator = torch.Generator().manual_seed(module_seed(seed, f"dp-noise/{name}", round_))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * std


def parse_clip_option(value) -> tuple[float, str]:
    """(C, space) of the client option CLIP_OPTION (one-line ValueError on a bad value)."""
    option_keys(value, CLIP_OPTION, ("norm", "space"))
    norm = option_number(value.get("norm"), f"{CLIP_OPTION}.norm", 0, math.inf, open_low=True)
    space = value.get("space")
    if space not in SPACES:
        raise ValueError(f"client option {CLIP_OPTION}.space must be one of {', '.join(SPACES)}, got {space!r}")
    return norm, space


def clip_on_client(factors: dict[str, Factors], start: dict[str, Factors] | None, lora_alpha: float, option) -> dict:
    """What a client sends when it clips its own update (ClientTask.options[CLIP_OPTION]): its
    change from `start` (the task's factors) within C·(1 − MARGIN), at its own ranks:
    "factors" by scaling the change, "delta" along the line back to the start (path_clip)."""
    bound, space = parse_clip_option(option)
    if start is None:
        raise ValueError(f"client option {CLIP_OPTION} needs the factors the task started from")
    start = start_at_ranks(start, factors)
    bound *= 1 - MARGIN
    if space == "delta":
        return path_clip(factors, start, lora_alpha, bound)[0]
    norm = change_norm(factors, start, lora_alpha, space)
    return factors if norm <= bound else scale_change(factors, start, lora_alpha, space, bound / norm)


@dataclasses.dataclass(frozen=True)
class ClientLevelDP:
    """A run's client-level DP (the config's privacy section): what the server does to each
    update (``weight``, ``clip``) and to the round's sum (``add_noise``), and what it asks of
    the clients (``client_option``).

    Weights: "equal" (w_k = 1) or "capped" (w_k = min(n_k, max_examples)); either way no
    client's weighted update exceeds C·w_max, the sensitivity the noise is calibrated to."""

    clipping_norm: float | None  # C; None: no clipping (then no noise either)
    noise_multiplier: float  # σ
    clipping: str = "server"  # where clients' updates are clipped: "server" or "client" (and the server checks)
    weighting: str = "equal"
    max_examples: int | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> ClientLevelDP | None:
        """From an ExperimentConfig; None when its privacy section is off."""
        p = cfg.privacy
        if not p.enabled:
            return None
        return cls(p.clipping_norm, p.noise_multiplier, p.clipping, p.weighting, p.max_examples, cfg.seed)

    @property
    def max_weight(self) -> float:
        return 1.0 if self.weighting == "equal" else float(self.max_examples)

    @property
    def noise_std(self) -> float:
        """σ·C·w_max: the noise's standard deviation on the round's weighted sum (the aggregate
        divides it by Σ w_k: σ·C / K with K equal weights)."""
        return self.noise_multiplier * (self.clipping_norm or 0.0) * self.max_weight

    def weight(self, num_examples: int) -> float:
        """A client's aggregation weight w_k (raw: the method normalises by Σ w_k)."""
        return 1.0 if self.weighting == "equal" else float(min(num_examples, self.max_examples))

    def client_option(self, space: str) -> dict:
        """The task options of client-side clipping ({} when the server clips)."""
        if self.clipping != "client" or self.clipping_norm is None:
            return {}
        return {CLIP_OPTION: {"norm": self.clipping_norm, "space": space}}

    def clip(self, method, update: ClientUpdate, previous) -> tuple[ClientUpdate, float | None]:
        """(the update with its change clipped to C, the change's norm before): the same object
        when within C or without clipping (norm None). The change is taken from the factors the
        client was handed, at the ranks it sent (``method.client_factors`` of the previous
        state): clipping it bounds what the client's data adds, not what truncation took."""
        if self.clipping_norm is None:
            return update, None
        ranks = {module: update.rank(module) for module in update.factors}
        start = method.client_factors(previous, ranks, update.lora_alpha)
        if start is None:
            raise ValueError(f"privacy: method {method.name!r} hands clients no starting factors to clip a change against")
        norm = change_norm(update.factors, start, update.lora_alpha, method.privacy_space)
        if norm <= self.clipping_norm:
            return update, norm
        scale = self.clipping_norm * (1 - MARGIN) / norm
        factors = scale_change(update.factors, start, update.lora_alpha, method.privacy_space, scale)
        return dataclasses.replace(update, factors=factors), norm

    def add_noise(self, accumulator, round_: int) -> None:
        """The round's noise into the accumulator's weighted sum (Accumulator.add_noise); none at σ = 0."""
        std = self.noise_std
        if std > 0:
            accumulator.add_noise(lambda name, shape: gaussian(self.seed, round_, name, shape, std))
