"""The interface every method implements (``Method``, its server side, and ``ClientHook``, its
client side), with default hooks, and ``Accumulator``, a round's aggregation one update at a
time. The math methods share is in ``helpers.py``.

No I/O, no model, no transport here. A method sees the LoRA factors the clients sent and the
previous global state, and returns the new global state; it also tells a client of a given rank
which factors to start its next round from, and which client hooks to run.

Conventions (PEFT's): for a target module with weight W of shape (m, n) (out, in),
a client of rank r holds A (r, n) and B (m, r), and its update is  s * B @ A  with
s = lora_alpha / r.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch

from flexlora.protocol import ClientTask, ClientUpdate, Factors, SparseDelta  # noqa: F401 (re-exported: flexlora.methods)

from .helpers import carry_noise

GlobalState = dict[str, torch.Tensor]  # flat and safetensors-ready; keys are method-defined


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

    def lr_b_ratio(self) -> float | None:
        """B's learning rate over A's this hook asks for (None: train.lr_b_ratio)."""
        return None

    def trial_steps(self, local_steps: int, epoch_steps: int | None) -> int:
        """Steps of a trial pass before local training (0: none): the loop trains them, calls
        ``after_trial``, then trains its `local_steps` with a fresh optimizer on the same batches.
        `epoch_steps`: one epoch's steps when the config counts local training in epochs."""
        return 0

    def after_trial(self, view: TrainingView) -> None:
        """After the trial pass (e.g. score what it changed, then reset the factors)."""

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

    def add_noise(self, draw: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
        """Client-level DP (flexlora.privacy): add draw(name, shape) to the round's weighted sum
        Σ w_k x_k (raw weights), before it is divided by Σ w_k and post-processed; called once,
        after the last ``add``. This keep-every-update default serves a method whose
        ``privacy_space`` is "factors": each module's noise rides on the update of the largest
        rank there (helpers.carry_noise), so the method's own rule sees it inside its sums."""
        if self.method.privacy_space != "factors":
            raise ValueError(f"privacy: method {self.method.name!r} aggregates in no space this accumulator can add noise to")
        self.updates = carry_noise(self.updates, draw)

    def noise_energies(self) -> dict[str, dict[str, float]]:
        """After ``result``: per module, how much of the DP noise the method's post-processing
        kept (FlexLoRA's truncation: FlexLoRAAccumulator.noise_energies); {}: not measured."""
        return {}


def streaming_accumulator(
    method: Method, owner: type[Method], streaming: type[Accumulator], previous: GlobalState | None
) -> Accumulator:
    """`owner`'s streaming accumulator for `method`, unless `method` is a subclass with its own
    ``aggregate``: that rule is honoured by the default keep-every-update Accumulator."""
    if type(method).aggregate is not owner.aggregate:
        return Accumulator(method, previous)
    return streaming(method, previous)


def inherits_rule(method: Method, owner: type[Method]) -> None:
    """For `owner`'s secure_summands: a subclass with its own aggregation rule (``aggregate`` or
    ``accumulator``) has its own needs, so it gets the default refusal unless it declares them."""
    cls = type(method)
    if cls.aggregate is not owner.aggregate or cls.accumulator is not owner.accumulator:
        Method.secure_summands(method)


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
    # Client-level differential privacy (flexlora.privacy, docs/privacy.md): the space a client's
    # change over the round is clipped in and the round's sum noised in, before the method's
    # post-processing. "delta": ΔW = s·B·A per module (the accumulator adds dense noise to its
    # sum); "factors": A and s·B, whose padded weighted sums the method takes. None: refused,
    # for the reason ``privacy_refusal`` gives.
    privacy_space: ClassVar[str | None] = None
    privacy_refusal: ClassVar[str] = "its aggregate is not a weighted sum of the clients' updates that noise could join"

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

    def global_singular_values(self, state: GlobalState) -> dict[str, torch.Tensor] | None:
        """The singular values of the global adapter's ΔW per module (modules of rank 0 left
        out) where the state holds them already, from the SVD its aggregation computed, so that
        the per-round spectrum reads them instead of computing them again; None (the default):
        the spectrum computes them from ``global_factors``."""
        return None

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

    # Secure aggregation (flower.secure_aggregation, Flower's SecAgg+; flexlora.privacy.secagg):
    # the server learns only the weighted mean Σ_k w_k x_k / Σ_k w_k of what the clients upload,
    # never one client's x_k. A method whose new state is a function of such a mean says what
    # x_k is; every other method needs each client's factors and cannot run under it.
    def secure_summands(self) -> tuple[str, ...]:
        """What a client uploads under secure aggregation, per module: "A" (A_k zero-padded to
        the round's largest rank R, (R, n)), "B" (s_k B_k zero-padded, (m, R)), "dense"
        (s_k B_k A_k, (m, n)). A one-line ValueError naming why a method cannot (the default)."""
        raise ValueError(f"method {self.name} needs each client's own factors, which secure aggregation hides from the server")

    def from_secure_mean(
        self, mean: dict[str, torch.Tensor], state: GlobalState | None, lora_alpha: float, ranks: dict[str, list[int]]
    ) -> GlobalState:
        """The new global state from the clients' weighted mean (keys f"{module}.{kind}" for the
        kinds of ``secure_summands``). `ranks`: per module, the ranks of the clients in the mean."""
        raise NotImplementedError

    # A server optimizer (methods/server_opt.py) steps the global parameters x of a method that
    # exposes them; server_params returning None means the method does not support one.
    def server_params(self, state: GlobalState) -> dict[str, torch.Tensor] | None:
        """The global parameters x a server optimizer steps (None: no server optimizer)."""
        return None

    def from_server_params(self, params: dict[str, torch.Tensor], like: GlobalState) -> GlobalState:
        """The state of stepped parameters (the inverse of server_params)."""
        raise NotImplementedError
