"""data.source=hf: a Hugging Face dataset, split into clients by a Flower Datasets partitioner.

The table comes through the `datasets` library: a local JSON, JSONL, CSV or Parquet file, a
folder of such files, a folder written by `save_to_disk`, or a Hub id (where the Hub can be
reached). A column mapping (a preset for FlowerTune's LLM datasets, or data.hf_columns) turns
each row into an instruction example; a bad row is reported by file and row and skipped (or
stops the run, per data.bad_records). The test split comes out first, as for Dolly
(data.test_path or data.test_per_category). The rest is shuffled with data.split_seed, as
Flower Datasets' FederatedDataset shuffles before partitioning (with data.split_seed=42, its
default seed, the clients are FlowerTune's), and handed to the partitioner: IidPartitioner,
DirichletPartitioner over a column, or NaturalIdPartitioner (one client per value of a column).

`datasets` and `flwr_datasets` are the `hf` extra: imported only when this source loads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from flexlora.data.instructions import main_category, split_off_test
from flexlora.data.records import Issues
from flexlora.data.types import ClientData, DataError, Example
from flexlora.errors import ConfigError
from flexlora.extras import require

if TYPE_CHECKING:  # annotations only: the data layer does not import the configuration
    from flexlora.schema import DataConfig

ROLES = ("instruction", "input", "output", "category")
REQUIRED = ("instruction", "output")

# Column layouts: role -> column. A preset's input and category are used where the table has
# them; its instruction and output must be there.
_ALPACA = {"instruction": "instruction", "input": "input", "output": "output", "category": "category"}
# medalpaca's flashcards hold the question in `input` under one constant instruction ("Answer
# this question truthfully"); FlowerTune's medical app drops that instruction and asks `input`.
_FLASHCARDS = {"instruction": "input", "output": "output"}
PRESETS: dict[str, dict[str, str]] = {
    "alpaca": _ALPACA,
    "dolly": {"instruction": "instruction", "input": "context", "output": "response", "category": "category"},
    "medical-flashcards": _FLASHCARDS,
    # FlowerTune LLM leaderboard's challenges, by name
    "general-nlp": _ALPACA,
    "finance": _ALPACA,
    "code": _ALPACA,
    "medical": _FLASHCARDS,
}
# Hub ids whose layout is known: their preset applies when data.hf_preset is null.
HUB_PRESETS = {
    "vicgalle/alpaca-gpt4": "alpaca",
    "flwrlabs/alpaca-gpt4": "alpaca",
    "FinGPT/fingpt-sentiment-train": "alpaca",
    "flwrlabs/fingpt-sentiment-train": "alpaca",
    "flwrlabs/code-alpaca-20k": "alpaca",
    "medalpaca/medical_meadow_medical_flashcards": "medical-flashcards",
    "flwrlabs/medical-meadow-medical-flashcards": "medical-flashcards",
    "databricks/databricks-dolly-15k": "dolly",
}
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# ---------------------------------------------------------------- configuration


def is_local(path: str) -> bool:
    """A path on this machine, or one meant to be (anything but an `owner/name` Hub id)."""
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or p.suffix in FILE_FORMATS or path.count("/") > 1


def check_config(cfg: DataConfig) -> None:
    """data.source=hf's rules that need no data (one-line ConfigErrors naming the key)."""
    require("datasets", "data.source=hf")
    require("flwr_datasets", "data.source=hf")
    if cfg.path is None:
        raise ConfigError("data.path: data.source=hf needs data.path (a file, a folder or a Hugging Face Hub id)")
    if is_local(cfg.path) and not Path(cfg.path).expanduser().exists():
        raise ConfigError(f"data.path: not found: {cfg.path}")
    if cfg.hf_preset is not None and cfg.hf_preset not in PRESETS:
        raise ConfigError(f"data.hf_preset: unknown preset '{cfg.hf_preset}'; choose from: {', '.join(PRESETS)}")
    for role, column in cfg.hf_columns.items():
        if role not in ROLES:
            raise ConfigError(f"data.hf_columns: unknown role '{role}'; choose from: {', '.join(ROLES)}")
        if role in REQUIRED and not column:
            raise ConfigError(f"data.hf_columns.{role}: every example needs an {role} column, got {column!r}")


def column_mapping(cfg: DataConfig, columns: list[str], where: str) -> dict[str, str]:
    """role -> column of this table: data.hf_columns over the preset (data.hf_preset, else the
    Hub id's, else alpaca). A column that data.hf_columns names, or a required one, must exist."""
    preset = cfg.hf_preset or HUB_PRESETS.get(str(cfg.path), "alpaca")
    mapping = {}
    for role in ROLES:
        explicit = role in cfg.hf_columns
        column = cfg.hf_columns[role] if explicit else PRESETS[preset].get(role)
        if not column:
            continue
        if column in columns:
            mapping[role] = column
        elif explicit or role in REQUIRED:
            key = f"data.hf_columns.{role}" if explicit else f"data.hf_preset={preset}"
            raise DataError(f"{key}: no column '{column}' (columns: {', '.join(columns)}); set data.hf_columns.{role}", where)
    return mapping


# ---------------------------------------------------------------- loading the table


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from `datasets` while loading: flexlora logs what it
    loaded, and a file that cannot be read is one DataError (the library logs it first)."""
    import datasets

    was_disabled, level = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not was_disabled:
            datasets.enable_progress_bars()


def load_table(path: str, cfg: DataConfig):
    """The `datasets.Dataset` at `path` (file, folder, save_to_disk folder or Hub id): one
    DataError naming the file or id when it cannot be read."""
    import datasets

    local = Path(path).expanduser()
    try:
        with _quiet_datasets():
            if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
                table = datasets.load_from_disk(str(local))
            elif local.is_file():
                if local.suffix not in FILE_FORMATS:
                    raise DataError(f"unknown file type '{local.suffix}'; data.source=hf reads {', '.join(FILE_FORMATS)}", path)
                table = datasets.load_dataset(FILE_FORMATS[local.suffix], data_files=str(local), split="train")
            elif local.is_dir():
                table = datasets.load_dataset(str(local), split=cfg.hf_split)
            else:
                table = _from_hub(path, cfg)
    except DataError:
        raise
    except Exception as e:  # the library's errors are many and nested: name the file, keep the cause
        hint = " (data.source=json reads JSON line by line and names a bad line)" if local.suffix in (".json", ".jsonl") else ""
        raise DataError(f"cannot be read by the datasets library: {_first_line(e)}{hint}", path) from None
    if isinstance(table, datasets.DatasetDict):
        if cfg.hf_split not in table:
            raise DataError(f"data.hf_split: no split '{cfg.hf_split}' (splits: {', '.join(table)})", path)
        table = table[cfg.hf_split]
    return table


def _from_hub(name: str, cfg: DataConfig):
    import datasets

    try:
        return datasets.load_dataset(name, name=cfg.hf_subset, split=cfg.hf_split)
    except (ConnectionError, FileNotFoundError) as e:  # offline, unreachable, or no such dataset
        raise DataError(
            f"data.path: '{name}' is no local file or folder, and the Hugging Face Hub could not be reached "
            f"or has no dataset of that id ({_first_line(e)})"
        ) from None


def _first_line(error: BaseException) -> str:
    """The first line of the innermost cause: `datasets` wraps a parser's error in its own
    ("An error occurred while generating the dataset")."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------- rows -> examples


def _text(value) -> str | None:
    """A cell as text: numbers and booleans (typed columns, e.g. a label) become text; missing
    cells are None; anything else (a list, a mapping) is not an instruction's text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    raise TypeError(type(value).__name__)


def table_examples(table, mapping: dict[str, str], where: str, issues: Issues, extra: str | None = None, need_extra=False):
    """(row numbers kept, their Examples, their `extra` column's values as text): a row with a
    missing or empty instruction or output (or `extra`, if `need_extra`), or a cell that is not
    text, is reported as `where: row N: reason` and skipped (data.bad_records=skip) or stops the
    run."""
    wanted = dict(mapping)
    if extra is not None:
        wanted["extra"] = extra
    required = REQUIRED + (("extra",) if need_extra else ())
    cells = {role: list(table[column]) for role, column in wanted.items()}
    rows, examples, extras = [], [], []
    for i in range(table.num_rows):
        values = {}
        try:
            for role, column in wanted.items():
                try:
                    values[role] = _text(cells[role][i])
                except TypeError as kind:
                    raise ValueError(f"column '{column}' holds a {kind}, expected text") from None
                if role in required and not (values[role] or "").strip():
                    raise ValueError(f"empty column '{column}'")
        except ValueError as bad:
            issues.bad_record(f"row {i + 1}: {bad}", where, None)
            continue
        rows.append(i)
        examples.append(Example(values["instruction"], values.get("input") or "", values["output"], values.get("category") or ""))
        extras.append(values.get("extra"))
    return rows, examples, extras


# ---------------------------------------------------------------- partitioning


def partition(cfg: DataConfig, labels: list[str | None]) -> list[tuple[str, list[int]]]:
    """(client id, indices into `labels`) per client, from Flower Datasets' partitioner
    data.hf_partitioner. `labels`: each example's data.hf_partition_by value (None for iid)."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    kind, n = cfg.hf_partitioner, len(labels)
    if kind != "natural-id" and n < cfg.num_clients * cfg.min_client_size:
        raise DataError(
            f"data.num_clients: {n} records cannot give {cfg.num_clients} clients {cfg.min_client_size} each "
            f"(data.hf_partitioner={kind}); lower data.num_clients or data.min_client_size",
            str(cfg.path),
        )
    columns = {"row": list(range(n))} | ({} if kind == "iid" else {"label": labels})
    # FederatedDataset shuffles before it partitions: IID shards are then random, and which
    # records of a class the Dirichlet split gives each client does not follow the file's order.
    with _quiet_datasets():
        table = datasets.Dataset.from_dict(columns).shuffle(seed=cfg.split_seed)
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=cfg.num_clients)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=cfg.num_clients,
            partition_by="label",
            alpha=float(cfg.dirichlet_alpha),
            min_partition_size=cfg.min_client_size,
            seed=cfg.split_seed,
        )
    else:
        partitioner = NaturalIdPartitioner(partition_by="label")
    partitioner.dataset = table
    try:
        with warnings.catch_warnings(), _quiet_natural_id():
            warnings.simplefilter("ignore")  # Flower warns on every Dirichlet redraw; failure is reported below
            parts = [sorted(partitioner.load_partition(i)["row"]) for i in range(partitioner.num_partitions)]
    except ValueError as e:
        reason = (
            f"no Dirichlet(alpha={cfg.dirichlet_alpha:g}) split in Flower Datasets' 10 draws gave all {cfg.num_clients} "
            f"clients >= {cfg.min_client_size} records; raise data.dirichlet_alpha or lower data.num_clients or data.min_client_size"
            if kind == "dirichlet"
            else _first_line(e)
        )
        raise DataError(f"data.hf_partitioner={kind}: {reason}", str(cfg.path)) from None
    if kind == "natural-id":
        return [(partitioner.partition_id_to_natural_id[i], part) for i, part in enumerate(parts)]
    for i, part in enumerate(parts):
        if len(part) < cfg.min_client_size:  # Dirichlet redraws until none is; an IID shard can be
            raise DataError(
                f"data.hf_partitioner={kind}: client {i} got {len(part)} records, fewer than data.min_client_size "
                f"({cfg.min_client_size}); lower data.num_clients",
                str(cfg.path),
            )
    return [(str(i), part) for i, part in enumerate(parts)]


@contextmanager
def _quiet_natural_id() -> Iterator[None]:
    """NaturalIdPartitioner draws a tqdm bar over every row (and offers no switch); this module's
    `tqdm`, disabled, while it partitions."""
    from functools import partial

    from flwr_datasets.partitioner import natural_id_partitioner as module

    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


# ---------------------------------------------------------------- the source


def load_clients(cfg: DataConfig, issues: Issues) -> tuple[list[ClientData], list[ClientData]]:
    """(training-pool clients, test-split clients (one per category))."""
    where = str(cfg.path)
    table = load_table(cfg.path, cfg)
    mapping = column_mapping(cfg, table.column_names, where)
    by = None
    if cfg.hf_partitioner != "iid":
        by = cfg.hf_partition_by or mapping.get("category")
        if by is None:
            raise DataError(
                f"data.hf_partition_by: data.hf_partitioner={cfg.hf_partitioner} needs a column to split over "
                f"and the data has no category column (columns: {', '.join(table.column_names)})",
                where,
            )
        if by not in table.column_names:
            raise DataError(f"data.hf_partition_by: no column '{by}' (columns: {', '.join(table.column_names)})", where)
    # natural-id: a row without a value has no client; Dirichlet: a missing value is a class of its own
    need = cfg.hf_partitioner == "natural-id"
    _, pool, labels = table_examples(table, mapping, where, issues, extra=by, need_extra=need)
    labels = [label or "" for label in labels]
    if not pool:
        raise issues.error("no usable instruction records", where)

    test = None
    if cfg.test_path is not None:
        test_table = load_table(cfg.test_path, cfg)
        _, test, _ = table_examples(
            test_table, column_mapping(cfg, test_table.column_names, cfg.test_path), cfg.test_path, issues
        )
        if not test:
            raise DataError("no usable test records", cfg.test_path)
    kept, test_clients = split_off_test(cfg, pool, test)
    pool, labels = [pool[i] for i in kept], [labels[i] for i in kept]

    clients = []
    for client_id, part in partition(cfg, labels):
        examples = [pool[i] for i in part]
        clients.append(ClientData(client_id, main_category(examples), examples))
    return clients, test_clients
