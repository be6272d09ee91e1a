"""Record-based sources: Dolly-15k style JSONL and generic JSON/JSONL instruction files.

Records are {instruction, input|context, output|response, category?, client?}. A test split
(a file of records, or a seeded number per category) is taken out first and never trained on;
the rest is grouped by the record's client field, or split over `data.num_clients` clients by
a seeded Dirichlet(alpha) over categories.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from flexlora.data.records import Issues, Record, read_records, report, to_example
from flexlora.data.split import dirichlet_split
from flexlora.data.types import ClientData, DataError, Example

if TYPE_CHECKING:  # annotations only: the data layer does not import the configuration
    from flexlora.schema import DataConfig

DOLLY_FILE = "databricks-dolly-15k.jsonl"


def record_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in suffixes and p.is_file())
    if not files:
        raise DataError(f"no {' or '.join(suffixes)} files in the folder", str(path))
    return files


def _key(ex: Example) -> tuple[str, str, str]:
    return (ex.instruction.strip(), ex.input.strip(), ex.output.strip())


def load_records(cfg: DataConfig, issues: Issues, dolly: bool) -> tuple[list[ClientData], list[ClientData]]:
    """(training-pool clients, test-split clients (one per category))."""
    if dolly:
        path = Path(cfg.path).expanduser()
        files = [path / DOLLY_FILE] if path.is_dir() and (path / DOLLY_FILE).is_file() else record_files(path, (".jsonl",))
    else:
        files = record_files(cfg.path, (".json", ".jsonl"))
    pool: list[tuple[Record, Example]] = []
    for file in files:
        for record in read_records(file, issues):
            ex = to_example(record, issues)
            if ex is not None:
                pool.append((record, ex))
    if not pool:
        raise issues.error("no usable instruction records", cfg.path)

    test = None
    if cfg.test_path is not None:
        test = [ex for r in read_records(Path(cfg.test_path).expanduser(), issues) if (ex := to_example(r, issues))]
        if not test:
            raise issues.error("no usable test records", cfg.test_path)
    kept, test_clients = split_off_test(cfg, [ex for _, ex in pool], test)
    pool = [pool[i] for i in kept]

    field = cfg.client_field
    has_client = [isinstance(r.data, dict) and field in r.data for r, _ in pool]
    if not dolly and any(has_client):
        clients: dict[str, list[Example]] = defaultdict(list)
        for (record, ex), has in zip(pool, has_client):
            if not has:
                report(issues, record, f"missing field '{field}' (other records name their client)")
                continue
            clients[str(record.data[field])].append(ex)
        out = [ClientData(cid, main_category(exs), exs) for cid, exs in sorted(clients.items())]
    else:
        parts = dirichlet_split(
            [ex.category for _, ex in pool], cfg.num_clients, cfg.dirichlet_alpha, cfg.split_seed, cfg.min_client_size
        )
        out = []
        for i, idx in enumerate(parts):
            exs = [pool[j][1] for j in idx]
            out.append(ClientData(str(i), main_category(exs), exs))
    return out, test_clients


def split_off_test(cfg: DataConfig, pool: list[Example], test: list[Example] | None) -> tuple[list[int], list[ClientData]]:
    """The test split, taken out before any client is formed so that no test record can reach a
    training client: (indices of `pool` left for training, one held-out client per category).
    `test`: data.test_path's examples, and every pool example equal to one leaves the pool;
    None: data.test_per_category examples of each category, drawn with data.split_seed (one
    example of each category always stays in the pool)."""
    if test is not None:
        keys = {_key(ex) for ex in test}
        kept = [i for i, ex in enumerate(pool) if _key(ex) not in keys]
    else:
        rng = random.Random(f"test-split-{cfg.split_seed}")
        by_category: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(pool):
            by_category[ex.category].append(i)
        taken = set()
        for category in sorted(by_category):
            idx = by_category[category]
            taken |= set(rng.sample(idx, min(cfg.test_per_category, len(idx) - 1)))
        test = [pool[i] for i in sorted(taken)]
        kept = [i for i in range(len(pool)) if i not in taken]
    grouped: dict[str, list[Example]] = defaultdict(list)
    for ex in test:
        grouped[ex.category].append(ex)
    test_clients = [ClientData(f"test:{category or 'all'}", category, [], test=grouped[category]) for category in sorted(grouped)]
    return kept, test_clients


def main_category(examples: list[Example]) -> str:
    """A client's category: its most frequent one (Dirichlet clients mix several)."""
    counts: dict[str, int] = defaultdict(int)
    for ex in examples:
        counts[ex.category] += 1
    return max(sorted(counts), key=counts.get) if counts else ""
