"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) on the
clients: a client hook that adds μ/2·Σ ‖w − w₀‖² over the trainable parameters (w₀: their values
at the start of the round) to the loss. It composes with any method (``method_args.fedprox_mu``:
the server adds the option to every task, see methods.compose_method)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import ClientHook
from .helpers import option_number


def proximal_loss(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """μ/2·Σ ‖w − w₀‖² (FedProx)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


@dataclass
class FedProx(ClientHook):
    """Client option "fedprox_mu": μ (0 turns it off)."""

    mu: float
    anchors: list[torch.Tensor] | None = field(default=None, compare=False, repr=False)

    option: ClassVar[str] = "fedprox_mu"

    @classmethod
    def parse(cls, value) -> FedProx | None:
        mu = option_number(value, "fedprox_mu", 0, math.inf)
        return cls(mu) if mu > 0 else None

    def penalty(self, local) -> torch.Tensor:
        if self.anchors is None:  # first call: after the first backward, before any optimizer step
            self.anchors = [p.detach().clone() for p in local.params]
        return proximal_loss(local.params, self.anchors, self.mu)
