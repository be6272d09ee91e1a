"""Partitioning: a seeded Dirichlet split over categories, and the choice of held-out clients.

Both are seeded by `data.split_seed`, not by the run's seed, so every run of a comparison
(any method, resource profile or seed) sees the same clients and the same held-out set.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

import numpy as np

from flexlora.data.types import ClientData, DataError
from flexlora.errors import ConfigError

_TASK_SUFFIX = re.compile(r"\s+\d+\.json$")


def task_category(label: str) -> str:
    """NI labels a client 'Program Execution 1001.json' (category + task file); the category
    is the part before the task file's number."""
    return _TASK_SUFFIX.sub("", label).strip()


def dirichlet_split(
    labels: list[str], num_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 1000
) -> list[list[int]]:
    """Indices of `labels` split into `num_clients` parts: for each category, the share each
    client gets is drawn from Dirichlet(alpha, ..., alpha). Every index lands in exactly one
    part. Small alpha concentrates each category on few clients (so each client sees few
    categories); large alpha approaches an even, IID-like split. Redrawn (seeded) until every
    client has at least `min_size` indices."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if len(labels) < num_clients * min_size:
        raise DataError(
            f"{len(labels)} records cannot give {num_clients} clients {min_size} each; "
            "lower data.num_clients or data.min_client_size"
        )
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_category[label].append(i)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for category in sorted(by_category):
            idx = np.array(by_category[category])
            rng.shuffle(idx)
            shares = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split in {max_tries} draws gave all {num_clients} clients "
        f">= {min_size} records; raise data.dirichlet_alpha or lower data.num_clients"
    )


def select_heldout(
    clients: list[ClientData],
    *,
    ids: list | None,
    fraction: float | None,
    categories: list[str] | None,
    seed: int,
    marked: set[str] = frozenset(),
    for_training: bool = True,
) -> set[str]:
    """Ids of the held-out clients: the union of explicit ids, whole categories (matched
    case-insensitively, with or without NI's task-file suffix), a seeded fraction of the
    remaining clients, and clients the source itself marks as held out."""
    known = {c.client_id for c in clients}
    chosen = {cid for cid in marked if cid in known}
    for raw in ids or []:
        cid = str(raw)
        if cid not in known:
            sample = ", ".join(sorted(known, key=_natural)[:8])
            raise ConfigError(f"data.heldout_ids: no client with id '{cid}' in the data (ids include: {sample}, ...)")
        chosen.add(cid)
    if categories:
        by_name: dict[str, set[str]] = defaultdict(set)
        for c in clients:
            by_name[task_category(c.category).lower()].add(c.client_id)
            by_name[c.category.lower()].add(c.client_id)
        for name in categories:
            if name.lower() not in by_name:
                sample = ", ".join(sorted({task_category(c.category) for c in clients})[:8])
                raise ConfigError(f"data.heldout_categories: no client of category '{name}' (categories include: {sample}, ...)")
            chosen |= by_name[name.lower()]
    if fraction:
        rest = sorted(known - chosen, key=_natural)
        count = min(len(rest), max(1, round(fraction * len(known))))
        chosen |= set(random.Random(f"heldout-{seed}").sample(rest, count))
    if for_training and chosen and chosen == known:
        raise ConfigError("data: every client is held out; nothing is left to train on")
    return chosen


def _natural(cid: str):
    """Sort '2' before '10' when ids are numbers."""
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)
