"""The interface every method implements (``Method``, its server side, and ``ClientHook``, its
client side), with default hooks, and the tensor helpers methods share.

No I/O, no model, no transport here. A method sees the LoRA factors the clients sent and the
previous global state, and returns the new global state; it also tells a client of a given rank
which factors to start its next round from, and which client hooks to run.

Conventions (PEFT's): for a target module with weight W of shape (m, n) (out, in),
a client of rank r holds A (r, n) and B (m, r), and its update is  s * B @ A  with
s = lora_alpha / r.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, ClassVar

import torch

from flexlora.protocol import ClientTask, ClientUpdate, Factors, SparseDelta

GlobalState = dict[str, torch.Tensor]  # flat and safetensors-ready; keys are method-defined


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


def update_norm(A: torch.Tensor, B: torch.Tensor, *, squared: bool = False, exact: bool = True) -> float:
    """‖B A‖_F (or its square) from the r×r Gram matrices (‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)), no (m, n)
    matrix formed; in float64 (`exact`), else in compute_dtype (float32 unless an input is float64)."""
    dtype = torch.float64 if exact else compute_dtype(A, B)
    A, B = A.detach().to(dtype), B.detach().to(dtype)
    sq = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0)
    return float(sq) if squared else float(sq.sqrt())


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


@dataclasses.dataclass(eq=False)
class TrainingView:
    """What the client loop hands a client hook of the local model it trains: tensors by
    target-module name, never the model itself (no torch.nn, no PEFT), so that a method module
    stays free of model code. Every hook call gets this one object (``start``, ``penalty``,
    ``mask_gradients``, ``after_step``; ``local_model`` builds on it).

    weights: the LoRA adapter's live (A, B) parameters per module (A (r, n), B (m, r); their
    gradients are ``A.grad`` / ``B.grad``); empty when a hook trains the base weights instead.
    matrices: the base weights as live (out, in) views per module (GPT-2's Conv1D transposed),
    ``parameters`` the tensors to set ``requires_grad`` on, ``matrix_grad(name)`` the gradient
    as an (out, in) view (None before a backward); filled only for a hook with
    ``trains_weights``. module_ranks: the ranks the server assigned this client (its task's).
    params: what the optimizer trains, filled after ``start``. local: the object a hook's
    ``local_model`` returned (None for the adapter)."""

    module_ranks: dict[str, int]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    matrices: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    parameters: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    matrix_grad: Callable[[str], torch.Tensor | None] = lambda name: None
    params: list[torch.Tensor] = dataclasses.field(default_factory=list)
    local: object = None


class ClientHook:
    """The client half of a method: what the local training loop calls, for one key of
    ``ClientTask.options`` (the wire format: plain JSON, so it travels over any transport).

    A method's ``client_options`` puts ``{hook.option: value}`` into the task; the client parses
    each key with the hook class registered for it (``parse``: one-line ValueError on a bad
    value) and calls the hooks in the order below. Every hook is optional; the defaults do
    nothing. The server checks what comes back with ``check_module`` (the hook's own
    validation rules: e.g. a frozen A must come back unchanged)."""

    option: ClassVar[str]  # the key in ClientTask.options
    # True: the hook trains the base weights themselves instead of an adapter (``local_model``
    # replaces the adapter; the base weights it trains are restored on exit, as is the offset).
    trains_weights: ClassVar[bool] = False
    # True: the hook works on the LoRA adapter (``view.weights``), so it cannot run with one
    # that trains the weights.
    needs_adapter: ClassVar[bool] = False
    # What the update carries: "factors" (LoRA A, B per module) or "deltas" (SparseDelta).
    sends: ClassVar[str] = "factors"

    @classmethod
    def parse(cls, value) -> ClientHook | None:
        """The hook for this option's JSON value (None: the value turns the hook off)."""
        raise NotImplementedError

    def local_model(self, view: TrainingView, task: ClientTask, cfg):
        """A replacement for the LoRA adapter, built on ``view`` (the target modules' base weights,
        see TrainingView): an object with trainable(), result() -> (factors, deltas, metrics)
        and close(). Only a hook with trains_weights replaces the adapter (and is asked)."""
        return None

    def adapter_ranks(self, task: ClientTask) -> dict[str, int] | None:
        """The ranks to attach the LoRA adapter at (None: the task's ``module_ranks``), e.g. the
        rank of the global factors the task carries when the assigned ranks are an upload budget."""
        return None

    def start(self, view: TrainingView) -> None:
        """Once the local model exists, before its trainable parameters are collected (e.g.
        freeze A)."""

    def lr(self) -> float | None:
        """The local learning rate this hook asks for (None: train.lr)."""
        return None

    def penalty(self, view: TrainingView) -> torch.Tensor | None:
        """An extra loss term of this step (after the batch's backward), or None."""
        return None

    def mask_gradients(self, view: TrainingView) -> None:
        """Change the gradients (unscaled) before clipping and the optimizer step."""

    def after_step(self, view: TrainingView) -> None:
        """After each optimizer step."""

    def finish(self, factors: dict[str, Factors], metrics: dict) -> dict[str, Factors]:
        """What is sent back: the trained factors, possibly changed (e.g. pruned); may add to
        `metrics`."""
        return factors

    def send(self, factors: dict[str, Factors], deltas: dict, metrics: dict) -> tuple[dict[str, Factors], dict]:
        """After ``finish``: (factors, deltas) to send, e.g. the trained factors turned into the
        sparse changes a hook with ``sends == "deltas"`` uploads. Default: unchanged."""
        return factors, deltas

    def check_module(self, module: str, sent, task: ClientTask, shape: tuple[int, int]) -> str | None:
        """The server's check of one module of what came back for a task with this option:
        for ``sends == "deltas"`` the whole check of a delta; else an extra check after the
        common ones on (A, B). A one-line reason, or None."""
        return None


class Accumulator:
    """A round's aggregation taken one update at a time (FederatedServer folds each valid update
    as it arrives, then drops it). ``add(update, weight)``: `weight` is the update's raw weight
    (n_k, or what the server's weight cap makes of it); ``result()`` is the new global state,
    with the weights normalised by their sum: equal, to float rounding, to
    ``method.aggregate(updates, previous)`` with p_k = w_k / Σ w_j.

    This default keeps every update and calls the method's ``aggregate`` at the end: exact for
    any method, but memory grows with the round's clients. A method whose aggregation is a
    weighted sum returns its own accumulator that keeps only the sum (FlexLoRA, FedIT, ...)."""

    def __init__(self, method: Method, previous: GlobalState | None):
        self.method, self.previous = method, previous
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate, weight: float) -> None:
        self.updates.append(dataclasses.replace(update, weight=float(weight)))

    def result(self) -> GlobalState:
        total = sum(u.weight for u in self.updates)
        if not self.updates or total <= 0:
            raise ValueError("aggregation needs at least one client with a positive weight")
        normalised = [dataclasses.replace(u, weight=u.weight / total) for u in self.updates]
        return self.method.aggregate(normalised, self.previous)


def streaming_accumulator(
    method: Method, owner: type[Method], streaming: type[Accumulator], previous: GlobalState | None
) -> Accumulator:
    """`owner`'s streaming accumulator for `method`, unless `method` is a subclass with its own
    ``aggregate``: that rule is honoured by the default keep-every-update Accumulator."""
    if type(method).aggregate is not owner.aggregate:
        return Accumulator(method, previous)
    return streaming(method, previous)


def accumulate(accumulator: Accumulator, updates: list[ClientUpdate]) -> GlobalState:
    """``aggregate`` for a method whose rule is its own streaming accumulator: the updates
    folded in one at a time with the raw weights the server folds (ClientUpdate.weight, else
    n_k; the accumulator normalises), so that one aggregate call and a streamed server round
    run the same code and give the same bits."""
    if not updates:
        raise ValueError("aggregation needs at least one client")
    for update in updates:
        accumulator.add(update, update.weight if update.weight is not None else update.num_examples)
    return accumulator.result()


class Method:
    """One federated LoRA method (cf. Flower strategies, PEFT tuners): its server side here, its
    client side in ``client_hooks``. Subclasses set ``name`` and implement ``aggregate``,
    ``client_factors`` and ``global_factors``; every other hook has a default that does
    nothing, so the server calls them all without asking whether a method has them. A
    method's constructor arguments are its ``method_args`` (checked at load time)."""

    name: ClassVar[str]
    # Clients may send back a smaller rank than assigned and keep it (HetLoRA).
    prunes_ranks: ClassVar[bool] = False
    # The server cuts every client to the federation's smallest rank (FedIT); updates must
    # come back at exactly the assigned rank.
    homogeneous: ClassVar[bool] = False
    # The client hooks this method's client_options may ask for (registered with the method).
    client_hooks: ClassVar[tuple[type[ClientHook], ...]] = ()
    # The global model changes the base weights themselves (``base_offset``: FLoRA's merged
    # updates, SLoRA's sparse stage, FedEx-LoRA's residual): the base must then be float32 and
    # unquantized (checked by flexlora.config), and a run exports a merged model.
    changes_base_weights: ClassVar[bool] = False

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState | None:
        """The state before round 1 (e.g. a rank-0 state, so that every client of round 1 starts
        from the shared initial adapter). Default: None."""
        return None

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None) -> GlobalState:
        """New global state from this round's updates (and the previous state, if any)."""
        raise NotImplementedError

    def accumulator(self, state: GlobalState | None) -> Accumulator:
        """The round's aggregation one update at a time (what the server uses; see Accumulator).
        Default: keep the updates and call ``aggregate`` at the end."""
        return Accumulator(self, state)

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """Factors a client with these per-module ranks starts from; None = fresh PEFT init."""
        raise NotImplementedError

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        """The global model as LoRA factors (at its full rank) and the rank of each module."""
        raise NotImplementedError

    def client_options(self, state: GlobalState | None, round_: int, rank_type: str) -> dict:
        """Plain-JSON settings for a client's local step, one key per client hook. Default: {}."""
        return {}

    def base_offset(self, state: GlobalState | None) -> dict[str, torch.Tensor] | None:
        """A dense change of the base weights that is part of the global model (FLoRA's merged
        updates, SLoRA's sparse phase): clients train on base + offset, evaluation and export
        include it. Default: None."""
        return None

    def truncation(self, state: GlobalState, module_ranks: dict[str, set[int]]) -> dict | None:
        """A report of what each client rank's slice of the global model loses (logged per
        round). Default: None."""
        return None

    def bound_ranks(self, ranks: dict[str, int]) -> None:
        """The server's promise: no client will be handed, and the global adapter will not be
        evaluated or exported at, a rank above ``ranks[module]`` (the largest rank any client of
        the federation has, or eval.export_rank if larger; called again after a resume). A
        method that keeps a spectrum may keep no more of it than this. Default: ignored."""

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """State a method keeps outside the global state, for checkpoints: (tensors, JSON), or
        None (the default: everything is in the global state, as the built-in methods do)."""
        return None

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict | None) -> None:
        """Restore what extra_state returned."""

    # A server optimizer (methods/server_opt.py) steps the global parameters x of a method that
    # exposes them; server_params returning None means the method does not support one.
    def server_params(self, state: GlobalState) -> dict[str, torch.Tensor] | None:
        """The global parameters x a server optimizer steps (None: no server optimizer)."""
        return None

    def from_server_params(self, params: dict[str, torch.Tensor], like: GlobalState) -> GlobalState:
        """The state of stepped parameters (the inverse of server_params)."""
        raise NotImplementedError

