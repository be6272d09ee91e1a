"""Where Flower's own processes sleep during a loopback deployment (`flexlora bench deployment
--trace-waits`): this folder goes first on PYTHONPATH of every process the bench starts, so that
Python imports its `sitecustomize` at start-up, which records two of Flower 1.41's waits, with
their start and length, to `$FLEXLORA_WAITS_DIR/<pid>.jsonl`:

- "supernode idle": the SuperNode's loop (flwr/supernode/start_client_internal.py) sleeps 3 s
  whenever a pull for a new message found none; a task pushed meanwhile waits for the end of it;
- "object-pull backoff": a pull of an object not uploaded yet (the sender registers a Message
  before it uploads its objects) is retried after 1, 2, 4 ... s, at most 10
  (flwr/supercore/inflatable/inflatable_utils.py, PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP).

Nothing else changes: the waits happen exactly as they would. `read_waits` sums them over a
window of wall-clock time.
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).parent
ENV = "FLEXLORA_WAITS_DIR"


def read_waits(directory: Path) -> list[dict]:
    """Every wait recorded: {"kind", "start", "seconds", "pid"}."""
    waits = []
    for path in Path(directory).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                waits.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a process stopped mid-write
    return waits


def waits_in(waits: list[dict], start: float, end: float) -> dict[str, float]:
    """Seconds of each kind of wait that overlap [start, end]."""
    out: dict[str, float] = {}
    for w in waits:
        overlap = min(end, w["start"] + w["seconds"]) - max(start, w["start"])
        if overlap > 0:
            out[w["kind"]] = out.get(w["kind"], 0.0) + overlap
    return out
