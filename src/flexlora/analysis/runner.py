"""`flexlora compare`: run a grid's missing cells, one ordinary run each, then write its report.

A cell is done once its summary.json exists, so an interrupted grid resumes cell by cell (an
interrupted cell from its last round checkpoint), and cells can be added later (a new method,
more seeds) to the same folder. Two processes may fill one folder at once: each skips a cell
the other is running or has finished. The base model is evaluated once per grid
(zero_shot.json): held-out clients and greedy decoding do not depend on the seed.
"""

from __future__ import annotations

import shlex
import sys
import time
import traceback
from pathlib import Path

from flexlora.analysis.cells import CELL_KEYS, Cell, base_settings, check_method_spec, grid_cells, register_cells
from flexlora.analysis.report import write_report
from flexlora.config import ConfigError, load_config
from flexlora.reporting import read_json, read_jsonl, write_json
from flexlora.runlock import RunLock


def run_grid(
    out_dir: str | Path,
    methods: list[str],
    profiles: list[str],
    seeds: list[int],
    config_path: str | None = None,
    overrides: list[str] = (),
    baseline: str | None = "fedit",
    command: str | None = None,
    echo=print,
) -> Path:
    """Run every missing cell, then write the report; returns the report's Markdown path."""
    from flexlora.engines import run_experiment

    out = Path(out_dir)
    base = load_config(config_path, list(overrides))
    for key in CELL_KEYS:
        if any(o.split("=", 1)[0].strip() == key for o in overrides):
            raise ConfigError(f"compare: '{key}' is set per cell; use --methods/--profiles/--seeds/--out instead")
    for spec in methods:
        check_method_spec(spec)
    cells = grid_cells(methods, profiles, seeds)
    for cell in cells:  # every cell's config is valid before the first one starts
        load_config(config_path, [*overrides, *cell.overrides()])
    register_cells(out, base_settings(base), cells, baseline, command)

    cells_dir = out / "cells"

    def finished(cell: Cell) -> bool:
        return (cells_dir / cell.name / "summary.json").is_file()

    todo = [c for c in cells if not finished(c)]
    echo(f"compare: {len(cells)} cells ({len(cells) - len(todo)} done), writing to {out}")
    for i, cell in enumerate(todo, start=1):
        if finished(cell):  # by another process filling this grid, since `todo` was listed
            echo(f"compare: cell {cell.name} was finished elsewhere")
            continue
        try:  # another process filling the same grid may be running this cell: leave it to that one
            RunLock(cells_dir / cell.name).check_free()
        except ConfigError as e:
            echo(f"compare: cell {cell.name} is running elsewhere, skipped ({e})")
            continue
        cfg = load_config(
            config_path,
            [*overrides, *cell.overrides(), f"output.dir={cells_dir}", f"output.name={cell.name}", "output.overwrite=true"],
        )
        zero_path = out / "zero_shot.json"  # the base model's scores, once per grid
        zero_shot = read_json(zero_path) if zero_path.is_file() else None
        echo(f"compare: cell {i}/{len(todo)}: {cell.name}")
        started = time.perf_counter()
        cell_echo = lambda line, c=cell: echo(f"  [{c.name}] {line}")  # noqa: E731
        # An interrupted cell continues from its last round checkpoint, if it wrote one.
        resume = cells_dir / cell.name if (cells_dir / cell.name / "config.yaml").is_file() else None
        try:
            try:
                run_dir = run_experiment(cfg, echo=cell_echo, zero_shot=zero_shot, resume=resume)
            except ConfigError as e:
                if resume is None:
                    raise
                echo(f"compare: cell {cell.name} cannot resume ({e}); starting it again")
                run_dir = run_experiment(cfg, echo=cell_echo, zero_shot=zero_shot)
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as e:  # one failing cell is reported; the others still run
            echo(f"compare: cell {cell.name} failed after {time.perf_counter() - started:.0f} s: {type(e).__name__}: {e}")
            (cells_dir / cell.name).mkdir(parents=True, exist_ok=True)
            (cells_dir / cell.name / "error.txt").write_text(traceback.format_exc())
            continue
        if zero_shot is None:
            first = read_jsonl(run_dir / "metrics.jsonl")[0]
            write_json(zero_path, first["eval"])
        write_report(out, echo=None)
    return write_report(out, echo=echo)


def command_line(argv: list[str] | None = None) -> str:
    return "flexlora " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
