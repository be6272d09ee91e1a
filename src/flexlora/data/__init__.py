"""Federated instruction data: sources, prompt templates and tokenisation."""

from flexlora.data.types import ClientData, Example, FederatedDataset

__all__ = ["ClientData", "Example", "FederatedDataset"]
