"""The comparison grid's cells and its folder: which runs a grid holds (methods x resource
profiles x seeds), its grid.json (the shared settings, the cells, the baseline and the commands
that filled it) and the finished cells' records.

Every cell is an ordinary run (its own run folder under <out>/cells/) from the same base
config. All cells share the data split and the held-out clients (both seeded by
data.split_seed, not by the run seed), and cells with the same seed sample the same clients
each round and draw the same rank types. A homogeneous method (FedIT) cuts every client to the
smallest rank whatever the profile, so it runs once per seed, under the profile 'homo', and is
the reference ("improvement over homogeneous FedIT") for every profile.
"""

from __future__ import annotations

import fcntl
import re
from dataclasses import dataclass
from pathlib import Path

from flexlora.config import ConfigError, ExperimentConfig
from flexlora.reporting import read_json, read_jsonl, write_json

GRID_FILE = "grid.json"
GRID_LOCK = ".grid.lock"  # held while grid.json is read, merged and written
# Settings a cell sets itself; everything else must match between runs of one grid folder.
CELL_KEYS = ("method", "seed", "resources.profile", "output.dir", "output.name", "output.overwrite")


@dataclass(frozen=True)
class Cell:
    method: str  # a method name, or a variant with arguments of its own: "hetlora:padding=replication"
    profile: str
    seed: int

    @property
    def name(self) -> str:
        return f"{re.sub(r'[:=]', '-', self.method)}-{self.profile}-seed{self.seed}"

    def overrides(self) -> list[str]:
        """The settings this cell sets: its method (and a variant's method_args), profile and seed."""
        name, *arguments = self.method.split(":")
        return [
            f"method={name}",
            *(f"method_args.{argument}" for argument in arguments),
            f"resources.profile={self.profile}",
            f"seed={self.seed}",
        ]


def check_method_spec(spec: str) -> None:
    """A grid method is NAME or NAME:KEY=VALUE[:KEY=VALUE...], the second a variant of the method
    with those method_args, in cells of its own (e.g. hetlora:padding=replication)."""
    name, *arguments = spec.split(":")
    if not name or any(not re.fullmatch(r"[A-Za-z_]\w*=.+", a) for a in arguments):
        raise ConfigError(f"--methods: '{spec}' is not NAME or NAME:KEY=VALUE (e.g. hetlora:padding=replication)")


def plain_method(spec: str) -> str:
    """The method a grid method names: "hetlora" for the variant "hetlora:padding=replication"."""
    return spec.split(":")[0]


def is_homogeneous(method: str) -> bool:
    from flexlora.methods import METHODS

    # A grid folder may list a method this version lacks (cells added by a newer version).
    return bool(getattr(METHODS.get(plain_method(method)), "homogeneous", False))


def grid_cells(methods: list[str], profiles: list[str], seeds: list[int]) -> list[Cell]:
    """Seed-major order, so that a partial grid already compares every method on seed 0."""
    cells: list[Cell] = []
    for seed in seeds:
        for method in methods:
            for profile in ["homo"] if is_homogeneous(method) else profiles:
                cell = Cell(method, profile, seed)
                if cell not in cells:
                    cells.append(cell)
    return cells


def base_settings(cfg: ExperimentConfig) -> dict:
    """The grid's shared settings: the config without what each cell sets itself."""
    tree = cfg.to_dict()
    for key in CELL_KEYS:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    return tree


def _first_difference(a, b, prefix=""):
    """First setting that differs; keys only one side has are ignored (a newer version of the
    package may add settings whose defaults keep the old behaviour)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) & set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return prefix.rstrip(".") if a != b else None


def register_cells(out: Path, settings: dict, cells: list[Cell], baseline: str | None, command: str | None) -> None:
    """Add `cells` (and the command) to the grid file of `out`, creating it; ConfigError if the
    folder holds a grid with other settings. Two processes may add cells to one folder at once
    (a stage split over two cores): an exclusive lock around the read-merge-write keeps the
    second from writing back what it read before the first wrote."""
    grid_path = out / GRID_FILE
    out.mkdir(parents=True, exist_ok=True)
    with open(out / GRID_LOCK, "a") as lock:  # the lock goes with the file's closing
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if grid_path.is_file():
            stored = read_json(grid_path)
            diff = _first_difference(stored["settings"], settings)
            if diff:
                raise ConfigError(f"compare: {out} holds a grid run with other settings ({diff} differs); use another --out")
            known = [Cell(**c) for c in stored["cells"]]
            cells_all = known + [c for c in cells if c not in known]
            commands = stored.get("commands", [])
        else:
            cells_all, commands = cells, []
        if command and command not in commands:
            commands.append(command)
        write_json(
            grid_path,
            {"settings": settings, "cells": [c.__dict__ for c in cells_all], "baseline": baseline, "commands": commands},
        )


def load_cells(out: Path) -> tuple[dict, list[dict]]:
    """grid.json, and {cell, summary, history} of every finished cell (one with a summary.json)."""
    grid_path = out / GRID_FILE
    if not grid_path.is_file():
        raise ConfigError(f"compare: {out} is not a compare grid folder (no {GRID_FILE})")
    grid = read_json(grid_path)
    missing = [key for key in ("settings", "cells") if not isinstance(grid, dict) or key not in grid]
    if missing:
        raise ConfigError(f"{grid_path}: not a compare grid file (no {', '.join(map(repr, missing))})")
    rows = []
    for c in grid["cells"]:
        try:
            cell = Cell(**c)
        except TypeError:
            raise ConfigError(f"{grid_path}: a cell is not {{method, profile, seed}}: {c!r}") from None
        run_dir = out / "cells" / cell.name
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            continue
        rows.append({"cell": cell, "summary": read_json(summary_path), "history": read_jsonl(run_dir / "metrics.jsonl")})
    return grid, rows
