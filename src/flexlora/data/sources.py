"""Data sources by name: each returns a FederatedDataset (training clients + held-out clients)."""

from __future__ import annotations

from flexlora.config import ConfigError, DataConfig
from flexlora.data.types import FederatedDataset


def load_federated_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    if cfg.source == "synthetic":
        from flexlora.data.synthetic import make_federation

        kwargs = {} if cfg.heldout_tasks is None else {"heldout_tasks": cfg.heldout_tasks}
        return make_federation(
            num_clients=cfg.num_clients,
            train_per_client=cfg.train_per_client,
            test_per_client=cfg.test_per_client,
            seed=seed,
            **kwargs,
        )
    raise ConfigError(f"data.source: unknown data source '{cfg.source}'; choose from: {', '.join(SOURCES)}")


SOURCES = ("synthetic",)
