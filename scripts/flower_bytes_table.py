"""Bytes per client per round of Flower runs, as a Markdown table (docs/flower.md).

    python scripts/flower_bytes_table.py runs/flexlora-float32 runs/fedit-float32 ...

Per run folder (written by `flexlora run --engine flower` or a deployment): one row per rank
type, with the mean over clients and rounds of the bytes Flower serialised down (server ->
client, rounds >= 2: round 1 sends no factors) and up, and the LoRA payload alone.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def rows(run_dir: Path):
    cfg_text = (run_dir / "config.yaml").read_text()
    import yaml

    cfg = yaml.safe_load(cfg_text)
    stats = defaultdict(lambda: defaultdict(list))
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for m in (record.get("clients") or {}).values():
            if "bytes_up" not in m:
                continue
            s = stats[(m["rank_type"], m["max_rank"])]
            s["up"].append(m["bytes_up"])
            s["payload_up"].append(m["payload_bytes_up"])
            if record["round"] >= 2:
                s["down"].append(m["bytes_down"])
                s["payload_down"].append(m["payload_bytes_down"])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    for (rank_type, max_rank), s in sorted(stats.items(), key=lambda kv: kv[0][1]):
        yield (
            cfg["method"],
            cfg.get("flower", {}).get("transport_dtype", "float32"),
            rank_type,
            max_rank,
            mean(s["down"]) / 2**20,
            mean(s["up"]) / 2**20,
            mean(s["payload_down"]) / 2**20,
            mean(s["payload_up"]) / 2**20,
        )


def main(argv: list[str]) -> None:
    print("| method | transport | rank type | max rank | down MiB | up MiB | LoRA payload down MiB | LoRA payload up MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run_dir in argv:
        for method, dtype, rank_type, max_rank, down, up, pdown, pup in rows(Path(run_dir)):
            print(f"| {method} | {dtype} | {rank_type} | {max_rank} | {down:.2f} | {up:.2f} | {pdown:.2f} | {pup:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
