"""Data sources by name, in a registry: each returns a FederatedDataset (training clients +
held-out clients).

- synthetic: built-in string tasks (no files).
- natural-instructions: the FlexLoRA paper's per-client folder (one NI task per client).
- dolly: databricks-dolly-15k JSONL, Dirichlet split over categories + a held-out test split.
- json: generic JSON/JSONL instruction records, grouped by a client field or Dirichlet-split.
- hf: a Hugging Face dataset (local files, a save_to_disk folder, a Hub id), split into clients by
  a Flower Datasets partitioner (flexlora.data.hf).

A source is one registration (``register_source``): its loader, whether it reads data.path,
and its own config rules; flexlora.config's checks and ``load_federated_dataset`` both go
through the registry, so a registered source is usable from a config at once.

Held-out clients (data.heldout_ids / heldout_fraction / heldout_categories) are chosen here,
with data.split_seed, and never reach the training pool: FederatedDataset refuses any overlap.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexlora.data.records import Issues
from flexlora.data.split import select_heldout
from flexlora.data.types import ClientData, FederatedDataset
from flexlora.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the data layer does not import the configuration
    from flexlora.schema import DataConfig

log = logging.getLogger(__name__)

Loader = Callable[["DataConfig", int, bool], FederatedDataset]  # (data config, seed, for_training)


@dataclass(frozen=True)
class DataSource:
    """A registered data source. ``load(cfg, seed, for_training)`` builds its dataset
    (``for_training=False``, evaluation only: every client may be held out); ``needs_path``:
    it reads data.path, which must then be given (and, checked by flexlora.config, exist);
    ``check(cfg)``: its own config rules, a one-line ConfigError naming the key."""

    name: str
    load: Loader
    needs_path: bool = True
    check: Callable[[DataConfig], None] | None = None


SOURCES: dict[str, DataSource] = {}


def register_source(name: str, *, needs_path: bool = True, check: Callable[[DataConfig], None] | None = None):
    """Register the decorated loader as data source `name` (see DataSource)."""

    def register(load: Loader) -> Loader:
        if name in SOURCES and SOURCES[name].load is not load:
            raise ValueError(f"data source {name!r} is already registered")
        SOURCES[name] = DataSource(name, load, needs_path, check)
        return load

    return register


def check_source(cfg: DataConfig) -> DataSource:
    """The registered source of `cfg`, after the checks that need no file system: a known name,
    data.path given when the source reads it, the source's own rules (one-line ConfigErrors)."""
    source = SOURCES.get(cfg.source)
    if source is None:
        raise ConfigError(f"data.source: unknown data source '{cfg.source}'; choose from: {', '.join(SOURCES)}")
    if source.needs_path and cfg.path is None:
        raise ConfigError(f"data.path: data.source={cfg.source} needs data.path (a folder or file)")
    if source.check is not None:
        source.check(cfg)
    return source


def load_federated_dataset(cfg: DataConfig, seed: int, for_training: bool = True) -> FederatedDataset:
    """`for_training=False` (evaluation only): every client may be held out."""
    return check_source(cfg).load(cfg, seed, for_training)


# ---------------------------------------------------------------- the built-in sources


@register_source("synthetic", needs_path=False)
def _synthetic(cfg: DataConfig, seed: int, for_training: bool) -> FederatedDataset:
    from flexlora.data.synthetic import make_federation

    kwargs = {} if cfg.heldout_tasks is None else {"heldout_tasks": cfg.heldout_tasks}
    return make_federation(
        num_clients=cfg.num_clients,
        train_per_client=cfg.train_per_client,
        test_per_client=cfg.test_per_client,
        seed=seed,
        **kwargs,
    )


@register_source("natural-instructions")
def _natural_instructions(cfg: DataConfig, seed: int, for_training: bool) -> FederatedDataset:
    from flexlora.data.natural_instructions import load_clients

    issues = Issues(cfg.bad_records)
    clients, marked = load_clients(cfg.path, issues, cfg.weight_by)
    return _summarised(assemble(cfg, clients, issues, marked, for_training=for_training), issues)


def _no_source_weights(cfg: DataConfig) -> None:
    if cfg.weight_by == "source":
        raise ConfigError(f"data.weight_by: 'source' needs a natural-instructions clients.json, not data.source={cfg.source}")


@register_source("dolly", check=_no_source_weights)
def _dolly(cfg: DataConfig, seed: int, for_training: bool) -> FederatedDataset:
    return _instruction_records(cfg, for_training, dolly=True)


@register_source("json", check=_no_source_weights)
def _json(cfg: DataConfig, seed: int, for_training: bool) -> FederatedDataset:
    return _instruction_records(cfg, for_training, dolly=False)


def _check_hf(cfg: DataConfig) -> None:
    from flexlora.data.hf import check_config

    _no_source_weights(cfg)
    check_config(cfg)


@register_source("hf", needs_path=False, check=_check_hf)  # data.path may be a Hub id: checked by check_config
def _hf(cfg: DataConfig, seed: int, for_training: bool) -> FederatedDataset:
    from flexlora.data.hf import load_clients

    issues = Issues(cfg.bad_records)
    clients, test_clients = load_clients(cfg, issues)
    return _summarised(assemble(cfg, clients, issues, extra_heldout=test_clients, for_training=for_training), issues)


def _instruction_records(cfg: DataConfig, for_training: bool, dolly: bool) -> FederatedDataset:
    from flexlora.data.instructions import load_records

    issues = Issues(cfg.bad_records)
    clients, test_clients = load_records(cfg, issues, dolly=dolly)
    return _summarised(assemble(cfg, clients, issues, extra_heldout=test_clients, for_training=for_training), issues)


def _summarised(dataset: FederatedDataset, issues: Issues) -> FederatedDataset:
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
        raise issues.error("no client with training examples is left after choosing held-out clients", cfg.path)
    return FederatedDataset(cfg.source, training, heldout, issues.lines)
