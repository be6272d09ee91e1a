"""Natural Instructions in the FlexLoRA paper's per-client layout.

A folder of `local_training_<id>.json`, `local_eval_<id>.json` and `local_test_<id>.json`
(each a JSON list of {"instruction", "input", "output", "category"}), one NI task per client.
Ids are whatever the folder holds (not contiguous; a client may lack a file). An optional
`clients.json` maps id -> {"category", "train_examples_in_source", "holdout"}: the source's
training-set sizes (the paper's aggregation weights when the folder holds a capped sample)
and clients the source keeps aside for evaluation.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from flexlora.data.records import Issues, read_records, to_example
from flexlora.data.types import ClientData, DataError

FILE = re.compile(r"^local_(training|eval|test)_(\d+)\.json$")
SPLITS = {"training": "train", "eval": "eval", "test": "test"}


def read_clients_json(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", str(path), e.lineno) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError("expected an object of client id -> {category, train_examples_in_source, holdout}", str(path))
    for cid, info in data.items():
        size = info.get("train_examples_in_source")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise DataError(f"client {cid}: train_examples_in_source must be a non-negative integer, got {size!r}", str(path))
    return {str(k): v for k, v in data.items()}


def load_clients(folder: str | Path, issues: Issues, weight_by: str = "auto") -> tuple[list[ClientData], set[str]]:
    """(clients in id order, ids the folder's clients.json marks as held out)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError("not a folder (data.source=natural-instructions expects the per-client folder)", str(folder))
    files: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in folder.iterdir():
        match = FILE.match(path.name)
        if match:
            files[match.group(2)][SPLITS[match.group(1)]] = path
    if not files:
        raise DataError("no local_training_<id>.json / local_test_<id>.json files", str(folder))
    meta_path = folder / "clients.json"
    meta = read_clients_json(meta_path) if meta_path.is_file() else {}
    if weight_by == "source" and not meta:
        raise DataError("data.weight_by=source needs a clients.json with train_examples_in_source", str(folder))
    use_source = weight_by == "source" or (weight_by == "auto" and bool(meta))

    clients = []
    for cid in sorted(files, key=int):
        splits = {}
        for split in ("train", "eval", "test"):
            path = files[cid].get(split)
            records = read_records(path, issues) if path else []
            splits[split] = [ex for ex in (to_example(r, issues) for r in records) if ex is not None]
        info = meta.get(cid, {})
        label = info.get("category") or next((ex.category for s in splits.values() for ex in s if ex.category), "")
        weight = None
        if use_source:
            weight = info.get("train_examples_in_source")
            if weight is None:
                issues.note(f"{meta_path}: client {cid} has no train_examples_in_source; weighted by its local size")
        if not any(splits.values()):
            issues.note(f"{folder}: client {cid} has no usable examples; dropped")
            continue
        clients.append(ClientData(cid, label, splits["train"], splits["test"], splits["eval"], weight))
    marked = {cid for cid, info in meta.items() if info.get("holdout")}
    return clients, marked
