"""Data sources by name: each returns a FederatedDataset (training clients + held-out clients).

- synthetic: built-in string tasks (no files).
- natural-instructions: the FlexLoRA paper's per-client folder (one NI task per client).
- dolly: databricks-dolly-15k JSONL, Dirichlet split over categories + a held-out test split.
- json: generic JSON/JSONL instruction records, grouped by a client field or Dirichlet-split.

Held-out clients (data.heldout_ids / heldout_fraction / heldout_categories) are chosen here,
with data.split_seed, and never reach the training pool: FederatedDataset refuses any overlap.
"""

from __future__ import annotations

import logging
import random

from typing import TYPE_CHECKING

from flexlora.errors import ConfigError
from flexlora.data.records import Issues
from flexlora.data.split import select_heldout
from flexlora.data.types import ClientData, DataError, FederatedDataset

if TYPE_CHECKING:  # annotations only: the data layer does not import the configuration
    from flexlora.schema import DataConfig

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "natural-instructions", "dolly", "json")


def load_federated_dataset(cfg: DataConfig, seed: int, for_training: bool = True) -> FederatedDataset:
    """`for_training=False` (evaluation only): every client may be held out."""
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
    if cfg.source not in SOURCES:
        raise ConfigError(f"data.source: unknown data source '{cfg.source}'; choose from: {', '.join(SOURCES)}")
    if cfg.path is None:
        raise ConfigError(f"data.path: data.source={cfg.source} needs data.path (a folder or file)")
    issues = Issues(cfg.bad_records)
    marked: set[str] = set()
    test_clients: list[ClientData] = []
    if cfg.source == "natural-instructions":
        from flexlora.data.natural_instructions import load_clients

        clients, marked = load_clients(cfg.path, issues, cfg.weight_by)
    else:
        from flexlora.data.instructions import load_records

        if cfg.weight_by == "source":
            raise ConfigError(f"data.weight_by: 'source' needs a natural-instructions clients.json, not data.source={cfg.source}")
        clients, test_clients = load_records(cfg, issues, dolly=cfg.source == "dolly")
    dataset = assemble(cfg, clients, issues, marked, test_clients, for_training)
    issues.log_summary(dataset.name)
    return dataset


def assemble(
    cfg: DataConfig,
    clients: list[ClientData],
    issues: Issues,
    marked: set[str] = frozenset(),
    extra_heldout: list[ClientData] = (),
    for_training: bool = True,
) -> FederatedDataset:
    """Split clients into training and held-out ones. A held-out client is evaluated on its
    test examples (on all its examples if it has no test split) and keeps no training data."""
    heldout_ids = select_heldout(
        clients,
        ids=cfg.heldout_ids,
        fraction=cfg.heldout_fraction,
        categories=cfg.heldout_categories,
        seed=cfg.split_seed,
        marked=marked,
        for_training=for_training,
    )
    training, heldout = [], list(extra_heldout)
    for c in clients:
        if c.client_id in heldout_ids:
            test = c.test or c.train
            if not test:
                issues.note(f"held-out client {c.client_id} has no examples to evaluate on")
            heldout.append(ClientData(c.client_id, c.category, [], test=test, eval=c.eval, weight=c.weight))
        elif not c.train:
            issues.note(f"client {c.client_id} has no training examples; not used for training")
        else:
            if cfg.max_train_per_client is not None and len(c.train) > cfg.max_train_per_client:
                rng = random.Random(f"cap-{cfg.split_seed}-{c.client_id}")
                c.train = rng.sample(c.train, cfg.max_train_per_client)
            training.append(c)
    if not training and for_training:
        raise DataError("no client with training examples is left after choosing held-out clients", cfg.path)
    return FederatedDataset(cfg.source, training, heldout, issues.lines)
