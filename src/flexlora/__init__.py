"""flexlora: federated fine-tuning of LLMs under heterogeneous tasks and client resources.

The public Python API (docs/api.md): ``Aggregator``, a registered method's server side on PEFT
adapter state dicts; ``ranks_of``, an adapter's ranks; ``METHODS``, the registered methods by
name; ``register_method`` to add one. They are imported on first use, so that ``flexlora``'s
command line does not pay for torch before it needs it.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["METHODS", "Aggregator", "ranks_of", "register_method"]
_HOMES = {
    "Aggregator": "flexlora.api",
    "ranks_of": "flexlora.api",
    "METHODS": "flexlora.methods",
    "register_method": "flexlora.methods",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'flexlora' has no attribute {name!r}")
