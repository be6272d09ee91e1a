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

With `FLEXLORA_WAITS_SHORT_S` also set (the bench's engine `short-waits+workers`), each of these
two waits lasts at most that many seconds: a counterfactual that measures what Flower's waits
cost a round, not a setting (the SuperNode then polls the SuperLink that often).
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).parent
ENV = "FLEXLORA_WAITS_DIR"
SHORT_ENV = "FLEXLORA_WAITS_SHORT_S"


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


def waits_in(waits: list[dict], start: float, end: float, pushed_at: float | None = None) -> dict[str, float]:
    """What Flower's waits cost a round [start, end] (wall-clock seconds, time.time()):

    - "supernode idle": how long the round's tasks, pushed at `pushed_at`, waited for a
      SuperNode's idle sleep to end (the longest over SuperNodes: the sleep in progress at the
      push; 0 where none was); without `pushed_at`, the idle sleeps' seconds in the window;
    - "object-pull backoff": the seconds during which at least one object pull of any process
      was backing off (their union: pulls back off side by side in threads)."""
    out: dict[str, float] = {}
    idle = [w for w in waits if w["kind"] == "supernode idle"]
    if pushed_at is not None:
        by_node: dict[int, float] = {}
        for w in idle:
            if w["start"] <= pushed_at < w["start"] + w["seconds"]:
                by_node[w["pid"]] = w["start"] + w["seconds"] - pushed_at
        out["supernode idle"] = max(by_node.values(), default=0.0)
    else:
        out["supernode idle"] = sum(max(0.0, min(end, w["start"] + w["seconds"]) - max(start, w["start"])) for w in idle)
    spans = sorted(
        (max(start, w["start"]), min(end, w["start"] + w["seconds"]))
        for w in waits
        if w["kind"] == "object-pull backoff" and min(end, w["start"] + w["seconds"]) > max(start, w["start"])
    )
    covered, reach = 0.0, float("-inf")
    for a, b in spans:  # the union's length
        if b > reach:
            covered += b - max(a, reach)
            reach = b
    out["object-pull backoff"] = covered
    return out
