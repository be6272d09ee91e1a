"""Aggregation methods behind one interface (see base.py), and a registry to pick one by name.

To add a method: write a module with a class that has a ``name`` and the three methods of
``AggregationMethod`` (plus any optional hooks it needs, see base.py), import it here and add
it to ``METHODS`` (or call ``register_method``).

Two settings compose with methods rather than being one: ``server_opt`` (a server optimizer
on the aggregated update; flexlora and fedit) and ``fedprox_mu`` (FedProx on the clients; any
method). ``make_method`` takes them out of the arguments and wraps the method (server_opt.py).
"""

from __future__ import annotations

import inspect

from .base import (
    AggregationMethod,
    ClientUpdate,
    Factors,
    GlobalState,
    SparseDelta,
    compute_dtype,
    capped_weights,
    data_weights,
    module_names,
    module_shape,
)
from .fedit import FedIT
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .server_opt import Composed, ServerOptimizer
from .slora import SLoRA
from .svd import TruncatedSVD, truncated_svd

METHODS: dict[str, type] = {cls.name: cls for cls in (FlexLoRA, FedIT, HetLoRA, SLoRA, FLoRA, FFALoRA)}
COMPOSABLE = ("server_opt", "fedprox_mu")  # method_args handled by make_method itself


def register_method(cls: type) -> type:
    """Add a method class to METHODS under its ``name`` (usable as a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls!r} needs a non-empty string attribute 'name'")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"aggregation method {name!r} is already registered as {METHODS[name]!r}")
    METHODS[name] = cls
    return cls


def make_method(name: str, **kwargs) -> AggregationMethod:
    """Instantiate a registered method by name, passing kwargs to its constructor; the composable
    arguments ``server_opt`` (mapping) and ``fedprox_mu`` (number) wrap it (see server_opt.py).
    Bad arguments raise a one-line ValueError naming them."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose from: {', '.join(sorted(METHODS))}") from None
    own = {k: v for k, v in kwargs.items() if k not in COMPOSABLE}
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p != "self"]
        unknown = sorted(set(own) - set(accepted))
        if unknown:
            known = ", ".join([*accepted, *COMPOSABLE])
            raise ValueError(f"method {name!r} has no argument {unknown[0]!r}; its arguments: {known}")
    method = cls(**own)
    if "server_opt" in kwargs or kwargs.get("fedprox_mu"):
        server_opt = ServerOptimizer.from_config(kwargs["server_opt"]) if kwargs.get("server_opt") is not None else None
        method = Composed(method, server_opt, kwargs.get("fedprox_mu", 0.0))
    return method


__all__ = [
    "METHODS",
    "AggregationMethod",
    "ClientUpdate",
    "Composed",
    "FFALoRA",
    "FLoRA",
    "Factors",
    "FedIT",
    "FlexLoRA",
    "HetLoRA",
    "SLoRA",
    "ServerOptimizer",
    "SparseDelta",
    "GlobalState",
    "TruncatedSVD",
    "compute_dtype",
    "capped_weights",
    "data_weights",
    "make_method",
    "module_names",
    "module_shape",
    "register_method",
    "truncated_svd",
]
