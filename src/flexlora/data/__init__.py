"""Federated instruction data: sources, prompt templates and tokenisation."""

from flexlora.data.types import ClientData, DataError, Example, FederatedDataset

__all__ = ["ClientData", "DataError", "Example", "FederatedDataset"]
