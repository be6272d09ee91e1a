"""Aggregation methods behind one interface (see base.py), and a registry to pick one by name.

To add a method: write a module with a class that has a ``name`` and the three methods of
``AggregationMethod``, import it here and add it to ``METHODS`` (or call ``register_method``).
"""

from __future__ import annotations

from .base import (
    AggregationMethod,
    ClientUpdate,
    Factors,
    GlobalState,
    compute_dtype,
    data_weights,
    module_names,
    module_shape,
)
from .fedit import FedIT
from .flexlora import FlexLoRA
from .svd import TruncatedSVD, truncated_svd

METHODS: dict[str, type] = {cls.name: cls for cls in (FlexLoRA, FedIT)}


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
    """Instantiate a registered method by name, passing kwargs to its constructor."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose from: {', '.join(sorted(METHODS))}") from None
    return cls(**kwargs)


__all__ = [
    "METHODS",
    "AggregationMethod",
    "ClientUpdate",
    "Factors",
    "FedIT",
    "FlexLoRA",
    "GlobalState",
    "TruncatedSVD",
    "compute_dtype",
    "data_weights",
    "make_method",
    "module_names",
    "module_shape",
    "register_method",
    "truncated_svd",
]
