"""flexlora: federated fine-tuning of LLMs under heterogeneous tasks and client resources.

The public Python API (docs/api.md): ``Aggregator``, a registered method's server side on PEFT
adapter state dicts; ``METHODS``, the registered methods by name; ``register_method`` to add one.
"""

from flexlora.api import Aggregator, ranks_of
from flexlora.methods import METHODS, register_method

__version__ = "0.1.0"
__all__ = ["METHODS", "Aggregator", "ranks_of", "register_method"]
