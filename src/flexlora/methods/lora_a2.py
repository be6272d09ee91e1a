"""LoRA-A² (Koo, Jang & Ok, "Towards Robust and Efficient Federated Low-Rank Adaptation with
Heterogeneous Clients", ACL 2025, arXiv 2410.22815): Alternating freeze and Adaptive rank
selection. The authors have released no code (their project page, github.com/pseudope/LoRA-A2,
says "Code (to be released soon)"); this follows the ACL 2025 camera-ready (its section, equation
and algorithm numbers below).

- Alternating freeze (§4.1, Eq. 3): "when freezing A, we have ΔW = Σ_k (w_k B_k) A =
  Σ_k (w_k B_k A_k)", so the average of the trained factor is the exact average of the clients'
  updates. Algorithm 1 trains B in rounds with t % 2 = 1 and A in the others (§4.1's prose says
  the opposite, "module A is frozen during even rounds, while module B is frozen during odd
  rounds"; we follow Algorithm 1, which the project page's "we first train B" agrees with).
- Learning rates (§4.1, §5.4, Appendix B): "η_A = η is used for A and η_B = 5·η_A is used for B,
  which is inspired by LoRA+". ``lr_b_ratio`` (default 5): the client trains B at lr_b_ratio ×
  train.lr; null defers to train.lr_b_ratio.
- One global adapter of rank r_G (§4.2): "selects important LoRA ranks to match local
  communication rank budget r_i out of global LoRA adapter with rank r_G". Every client holds
  the global adapter at r_G; its assigned ranks are the budget of components it trains and
  uploads. r_G per module: the federation's largest client rank (bound_ranks), or ``rank``.
- The score (Eq. 4): S^B_{m,i} = ‖ΔB_k[:, i] A[i, :]‖_F, S^A_{m,i} = ‖B[:, i] ΔA_k[i, :]‖_F, with
  ΔB_k the client's own update: "At each round, participating clients run local training for 1
  epoch to obtain ΔW for calculating the contribution". Algorithm 2 then trains from the round's
  global factor (B_k^(t;0) = B^(t)) with the mask and returns B_k^(t;E) − B^(t). So with
  ``score="update"`` (the default) the client runs a trial pass (ClientHook.trial_steps: its
  local budget, train.steps steps, or one epoch when training is counted in epochs), scores
  ‖ΔB[:, i]‖·‖A[i, :]‖ (A rounds ‖B[:, i]‖·‖ΔA[i, :]‖) on PEFT's factors, resets the trained
  factor to the global one, and trains its selected components with a fresh optimizer on the
  same batches. The cost: §5.5 reports "a 1.17x increase in computation time compared to
  standard FL+LoRA"; ours is measured in docs/baselines.md. ``score="gradient"``: our earlier
  rule, not the paper's: the first batch's gradient in place of ΔB, selected before training.
  The paper's ablation baselines (Table 9) are "Importance" and "Magnitude", the latter "gradient
  magnitude-based criteria, ‖ΔB_k[:, i]‖ or ‖ΔA_k[i, :]‖" (§4.2), i.e. the same trial update
  without A's norms; neither is implemented here.
- Selection across the whole model (§4.2): "we select top-(r_i·N) LoRA ranks from a total of
  r_G·N based on the scores across the entire model, where N denotes the number of target
  modules": a client's budget is Σ_m r_i(m) components, wherever they are; ``selection="module"``
  keeps each module to its own r_i(m) instead.
- The mask (Eq. 5, 6): only the selected components of the trained factor move (gradients
  masked; AdamW's decay undone on the others), and only they are uploaded.
- Aggregation (Algorithm 1): B^(t+1) = B^(t) + Σ_k w_k ΔB_k^(t+1) with w_k = |D_k| / Σ_k |D_k|
  (A likewise in A rounds); §4.2: the uploaded parts "are again added to the B_k (or A_k) saved
  two rounds before". A component a client did not upload is zero in its ΔB_k: it counts as
  unchanged, and the weights are not renormalised over the clients that uploaded it; then
  s·B_new·A = Σ_k w_k s·B_k·A exactly. Algorithm 1's w_k sums over all K clients (its
  experiments use full participation); ours over the round's clients, as every method here.

On the wire an update carries, per module, a SparseDelta over the component matrix
C = [A | Bᵀ] (r_G × (n + m); row j is component j: A[j, :] then B[:, j]) holding the change of
the selected components of the trained factor. The server rejects an update that touches the
frozen factor's columns or uploads more components than the client's budget.

State per module: f"{module}.A" (r_G, n) and f"{module}.B" (m, r_G) = s·B, s = α / r_G (the LoRA
scale folded in). init_state draws A like PEFT (seeded) and sets B = 0, so every client of round
1 starts from the same adapter.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import (
    Accumulator,
    ClientHook,
    ClientTask,
    ClientUpdate,
    Factors,
    GlobalState,
    Method,
    SparseDelta,
    TrainingView,
    accumulate,
)
from .helpers import FLOAT_DTYPES, fresh_rows, module_seed, nonfinite, option_keys, option_number, slice_factors

SELECTIONS = ("model", "module")
SCORES = ("update", "gradient")  # the paper's (a trial pass's ΔB, Eq. 4) | the first batch's gradient


# ---------------------------------------------------------------- the math (pure tensor functions)


def component_scores(A: torch.Tensor, B: torch.Tensor, change: torch.Tensor | None, train: str) -> torch.Tensor:
    """Per component i of one module, ‖change[:, i] A[i, :]‖_F = ‖change[:, i]‖·‖A[i, :]‖ (train
    "B") or ‖B[:, i] change[i, :]‖_F = ‖B[:, i]‖·‖change[i, :]‖ (train "A"), in float64: Eq. 4
    when `change` is the trained factor's update over a trial pass (ΔB_k or ΔA_k); the first-order
    change of ΔW when it is a gradient. No change (the module took no part in the loss): zeros."""
    r = A.shape[0]
    if change is None:
        return torch.zeros(r, dtype=torch.float64)
    if train == "B":
        return torch.linalg.vector_norm(change.double(), dim=0).cpu() * torch.linalg.vector_norm(A.detach().double(), dim=1).cpu()
    return torch.linalg.vector_norm(B.detach().double(), dim=0).cpu() * torch.linalg.vector_norm(change.double(), dim=1).cpu()


def select_components(scores: dict[str, torch.Tensor], budget: dict[str, int], selection: str = "model") -> dict[str, list[int]]:
    """The components each module trains: "model", the Σ_m budget[m] highest scores across all
    modules (the paper's r_i·N out of r_G·N); "module", the budget[m] highest of each module.
    Ties go to the earlier module and the lower index, so the choice is deterministic."""
    if selection not in SELECTIONS:
        raise ValueError(f"lora_a2: selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    chosen: dict[str, list[int]] = {module: [] for module in scores}
    if selection == "module":
        for module, s in scores.items():
            order = sorted(range(s.numel()), key=lambda j: (-float(s[j]), j))
            chosen[module] = sorted(order[: max(0, budget.get(module, 0))])
        return chosen
    ranked = sorted(
        ((-float(s[j]), i, j, module) for i, (module, s) in enumerate(scores.items()) for j in range(s.numel())),
        key=lambda t: t[:3],
    )
    for _, _, j, module in ranked[: max(0, sum(budget.get(m, 0) for m in scores))]:
        chosen[module].append(j)
    return {module: sorted(js) for module, js in chosen.items()}


def component_delta(change: torch.Tensor, components: list[int], train: str, shape: tuple[int, int]) -> SparseDelta:
    """The change of the trained factor's selected components as a SparseDelta over the
    component matrix C = [A | Bᵀ] (r × (n + m)) of a module whose weight is (m, n); `change` is
    A_end − A_start (r, n) or B_end − B_start (m, r)."""
    m, n = shape
    r = change.shape[0] if train == "A" else change.shape[1]
    rows = torch.tensor(components, dtype=torch.int64)
    if train == "A":
        cols, values = torch.arange(n), change.detach().cpu()[rows]  # (k, n)
        offset = 0
    else:
        cols, values = torch.arange(m), change.detach().cpu()[:, rows].T  # (k, m)
        offset = n
    indices = (rows[:, None] * (n + m) + offset + cols[None, :]).reshape(-1)
    return SparseDelta(indices, values.reshape(-1).contiguous(), (r, n + m))


def fold_delta(total: torch.Tensor, delta: SparseDelta, weight: float, scale: float, n: int) -> None:
    """total (r, n + m) += weight · delta, the B part (columns ≥ n) also times the LoRA scale."""
    width = total.shape[1]
    indices = delta.indices.to(total.device)
    values = delta.values.to(dtype=total.dtype, device=total.device)
    in_b = (indices % width) >= n
    total.view(-1).index_add_(0, indices, values * torch.where(in_b, weight * scale, weight))


# ---------------------------------------------------------------- client side


class ComponentSelection(ClientHook):
    """Client option "lora_a2": {"train": "A" | "B", "selection": "model" | "module", "score":
    "update" | "gradient", "lr_b_ratio": number | null}. The other factor is frozen; the client
    trains the global adapter (the rank of the task's factors), but only the components that
    score highest within the budget of its assigned ranks ("update": over a trial pass, after
    which the trained factor goes back to the global one; "gradient": on the first batch), and
    sends their change (a SparseDelta per module over C = [A | Bᵀ]). Works on the client loop's
    TrainingView (the adapter's A, B and their gradients)."""

    option: ClassVar[str] = "lora_a2"
    needs_adapter: ClassVar[bool] = True
    sends: ClassVar[str] = "deltas"

    def __init__(self, train: str, selection: str = "model", score: str = "update", lr_b_ratio: float | None = None):
        self.train, self.selection, self.score, self.ratio = train, selection, score, lr_b_ratio
        self.index = 0 if train == "A" else 1
        self.start_values: dict[str, torch.Tensor] = {}
        self.budget: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.selected: dict[str, list[int]] | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self.uploaded = 0  # components counted so far by check_module (one parsed hook per update)

    @classmethod
    def parse(cls, value) -> ComponentSelection:
        option_keys(value, "lora_a2", ("train", "selection", "score", "lr_b_ratio"))
        train, selection, score = value.get("train"), value.get("selection", "model"), value.get("score", "update")
        if train not in ("A", "B"):
            raise ValueError(f"client option lora_a2.train must be A or B, got {train!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"client option lora_a2.selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if score not in SCORES:
            raise ValueError(f"client option lora_a2.score must be one of {', '.join(SCORES)}, got {score!r}")
        ratio = value.get("lr_b_ratio")
        if ratio is not None:
            ratio = option_number(ratio, "lora_a2.lr_b_ratio", 0, math.inf, open_low=True)
        return cls(train, selection, score, ratio)

    def adapter_ranks(self, task: ClientTask) -> dict[str, int] | None:
        if not task.factors:
            return None
        return {module: A.shape[0] for module, (A, _) in task.factors.items()}

    def lr_b_ratio(self) -> float | None:
        return self.ratio

    def start(self, view: TrainingView) -> None:
        self.budget = dict(view.module_ranks)
        for module, (A, B) in view.weights.items():
            frozen = B if self.train == "A" else A
            frozen.requires_grad_(False)
            self.start_values[module] = (A if self.train == "A" else B).detach().clone()
            self.shapes[module] = (B.shape[0], A.shape[1])

    def trial_steps(self, local_steps: int, epoch_steps: int | None) -> int:
        """The paper's trial pass: the local budget, or one epoch of it when counted in epochs."""
        if self.score != "update":
            return 0
        return local_steps if epoch_steps is None else min(local_steps, epoch_steps)

    def select(self, view: TrainingView, changes: dict[str, torch.Tensor | None]) -> None:
        """Score every component from `changes` (module -> the trained factor's update or
        gradient), select within the budget and build the masks."""
        scores = {module: component_scores(A, B, changes[module], self.train) for module, (A, B) in view.weights.items()}
        self.selected = select_components(scores, self.budget, self.selection)
        for module, (A, _B) in view.weights.items():
            keep = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
            keep[self.selected[module]] = True
            self.masks[module] = keep[:, None] if self.train == "A" else keep[None, :]

    @torch.no_grad()
    def after_trial(self, view: TrainingView) -> None:
        # Algorithm 2: score what the trial changed, then train from the round's global factor.
        changes = {}
        for module, pair in view.weights.items():
            X = pair[self.index]
            changes[module] = X - self.start_values[module].to(X)
            X.copy_(self.start_values[module])
        self.select(view, changes)

    def mask_gradients(self, view: TrainingView) -> None:
        if self.selected is None:
            if self.score == "update":
                return  # the trial pass: every component of the trained factor trains
            self.select(view, {module: pair[self.index].grad for module, pair in view.weights.items()})
        for module, pair in view.weights.items():
            grad = pair[self.index].grad
            if grad is not None:
                grad.mul_(self.masks[module])

    @torch.no_grad()
    def after_step(self, view: TrainingView) -> None:
        if self.selected is None:  # the trial pass
            return
        # AdamW's decoupled weight decay moves every entry; unselected components must not train.
        for module, pair in view.weights.items():
            X = pair[self.index]
            X.copy_(torch.where(self.masks[module], X, self.start_values[module].to(X)))

    def send(self, factors: dict[str, Factors], deltas: dict, metrics: dict) -> tuple[dict, dict]:
        if self.selected is None:
            raise RuntimeError("lora_a2: no components were selected (score 'update' needs the client loop's trial pass)")
        out = {}
        for module, pair in factors.items():
            change = pair[self.index] - self.start_values[module].to(pair[self.index])
            out[module] = component_delta(change, self.selected.get(module, []), self.train, self.shapes[module])
        metrics["lora_a2_components"] = sum(len(js) for js in self.selected.values())
        metrics["lora_a2_budget"] = sum(self.budget.values())
        return {}, out

    def check_module(self, module: str, sent, task: ClientTask, shape: tuple[int, int]) -> str | None:
        """The whole check of one module's delta: over C = [A | Bᵀ] at the task's global rank,
        int64 indices in range and distinct, finite floating-point values, nothing in the frozen
        factor, and components within the budget (the client's whole budget Σ_m r(m) across the
        update's modules with selection "model", the module's r(m) with "module")."""
        try:
            indices, values, dshape = sent.indices, sent.values, tuple(sent.shape)
        except (AttributeError, TypeError):
            return "delta must have indices, values and shape"
        m, n = shape
        if not task.factors or module not in task.factors:
            return "the task carried no global factors to change"
        r = task.factors[module][0].shape[0]
        if dshape != (r, n + m):
            return f"delta shape {dshape} differs from the components' ({r}, {n + m}) (A | Bᵀ at rank {r})"
        if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
            return "delta indices and values must be tensors"
        if indices.dtype != torch.int64 or indices.ndim != 1:
            return f"delta indices must be 1-D int64, got {indices.dtype} of shape {tuple(indices.shape)}"
        if values.dtype not in FLOAT_DTYPES or values.shape != indices.shape:
            return f"delta values must be floating point and match the indices, got {values.dtype} of shape {tuple(values.shape)}"
        if indices.numel() == 0:
            return None
        if int(indices.min()) < 0 or int(indices.max()) >= r * (n + m):
            return f"delta indices out of range for {r} components of {n + m} entries"
        if torch.unique(indices).numel() != indices.numel():
            return "delta indices repeat"
        problem = nonfinite(values)
        if problem:
            return f"delta values {problem.replace('contains', 'contain')}"
        in_a = (indices % (n + m)) < n
        if bool(in_a.any()) if self.train == "B" else bool((~in_a).any()):
            frozen = "A" if self.train == "B" else "B"
            return f"{frozen} changed although the task froze it (lora_a2 trains {self.train} this round)"
        count = torch.unique(indices // (n + m)).numel()
        if self.selection == "module":
            if count > task.module_ranks[module]:
                return f"{count} components uploaded, above the budget of {task.module_ranks[module]}"
            return None
        self.uploaded += count
        budget = sum(task.module_ranks.values())
        if self.uploaded > budget:
            return f"{self.uploaded} components uploaded so far, above the client's budget of {budget} (the sum of its ranks)"
        return None


# ---------------------------------------------------------------- server side


class ComponentSum(Accumulator):
    """A round's aggregation one update at a time: per module, Σ_k w_k · delta_k over the
    component matrix (the B part times α / r_G), then previous + sum / Σ_k w_k."""

    def __init__(self, method: LoRAA2, previous: GlobalState | None):
        super().__init__(method, previous)
        if previous is None:
            raise ValueError("lora_a2: aggregation needs the previous global state (init_state makes one)")
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0

    def add(self, update: ClientUpdate, weight: float) -> None:
        state = self.previous
        modules = [key[: -len(".A")] for key in state if key.endswith(".A")]
        missing = sorted(set(modules) - set(update.deltas))
        if update.factors or missing:
            raise ValueError(
                f"lora_a2: client {update.client_id} must send a delta for every module and no factors"
                + (f" (missing {missing[0]})" if missing else "")
            )
        for module in modules:
            A, B = state[f"{module}.A"], state[f"{module}.B"]
            (r, n), m = A.shape, B.shape[0]
            delta = update.deltas[module]
            if tuple(delta.shape) != (r, n + m):
                raise ValueError(
                    f"lora_a2: client {update.client_id}, module {module}: delta shape {tuple(delta.shape)}, "
                    f"expected ({r}, {n + m})"
                )
            total = self.sums.get(module)
            if total is None:
                total = self.sums[module] = torch.zeros(r, n + m, dtype=torch.float64, device=A.device)
            fold_delta(total, delta, float(weight), update.lora_alpha / r, n)
        self.total += float(weight)

    def result(self) -> GlobalState:
        if self.total <= 0:
            raise ValueError("aggregation needs at least one client with a positive weight")
        new: GlobalState = {}
        for key, value in self.previous.items():
            new[key] = value.clone()
        for module, total in self.sums.items():
            A, B = self.previous[f"{module}.A"], self.previous[f"{module}.B"]
            n = A.shape[1]
            mean = total / self.total
            new[f"{module}.A"] = (A.double() + mean[:, :n]).to(A.dtype)
            new[f"{module}.B"] = (B.double() + mean[:, n:].T).to(B.dtype)
        return new


class LoRAA2(Method):
    """Alternating freeze (B first) of one global adapter at rank r_G, B at 5× A's learning rate;
    each client trains and uploads the components its trial pass's update scores highest within
    its budget; the server adds the data-weighted average of the changes (an unsent component
    counts as unchanged)."""

    name = "lora_a2"
    privacy_refusal = "clients choose the components they upload from their own updates, which noise does not cover"
    client_hooks = (ComponentSelection,)

    def __init__(
        self,
        selection: str = "model",
        rank: int | None = None,
        seed: int = 0,
        score: str = "update",
        lr_b_ratio: float | None = 5.0,
    ):
        """selection: "model" (the paper: a client's Σ_m r(m) components anywhere in the model) or
        "module" (r(m) per module). rank: the global rank r_G of every module (None: the largest
        client rank of the federation, per module). seed: of the shared initial A. score:
        "update" (the paper's Eq. 4 on a trial pass's update) or "gradient" (the first batch's
        gradient, no trial pass). lr_b_ratio: B's learning rate over A's (the paper's 5; None:
        train.lr_b_ratio)."""
        if selection not in SELECTIONS:
            raise ValueError(f"lora_a2: selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"lora_a2: rank must be an integer >= 1 or null, got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"lora_a2: seed must be an integer, got {seed!r}")
        if score not in SCORES:
            raise ValueError(f"lora_a2: score must be one of {', '.join(SCORES)}, got {score!r}")
        if lr_b_ratio is not None and not (
            isinstance(lr_b_ratio, (int, float))
            and not isinstance(lr_b_ratio, bool)
            and math.isfinite(lr_b_ratio)
            and lr_b_ratio > 0
        ):
            raise ValueError(f"lora_a2: lr_b_ratio must be a number > 0 or null, got {lr_b_ratio!r}")
        self.selection, self.rank, self.seed, self.score, self.lr_b_ratio = selection, rank, seed, score, lr_b_ratio
        self.bounds: dict[str, int] = {}

    def bound_ranks(self, ranks: dict[str, int]) -> None:
        self.bounds = dict(ranks)

    def global_rank(self, module: str, shape: tuple[int, int]) -> int:
        if self.rank is None and module not in self.bounds:
            raise ValueError(f"lora_a2: no global rank for module {module}: pass rank= or let the server bound the ranks")
        return min(self.rank if self.rank is not None else self.bounds[module], *shape)

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        state: GlobalState = {}
        for module, (m, n) in shapes.items():
            r = self.global_rank(module, (m, n))
            state[f"{module}.A"] = fresh_rows(r, n, module_seed(self.seed, module), torch.float32)
            state[f"{module}.B"] = torch.zeros(m, r)
        return state

    def client_options(self, state: GlobalState | None, round_: int, rank_type: str) -> dict:
        return {
            ComponentSelection.option: {
                "train": "B" if round_ % 2 == 1 else "A",
                "selection": self.selection,
                "score": self.score,
                "lr_b_ratio": self.lr_b_ratio,
            }
        }

    def accumulator(self, state: GlobalState | None) -> ComponentSum:
        return ComponentSum(self, state)

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        return accumulate(self.accumulator(state), updates)

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """Every client gets the whole global adapter (rank r_G); its own ranks are its budget."""
        if state is None:
            return None
        out = {}
        for module in module_ranks:
            A, B = state[f"{module}.A"], state[f"{module}.B"]
            out[module] = slice_factors(A, B, A.shape[0], lora_alpha, module_seed(self.seed, module))
        return out

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        ranks = {key[: -len(".A")]: t.shape[0] for key, t in state.items() if key.endswith(".A") and t.shape[0] > 0}
        return (self.client_factors(state, ranks, lora_alpha) if ranks else {}), ranks
