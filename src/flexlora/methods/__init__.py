"""Federated LoRA methods, one module each, behind one interface (base.py: ``Method``, the server
side, and ``ClientHook``, the client side), and a registry to pick one by name.

To add a method: write one module with a ``Method`` subclass (its arguments, server side, and
the ``ClientHook`` classes of its client side with their validation rules) and add it to
``METHODS`` below, or call ``register_method`` (see docs/adding_a_method.md).

Two settings compose with methods rather than being one: ``server_opt`` (a server optimizer
on the aggregated update, a ``ServerStep`` the server runs after the method's aggregation;
flexlora and fedit) and ``fedprox_mu`` (FedProx, a client hook the server asks every client
for; any method). ``compose_method`` reads them beside the method's own arguments.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from .base import ClientHook, ClientUpdate, Factors, GlobalState, Method, SparseDelta
from .fedit import FedIT
from .fedprox import FedProx
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .helpers import capped_weights, compute_dtype, data_weights, module_names, module_shape
from .hetlora import HetLoRA
from .server_opt import ServerOptimizer, ServerStep, check_composable
from .slora import SLoRA
from .svd import TruncatedSVD, truncated_svd


def _method_classes(module_name: str) -> list[type]:
    """The Method subclasses a method module defines (not those it imports)."""
    module = importlib.import_module(f"{__name__}.{module_name}")
    return [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Method) and v.__module__ == module.__name__ and getattr(v, "name", None)
    ]


# The registry: one line per method module (its Method subclasses are registered by name).
METHOD_MODULES = ("flexlora", "fedit", "hetlora", "slora", "flora", "ffa", "rolora", "fedex", "florist", "lora_a2", "raflora")
METHODS: dict[str, type] = {cls.name: cls for module_name in METHOD_MODULES for cls in _method_classes(module_name)}
COMPOSABLE = ("server_opt", "fedprox_mu")  # method_args that compose with a method (compose_method)
# Client options the reliability and privacy layers add (handled by the client loop itself),
# accepted as they are; "dp_clip" is client-side clipping (flexlora.privacy.dp.CLIP_OPTION).
PASSTHROUGH = ("timeout_s", "inject_failure", "dp_clip")


def register_method(cls: type) -> type:
    """Add a method class to METHODS under its ``name`` (usable as a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls!r} needs a non-empty string attribute 'name'")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"aggregation method {name!r} is already registered as {METHODS[name]!r}")
    for hook in getattr(cls, "client_hooks", ()):
        known = client_hook_types().get(hook.option)
        if known is not None and known is not hook:
            raise ValueError(f"client option {hook.option!r} of {cls!r} is already the option of {known!r}")
    METHODS[name] = cls
    return cls


def client_hook_types() -> dict[str, type[ClientHook]]:
    """Client option key -> the hook class that interprets it: every registered method's, then
    FedProx (composable with any method). The order is the order the client calls them in."""
    hooks: dict[str, type[ClientHook]] = {}
    for cls in METHODS.values():
        for hook in getattr(cls, "client_hooks", ()):
            hooks.setdefault(hook.option, hook)
    hooks.setdefault(FedProx.option, FedProx)
    return hooks


def parse_client_options(options: dict | None) -> list[ClientHook]:
    """The client hooks a task's options ask for, in the registry's order (unknown keys or bad
    values: a one-line ValueError; PASSTHROUGH keys are left to the client loop)."""
    options = dict(options or {})
    types = client_hook_types()
    known = (*types, *PASSTHROUGH)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"client option {unknown[0]!r} is unknown; known options: {', '.join(known)}")
    hooks = [hook for key, cls in types.items() if key in options for hook in [cls.parse(options[key])] if hook is not None]
    in_place = [h for h in hooks if h.trains_weights]
    if len(in_place) > 1:
        raise ValueError(f"client options {in_place[0].option} and {in_place[1].option} both train the weights")
    adapter_only = [h.option for h in hooks if h.needs_adapter]
    if in_place and adapter_only:
        raise ValueError(
            f"client option {in_place[0].option} trains the weights, not an adapter: it excludes {' and '.join(adapter_only)}"
        )
    return hooks


def make_method(name: str, **kwargs) -> Method:
    """Instantiate a registered method by name, passing kwargs (its own arguments) to its
    constructor. Bad arguments raise a one-line ValueError naming them."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose from: {', '.join(sorted(METHODS))}") from None
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p != "self"]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            known = ", ".join([*accepted, *COMPOSABLE])
            raise ValueError(f"method {name!r} has no argument {unknown[0]!r}; its arguments: {known}")
    return cls(**kwargs)


@dataclass
class Composition:
    """A method with what composes with it: a server step after its aggregation (or None) and
    FedProx's μ for its clients (0: off)."""

    method: Method
    server_step: ServerStep | None = None
    fedprox_mu: float = 0.0


def compose_method(name: str, **kwargs) -> Composition:
    """make_method on the method's own arguments, plus the COMPOSABLE ones: ``server_opt``
    (mapping, see server_opt.py) and ``fedprox_mu`` (number). One-line ValueErrors."""
    method = make_method(name, **{k: v for k, v in kwargs.items() if k not in COMPOSABLE})
    server_opt = ServerOptimizer.from_config(kwargs["server_opt"]) if kwargs.get("server_opt") is not None else None
    fedprox_mu = check_composable(method, server_opt, kwargs.get("fedprox_mu", 0.0))
    return Composition(method, ServerStep(server_opt) if server_opt is not None else None, fedprox_mu)


__all__ = [
    "METHODS",
    "PASSTHROUGH",
    "ClientHook",
    "ClientUpdate",
    "Composition",
    "FFALoRA",
    "FLoRA",
    "Factors",
    "FedIT",
    "FedProx",
    "FlexLoRA",
    "HetLoRA",
    "Method",
    "SLoRA",
    "ServerOptimizer",
    "ServerStep",
    "SparseDelta",
    "GlobalState",
    "TruncatedSVD",
    "compute_dtype",
    "capped_weights",
    "client_hook_types",
    "compose_method",
    "data_weights",
    "make_method",
    "module_names",
    "module_shape",
    "parse_client_options",
    "register_method",
    "truncated_svd",
]
