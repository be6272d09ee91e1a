"""SLoRA (Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language
Models", 2023): sparse full-weight fine-tuning first, then LoRA started from its SVD.

Stage 1 (the first ``sparse_rounds`` aggregations): clients fine-tune the target modules'
weights themselves, each entry only if a fixed random mask allows it. The mask of a module is
{u < density} for one uniform draw u per entry, shared by every client and round (seeded), so
masks of different densities are nested, like LoRA ranks. A client's density comes from its
rank type (``densities``) or, by default, matches its LoRA budget on that module,
r (m + n) / (m n). Clients send sparse deltas; the server averages them (weights p_k = n_k / Σ
n_j) into a dense offset W − W₀ that is part of the global model while stage 1 lasts.

At the end of stage 1 the server takes the truncated SVD of W − W₀ per module (one
decomposition, shared by every rank) and the model goes back to W₀: a client of rank r starts
stage 2 from the best rank-r approximation of W − W₀ as LoRA factors (FlexLoRA's split: B =
U_r S_r / s_r, A = V_rᵀ). Stage 2 aggregates the LoRA factors with ``stage2``: "hetlora"
(zero-padded weighted average without regularizer; the plain FedAvg of SLoRA when every client
has one rank; the SVD start makes ranks nested) or "flexlora".

State: stage 1, f"{module}.offset" (m, n) and "slora.sparse_rounds" (rounds aggregated so
far); then FlexLoRA's f"{module}.U/S/Vh"; then the stage-2 method's keys.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (
    ClientHook,
    ClientTask,
    ClientUpdate,
    Factors,
    GlobalState,
    Method,
    SparseDelta,
    TrainingView,
)
from .flexlora import FlexLoRA
from .helpers import FLOAT_DTYPES, data_weights, nonfinite, option_keys, option_number, state_modules
from .hetlora import HetLoRA
from .svd import dense_svd

STAGE2 = ("hetlora", "flexlora")
COUNTER = "slora.sparse_rounds"


# ---------------------------------------------------------------- client side: the sparse stage


@dataclass(frozen=True)
class SparseTraining(ClientHook):
    """Client option "sparse": {"density": d | "lora_budget", "seed": s, "lr": η (optional)}:
    train the target modules' weights themselves, each only where its fixed random mask is set
    (``sparse_mask``), and send back the sparse change instead of LoRA factors."""

    density: float | str  # a fraction in (0, 1], or "lora_budget": r (m + n) / (m n) per module
    seed: int
    lr_: float | None = None

    option: ClassVar[str] = "sparse"
    trains_weights: ClassVar[bool] = True
    sends: ClassVar[str] = "deltas"

    @classmethod
    def parse(cls, value) -> SparseTraining | None:
        if value is None:
            return None
        option_keys(value, "sparse", ("density", "seed", "lr"))
        density = value.get("density", "lora_budget")
        if density != "lora_budget":
            density = option_number(density, "sparse.density", 0, 1, open_low=True, closed_high=True)
        seed = value.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"client option sparse.seed must be an integer, got {seed!r}")
        lr = value.get("lr")
        return cls(density, seed, None if lr is None else option_number(lr, "sparse.lr", 0, math.inf, open_low=True))

    def local_model(self, view: TrainingView, task: ClientTask, cfg) -> SparseWeights:
        return SparseWeights(view, task, self)

    def lr(self) -> float | None:
        return self.lr_

    def mask_gradients(self, view: TrainingView) -> None:
        view.local.mask_gradients()

    def after_step(self, view: TrainingView) -> None:
        view.local.after_step()

    def check_module(self, module: str, sent, task: ClientTask, shape: tuple[int, int]) -> str | None:
        """A delta of the module's shape, int64 indices in range, finite floating-point values."""
        try:
            indices, values, dshape = sent.indices, sent.values, tuple(sent.shape)
        except (AttributeError, TypeError):
            return "delta must have indices, values and shape"
        if dshape != tuple(shape):
            return f"delta shape {dshape} differs from the weight's {tuple(shape)}"
        if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
            return "delta indices and values must be tensors"
        if indices.dtype != torch.int64 or indices.ndim != 1:
            return f"delta indices must be 1-D int64, got {indices.dtype} of shape {tuple(indices.shape)}"
        if values.dtype not in FLOAT_DTYPES or values.shape != indices.shape:
            return f"delta values must be floating point and match the indices, got {values.dtype} of shape {tuple(values.shape)}"
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= shape[0] * shape[1]):
            return f"delta indices out of range for a {shape[0]}x{shape[1]} weight"
        problem = nonfinite(values)
        if problem:
            return f"delta values {problem.replace('contains', 'contain')}"
        return None


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


class SparseWeights:
    """The local model of the sparse stage: the target modules' weights themselves are trained,
    each entry only where the shared random mask of the task's density is set; sends back the
    sparse change. Works on the client loop's view of the weights (no model code here; the
    client loop restores the weights afterwards)."""

    def __init__(self, view: TrainingView, task: ClientTask, spec: SparseTraining):
        self.view = view
        self.masks, self.start = {}, {}
        for name, W in view.matrices.items():
            density = (
                lora_budget_density(task.module_ranks[name], tuple(W.shape)) if spec.density == "lora_budget" else spec.density
            )
            self.masks[name] = sparse_mask(tuple(W.shape), density, spec.seed, name, W.device)
            self.start[name] = W.detach().clone()
            view.parameters[name].requires_grad_(True)
        self.params = list(view.parameters.values())

    def trainable(self) -> list[torch.Tensor]:
        return self.params

    def mask_gradients(self) -> None:
        for name, mask in self.masks.items():
            grad = self.view.matrix_grad(name)
            if grad is not None:
                grad.mul_(mask)

    @torch.no_grad()
    def after_step(self) -> None:
        # Decoupled weight decay (AdamW) moves every entry; masked-out ones must not train.
        for name, mask in self.masks.items():
            W = self.view.matrices[name]
            W.copy_(torch.where(mask, W, self.start[name]))

    def result(self):
        deltas = {name: sparse_delta(W, self.start[name], self.masks[name]) for name, W in self.view.matrices.items()}
        trained = sum(int(mask.sum()) for mask in self.masks.values())
        return {}, deltas, {"trainable_params": trained}

    def close(self) -> None:
        for weight in self.view.parameters.values():
            weight.requires_grad_(False)
            weight.grad = None


# ---------------------------------------------------------------- server side


def average_deltas(updates: list[ClientUpdate], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k p_k δ_k per module, dense (float32, float64 if any value is)."""
    names = sorted(updates[0].deltas)
    out: dict[str, torch.Tensor] = {}
    for u in updates[1:]:
        if sorted(u.deltas) != names:
            raise ValueError(f"slora: client {u.client_id} sent deltas for a different set of modules")
    for module in names:
        shapes = {tuple(u.deltas[module].shape) for u in updates}
        if len(shapes) != 1:
            raise ValueError(f"slora: clients disagree on the shape of module {module}: {sorted(shapes)}")
        dtype = torch.float64 if any(u.deltas[module].values.dtype == torch.float64 for u in updates) else torch.float32
        m, n = shapes.pop()
        flat = torch.zeros(m * n, dtype=dtype, device=updates[0].deltas[module].values.device)
        for p, u in zip(weights, updates):
            delta = u.deltas[module]
            flat.index_add_(0, delta.indices.to(flat.device), delta.values.to(dtype=dtype, device=flat.device), alpha=p)
        out[module] = flat.view(m, n)
    return out


class SLoRA(Method):
    """Sparse fine-tuning for ``sparse_rounds`` rounds, then LoRA from the SVD of W − W₀."""

    name = "slora"
    changes_base_weights = True  # the sparse stage trains the base weights (base_offset)
    privacy_refusal = "its sparse stage sends weight deltas, not LoRA factors"
    client_hooks = (SparseTraining,)

    def __init__(
        self,
        sparse_rounds: int = 1,
        densities: dict | float | None = None,
        sparse_lr: float | None = None,
        stage2: str = "hetlora",
        init_rank: int | None = None,
        seed: int = 0,
    ):
        """sparse_rounds: R₁, aggregations of stage 1. densities: mask density per rank type
        ({"T1": 0.01, ...}; types left out use their LoRA budget), one density for all, or
        None (every client its LoRA budget). sparse_lr: the local learning rate of stage 1
        (None: train.lr). stage2: "hetlora" or "flexlora". init_rank: how many singular
        triplets of W − W₀ to keep (None: min(m, n); the largest client rank is enough).
        seed: of the masks (and of rows given to ranks above the state's)."""
        if not isinstance(sparse_rounds, int) or sparse_rounds < 1:
            raise ValueError(f"slora: sparse_rounds must be an integer >= 1, got {sparse_rounds!r}")
        if isinstance(densities, (int, float)) and not isinstance(densities, bool):
            densities = {"*": float(densities)}
        if densities is not None:
            if not isinstance(densities, dict):
                raise ValueError(f"slora: densities must be a number, a mapping rank type -> number, or null, got {densities!r}")
            for key, value in densities.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                    raise ValueError(f"slora: density of {key} must be in (0, 1], got {value!r}")
        if sparse_lr is not None and not (isinstance(sparse_lr, (int, float)) and sparse_lr > 0):
            raise ValueError(f"slora: sparse_lr must be > 0 or null, got {sparse_lr!r}")
        if stage2 not in STAGE2:
            raise ValueError(f"slora: stage2 must be one of {', '.join(STAGE2)}, got {stage2!r}")
        if init_rank is not None and (not isinstance(init_rank, int) or init_rank < 1):
            raise ValueError(f"slora: init_rank must be an integer >= 1 or null, got {init_rank!r}")
        self.sparse_rounds = sparse_rounds
        self.densities = {k: float(v) for k, v in (densities or {}).items()}
        self.sparse_lr = sparse_lr
        self.init_rank = init_rank
        self.seed = seed
        self.svd_split = FlexLoRA(seed=seed)  # client slices of the SVD start (and stage2="flexlora")
        self.stage2 = self.svd_split if stage2 == "flexlora" else HetLoRA(reg_lambda=0.0, seed=seed)

    @staticmethod
    def in_sparse_stage(state: GlobalState | None) -> bool:
        return state is None or COUNTER in state

    def density(self, rank_type: str) -> float | None:
        """The mask density of a rank type; None = the client's LoRA budget per module."""
        return self.densities.get(rank_type, self.densities.get("*"))

    def client_options(self, state: GlobalState | None, round_: int, rank_type: str) -> dict:
        if not self.in_sparse_stage(state):
            return {}
        density = self.density(rank_type)
        sparse = {"density": "lora_budget" if density is None else density, "seed": self.seed}
        if self.sparse_lr is not None:
            sparse["lr"] = self.sparse_lr
        return {"sparse": sparse}

    def base_offset(self, state: GlobalState | None) -> dict | None:
        if state is None or COUNTER not in state:
            return None
        return {key[: -len(".offset")]: value for key, value in state.items() if key.endswith(".offset")}

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        if not self.in_sparse_stage(state):
            if any(u.deltas for u in updates):
                raise ValueError("slora: sparse deltas received after the sparse stage ended")
            return self.stage2.aggregate(updates, state)
        missing = [u.client_id for u in updates if not u.deltas]
        if missing:
            raise ValueError(f"slora: client {missing[0]} sent no sparse deltas during the sparse stage")
        averaged = average_deltas(updates, data_weights(updates))
        offsets = self.base_offset(state) or {}
        new: GlobalState = {}
        for module, delta in averaged.items():
            previous = offsets.get(module)
            new[f"{module}.offset"] = delta if previous is None else previous.to(delta) + delta
        done = (0 if state is None else int(state[COUNTER])) + 1
        if done < self.sparse_rounds:
            new[COUNTER] = torch.tensor(done)
            return new
        return self.svd_start(new)

    def svd_start(self, state: GlobalState) -> GlobalState:
        """The end of stage 1: W − W₀ per module as its truncated SVD (FlexLoRA's state format)."""
        out: GlobalState = {}
        for key, offset in state.items():
            if not key.endswith(".offset"):
                continue
            module = key[: -len(".offset")]
            m, n = offset.shape
            K = min(m, n) if self.init_rank is None else min(self.init_rank, m, n)
            U, S, Vh = dense_svd(offset, K)
            out[f"{module}.U"], out[f"{module}.S"], out[f"{module}.Vh"] = U.contiguous(), S.contiguous(), Vh.contiguous()
        return out

    def _lora_method(self, state: GlobalState):
        # Right after stage 1 the state is an SVD (split like FlexLoRA's); later it is stage 2's.
        return self.svd_split if state_modules(state) else self.stage2

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        if self.in_sparse_stage(state):
            return None  # stage 1 trains the weights, not an adapter
        return self._lora_method(state).client_factors(state, module_ranks, lora_alpha)

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        if self.in_sparse_stage(state):
            return {}, {}  # the global model is base + offset
        return self._lora_method(state).global_factors(state, lora_alpha)
