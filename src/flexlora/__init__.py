"""flexlora: federated fine-tuning of LLMs under heterogeneous tasks and client resources."""

__version__ = "0.1.0"
