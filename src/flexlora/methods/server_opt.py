"""Server optimizers on the aggregated update, and FedProx on the clients, around a LoRA method.

Server optimizers (Hsu et al. 2019 for FedAvgM; Reddi et al., "Adaptive Federated
Optimization", ICLR 2021 for FedAdam and FedYogi): with x the global parameters before the
round and x̄ what the method aggregated, Δ = x̄ − x and

    fedavgm:  v ← μ v + Δ;                                 x ← x + η v
    fedadam:  m ← β₁ m + (1−β₁) Δ;  v ← β₂ v + (1−β₂) Δ²;    x ← x + η m / (√v + τ)
    fedyogi:  m as fedadam;  v ← v − (1−β₂) Δ² sign(v − Δ²); x ← x + η m / (√v + τ)

(elementwise, moments start at zero, no bias correction, as in Reddi et al.). With fedavgm,
μ = 0 and η = 1 the method is unchanged.

x is what the clients of the round actually started from, not the previous global state: a
FlexLoRA client of rank r starts from the rank-r truncation of ΔW, so taking the pseudo-gradient
against the full-rank ΔW would count the truncation loss as a client update (clients that send
back exactly what they received would move the model). So x = the method's own aggregate of the
starting factors (what each client was handed, at the rank it sent, with its weight), and
x ← x + step(x̄ − x); clients that do not train leave the model where it was. Before round 1
the server's initial state is that common start (a rank-0 state: zero update); only a caller
that passes no state at all gets the first aggregation as is.

What x is depends on the method (``server_params`` / ``from_server_params``):
- fedit: A and B of every module;
- flexlora: the dense ΔW of every module; after the step the state is the top-K SVD of the new
  ΔW, with K the rank FlexLoRA itself would keep this round (min(Σ r_k, m, n), or
  max_global_rank), so the state stays low-rank. This keeps dense moments (m × n per module).

FedProx (Li et al., 2020): ``fedprox_mu`` > 0 asks every client to add μ/2 ‖w − w₀‖² over its
trainable parameters (w₀: their values at the start of the round) to its loss; composable with
any method. Its client hook is in fedprox.py.

All moments live in the global state (keys "server_opt.m/…", "server_opt.v/…"), so a checkpoint
of the state is a checkpoint of the optimizer.
"""

from __future__ import annotations

import math

import torch

from dataclasses import replace

from .base import ClientUpdate, Factors, GlobalState, Method
from .fedprox import FedProx

OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi")
SLOT_PREFIX = "server_opt."
DEFAULT_LR = {"fedavgm": 1.0, "fedadam": 1e-3, "fedyogi": 1e-3}


class ServerOptimizer:
    """One of OPTIMIZERS with its hyper-parameters; `step` updates one tensor."""

    def __init__(
        self,
        name: str,
        lr: float | None = None,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-6,
    ):
        """lr: server learning rate η (default 1.0 for fedavgm, 1e-3 for fedadam/fedyogi: tune
        it; an adaptive step moves each entry by up to about η). momentum: μ of fedavgm.
        beta1, beta2, tau: of fedadam/fedyogi."""
        if name not in OPTIMIZERS:
            raise ValueError(f"server_opt.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
        lr = DEFAULT_LR[name] if lr is None else lr
        checks = {"lr": (lr, 0, math.inf), "momentum": (momentum, 0, 1), "beta1": (beta1, 0, 1), "beta2": (beta2, 0, 1)}
        for key, (value, low, high) in checks.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value < high):
                raise ValueError(f"server_opt.{key} must be in [{low}, {high}), got {value!r}")
        if lr <= 0:
            raise ValueError(f"server_opt.lr must be > 0, got {lr!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"server_opt.tau must be > 0, got {tau!r}")
        self.name, self.lr, self.momentum = name, float(lr), float(momentum)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    @classmethod
    def from_config(cls, config) -> ServerOptimizer:
        """From the mapping in method_args.server_opt, e.g. {name: fedadam, lr: 0.001}."""
        if isinstance(config, str):
            config = {"name": config}
        if not isinstance(config, dict) or "name" not in config:
            raise ValueError(f"server_opt must be a mapping with a name ({', '.join(OPTIMIZERS)}), got {config!r}")
        known = ("name", "lr", "momentum", "beta1", "beta2", "tau")
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"server_opt: unknown setting {unknown[0]!r}; known: {', '.join(known)}")
        return cls(**config)

    def step(self, x: torch.Tensor, delta: torch.Tensor, slots: dict[str, torch.Tensor]) -> torch.Tensor:
        """The new x; `slots` ("m", "v": zeros when absent) are updated in place."""
        if self.name == "fedavgm":
            v = slots.setdefault("v", torch.zeros_like(delta))
            v.mul_(self.momentum).add_(delta)
            return x + self.lr * v
        m = slots.setdefault("m", torch.zeros_like(delta))
        v = slots.setdefault("v", torch.zeros_like(delta))
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        sq = delta * delta
        if self.name == "fedadam":
            v.mul_(self.beta2).add_(sq, alpha=1 - self.beta2)
        else:  # fedyogi
            v.sub_((1 - self.beta2) * sq * torch.sign(v - sq))
        return x + self.lr * m / (v.sqrt() + self.tau)


class Composed(Method):
    """A method with a server optimizer on its aggregated update (a server step after the
    method's aggregation) and/or FedProx on its clients (a client hook added to its options).

    Every hook of ``Method`` is forwarded to the wrapped method explicitly (nothing else is);
    the optimizer's moments are kept in the state under SLOT_PREFIX and hidden from it."""

    def __init__(self, inner: Method, server_opt: ServerOptimizer | None = None, fedprox_mu: float = 0.0):
        if server_opt is not None and type(inner).server_params is Method.server_params:
            raise ValueError(f"server_opt is not available with method {inner.name!r} (only with flexlora and fedit)")
        if isinstance(fedprox_mu, bool) or not isinstance(fedprox_mu, (int, float)) or not fedprox_mu >= 0:
            raise ValueError(f"fedprox_mu must be a number >= 0, got {fedprox_mu!r}")
        self.inner = inner
        self.server_opt = server_opt
        self.fedprox_mu = float(fedprox_mu)
        self.name = inner.name
        self.homogeneous = inner.homogeneous
        self.prunes_ranks = inner.prunes_ranks
        self.client_hooks = (*inner.client_hooks, *((FedProx,) if self.fedprox_mu > 0 else ()))

    @staticmethod
    def split_state(state: GlobalState | None) -> tuple[GlobalState | None, GlobalState]:
        """(the wrapped method's state, the optimizer's moments)."""
        if state is None:
            return None, {}
        inner = {k: v for k, v in state.items() if not k.startswith(SLOT_PREFIX)}
        return inner, {k: v for k, v in state.items() if k.startswith(SLOT_PREFIX)}

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        previous, slots = self.split_state(state)
        aggregated = self.inner.aggregate(updates, previous)
        if self.server_opt is None or previous is None:
            return {**aggregated, **slots}
        x_old = self.inner.server_params(self.inner.aggregate(self.starting_points(updates, previous), previous))
        x_avg = self.inner.server_params(aggregated)
        x_new, new_slots = {}, {}
        for key, avg in x_avg.items():
            old = x_old.get(key)
            if old is None or old.shape != avg.shape:  # nothing to step from: take it as is
                x_new[key] = avg
                continue
            own = {s: slots[f"{SLOT_PREFIX}{s}/{key}"].to(avg).clone() for s in ("m", "v") if f"{SLOT_PREFIX}{s}/{key}" in slots}
            x_new[key] = self.server_opt.step(old.to(avg), avg - old.to(avg), own)
            new_slots.update({f"{SLOT_PREFIX}{s}/{key}": t for s, t in own.items()})
        return {**self.inner.from_server_params(x_new, aggregated), **new_slots}

    def starting_points(self, updates: list[ClientUpdate], previous: GlobalState) -> list[ClientUpdate]:
        """Each update replaced by the factors its client was handed (at the ranks it sent)."""
        return [
            replace(u, factors=self.inner.client_factors(previous, {m: u.rank(m) for m in u.factors}, u.lora_alpha), deltas={})
            for u in updates
        ]

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        return self.inner.client_factors(self.split_state(state)[0], module_ranks, lora_alpha)

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        return self.inner.global_factors(self.split_state(state)[0], lora_alpha)

    def init_state(self, shapes) -> GlobalState | None:
        return self.inner.init_state(shapes)

    def base_offset(self, state: GlobalState | None):
        return self.inner.base_offset(self.split_state(state)[0])

    def truncation(self, state: GlobalState, module_ranks: dict[str, set[int]]) -> dict | None:
        return self.inner.truncation(self.split_state(state)[0], module_ranks)

    def server_params(self, state: GlobalState) -> dict[str, torch.Tensor] | None:
        return self.inner.server_params(self.split_state(state)[0])

    def from_server_params(self, params: dict[str, torch.Tensor], like: GlobalState) -> GlobalState:
        return self.inner.from_server_params(params, like)

    def bound_ranks(self, ranks: dict[str, int]) -> None:
        # A server optimizer steps the whole dense ΔW (server_params), so the wrapped method
        # keeps its whole state: the bound is only passed on without one.
        if self.server_opt is None:
            self.inner.bound_ranks(ranks)

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        return self.inner.extra_state()

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict | None) -> None:
        self.inner.load_extra_state(tensors, meta)

    def client_options(self, state: GlobalState | None, round_: int, rank_type: str) -> dict:
        options = dict(self.inner.client_options(self.split_state(state)[0], round_, rank_type))
        if self.fedprox_mu > 0:
            options[FedProx.option] = self.fedprox_mu
        return options
