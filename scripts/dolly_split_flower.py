"""Dolly's hand-written Dirichlet split against Flower Datasets' DirichletPartitioner, on the
real Dolly-15k categories, as a Markdown table (docs/data_and_eval.md).

    python scripts/dolly_split_flower.py [../shared/data/dolly-15k/databricks-dolly-15k.jsonl] [seeds]

For each setting (clients, alpha) and split seed 0..seeds-1, both splits are drawn with the same
seed and min_client_size 2 (flexlora's default); the table gives their means over the seeds:
the coefficient of variation of client sizes, the categories a client holds, the categories
holding at least 5% of a client's records, the smallest client, and how many seeds gave the
same split. Needs the hf extra. About two minutes on two busy cores.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np


def stats(labels: list[str], parts: list[list[int]]) -> tuple[float, float, float, int]:
    sizes = np.array([len(p) for p in parts])
    counts = [Counter(labels[i] for i in p) for p in parts]
    held = np.mean([len(c) for c in counts])
    major = np.mean([sum(n >= 0.05 * len(p) for n in c.values()) for c, p in zip(counts, parts)])
    return sizes.std() / sizes.mean(), held, major, int(sizes.min())


def flower_split(labels: list[str], clients: int, alpha: float, seed: int) -> list[list[int]]:
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(clients, partition_by="label", alpha=alpha, min_partition_size=2, seed=seed)
    partitioner.dataset = datasets.Dataset.from_dict({"row": list(range(len(labels))), "label": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [sorted(partitioner.load_partition(i)["row"]) for i in range(clients)]


def main() -> None:
    from flexlora.data.split import dirichlet_split

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/dolly-15k/databricks-dolly-15k.jsonl")
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    labels = [json.loads(line)["category"] for line in path.read_text().splitlines() if line.strip()]
    print(
        "| clients | alpha | split | size CV | categories a client holds | categories with >= 5% | smallest client | same split |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for clients, alpha in [(10, 0.5), (20, 0.5), (20, 0.1)]:
        ours = [dirichlet_split(labels, clients, alpha, seed, 2) for seed in range(seeds)]
        flower = [flower_split(labels, clients, alpha, seed) for seed in range(seeds)]
        same = sum(a == b for a, b in zip(ours, flower))
        for name, splits in (("flexlora (dolly)", ours), ("Flower Datasets", flower)):
            s = np.array([stats(labels, parts) for parts in splits])
            print(
                f"| {clients} | {alpha} | {name} | {s[:, 0].mean():.2f} | {s[:, 1].mean():.2f} | {s[:, 2].mean():.2f} "
                f"| {int(s[:, 3].min())} | {same}/{seeds} |"
            )


if __name__ == "__main__":
    main()
