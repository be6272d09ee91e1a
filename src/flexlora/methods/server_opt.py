"""Server optimizers: a server step after a LoRA method's aggregation (``ServerStep``, called by
FederatedServer), composable with the methods that expose their parameters.

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

The moments are the step's own state (``ServerStep.moments``), written to checkpoints beside the
method's state. FedProx, the other setting that composes with any method, is a client hook
(fedprox.py); the server adds its option to every task.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .base import ClientUpdate, GlobalState, Method

OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi")
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


class ServerStep:
    """A server optimizer as a step after a method's aggregation (FederatedServer calls it).

    It keeps the optimizer's moments itself (``moments``: "m/<param>", "v/<param>"), apart from
    the method's state, so the method never sees them and a checkpoint stores them beside it."""

    def __init__(self, optimizer: ServerOptimizer):
        self.optimizer = optimizer
        self.moments: dict[str, torch.Tensor] = {}

    def __call__(self, method: Method, started_from: GlobalState | None, aggregated: GlobalState) -> GlobalState:
        """The state after the step: x + step(x̄ − x), with x̄ the method's aggregate (`aggregated`)
        and x the method's aggregate of what the round's clients started from (`started_from`,
        see starting_point; None: no start to step from, `aggregated` is taken as is)."""
        if started_from is None:
            return aggregated
        x_old = method.server_params(started_from)
        x_avg = method.server_params(aggregated)
        x_new = {}
        for key, avg in x_avg.items():
            old = x_old.get(key)
            if old is None or old.shape != avg.shape:  # nothing to step from: take it as is
                x_new[key] = avg
                continue
            own = {s: self.moments[f"{s}/{key}"].to(avg).clone() for s in ("m", "v") if f"{s}/{key}" in self.moments}
            x_new[key] = self.optimizer.step(old.to(avg), avg - old.to(avg), own)
            self.moments.update({f"{s}/{key}": t for s, t in own.items()})
        return method.from_server_params(x_new, aggregated)


def starting_point(method: Method, update: ClientUpdate, previous: GlobalState) -> ClientUpdate:
    """The update replaced by the factors its client was handed (at the ranks it sent): the
    server aggregates these, with the same weights, into the step's x."""
    ranks = {m: update.rank(m) for m in update.factors}
    return replace(update, factors=method.client_factors(previous, ranks, update.lora_alpha), deltas={})


def check_composable(method: Method, server_opt: ServerOptimizer | None, fedprox_mu) -> float:
    """fedprox_mu as a float; a one-line ValueError when either setting does not fit `method`."""
    if server_opt is not None and type(method).server_params is Method.server_params:
        raise ValueError(f"server_opt is not available with method {method.name!r} (only with flexlora and fedit)")
    if isinstance(fedprox_mu, bool) or not isinstance(fedprox_mu, (int, float)) or not fedprox_mu >= 0:
        raise ValueError(f"fedprox_mu must be a number >= 0, got {fedprox_mu!r}")
    return float(fedprox_mu)
