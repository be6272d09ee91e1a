"""`flexlora compare`: methods x resource profiles x seeds on one data source, one report.

Every cell is an ordinary run (its own run folder under <out>/cells/) from the same base
config. All cells share the data split and the held-out clients (both seeded by
data.split_seed, not by the run seed), and cells with the same seed sample the same clients
each round and draw the same rank types. A cell is done once its summary.json exists, so an
interrupted grid resumes cell by cell (an interrupted cell from its last round checkpoint), and cells can be added later (a new method, more
seeds) to the same folder. A homogeneous method (FedIT) cuts every client to the smallest
rank whatever the profile, so it runs once per seed, under the profile 'homo', and is the
reference ("improvement over homogeneous FedIT") for every profile.

The base model is evaluated once per grid (zero_shot.json): held-out clients and greedy decoding
do not depend on the seed. Every difference against the baseline is paired (same seed, same test
examples) and comes with 95% bootstrap intervals (flexlora.stats): one that resamples seeds and
test examples, one over the test examples only, and, where the held-out examples come from
several task categories, one that resamples seeds and then categories (task-level). "Significant"
follows the widest the design supports: the task-level one where there is one.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
import shlex
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flexlora.config import ConfigError, ExperimentConfig, load_config
from flexlora.metrics import EVAL_LOSS, METRIC, METRICS, TEACHER_FORCED
from flexlora.reporting import atomic_path, write_json
from flexlora.runlock import RunLock
from flexlora.stats import MAX_SEEDS, SEEDS_AND_CATEGORIES, paired_difference

GRID_FILE = "grid.json"
FOREST_PNG, SCORES_PNG = "forest.png", "scores.png"
GRID_LOCK = ".grid.lock"  # held while grid.json is read, merged and written
OURS = "flexlora"  # the library's method: the report also sets it against every other heterogeneous method
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
        return [f"method={name}", *(f"method_args.{argument}" for argument in arguments),
                f"resources.profile={self.profile}", f"seed={self.seed}"]


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


def _base_settings(cfg: ExperimentConfig) -> dict:
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
            stored = json.loads(grid_path.read_text())
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
        write_json(grid_path, {"settings": settings, "cells": [c.__dict__ for c in cells_all], "baseline": baseline, "commands": commands})


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
    register_cells(out, _base_settings(base), cells, baseline, command)

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
        zero_shot = json.loads(zero_path.read_text()) if zero_path.is_file() else None
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
            first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
            write_json(zero_path, first["eval"])
        write_report(out, echo=None)
    return write_report(out, echo=echo)


# ----------------------------------------------------------------------------- report


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 4, signed: bool = False, of: int | None = None) -> str:
    """mean ± sd over seeds; with `of` (the grid's number of seeds), an entry over fewer seeds
    says how many, since means over different seed sets are not comparable."""
    if not values:
        return "–"
    mean, sd = _mean_sd(values)
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{mean:{sign}.{digits}f} (1 seed)"
    partial = f" ({len(values)} of {of} seeds)" if of is not None and len(values) < of else ""
    return f"{mean:{sign}.{digits}f} ± {sd:.{digits}f}{partial}"


def load_cells(out: Path) -> tuple[dict, list[dict]]:
    grid = json.loads((out / GRID_FILE).read_text())
    rows = []
    for c in grid["cells"]:
        cell = Cell(**c)
        run_dir = out / "cells" / cell.name
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({"cell": cell, "summary": summary, "history": history})
    return grid, rows


def write_report(out: str | Path, echo=print) -> Path:
    """compare.md, compare.csv (mean ± spread per method and profile), cells.csv (one row per
    cell), differences*.csv, forest.png and scores.png from the finished cells."""
    out = Path(out)
    grid, rows = load_cells(out)
    cells = [Cell(**c) for c in grid["cells"]]
    baseline = grid.get("baseline")
    methods = list(dict.fromkeys(c.method for c in cells))
    profiles = list(dict.fromkeys(c.profile for c in cells if not is_homogeneous(c.method))) or ["homo"]
    seeds = sorted({c.seed for c in cells})
    by_cell = {r["cell"]: r for r in rows}

    def cell_for(method: str, profile: str, seed: int):
        return by_cell.get(Cell(method, "homo" if is_homogeneous(method) else profile, seed))

    def values(method, profile, key):
        return [r["summary"][key] for s in seeds if (r := cell_for(method, profile, s))]

    def paired_delta(method, profile, key="final"):
        out_ = []
        for s in seeds:
            r, b = cell_for(method, profile, s), cell_for(baseline, profile, s)
            if r and b:
                out_.append(r["summary"][key] - b["summary"][key])
        return out_

    def label(method):
        return f"{method} (homo)" if is_homogeneous(method) else method

    settings = grid["settings"]
    lines = [
        "# Comparison grid",
        "",
        f"Data: `{settings['data']['source']}` at `{settings['data']['path']}`; model `{settings['model']}`; "
        f"{settings['federation']['rounds']} rounds, {settings['federation']['clients_per_round']} clients per round, "
        f"{settings['train']['steps']} local steps of batch {settings['train']['batch_size']}, seeds {', '.join(map(str, seeds))}; "
        f"{len(rows)}/{len(cells)} cells done.",
        "",
        f"Metric: **{METRIC}** — Rouge-L F1 of greedy generations (max {settings['eval']['max_new_tokens']} new tokens; "
        "rouge-score with a Unicode-aware tokenizer, identical to its default on English, see docs/data_and_eval.md) "
        "on the held-out clients (tasks never trained on), weighted by test-set size, after the last round. "
        f"`{TEACHER_FORCED.name}` is the released FlexLoRA code's metric (argmax of teacher-forced logits), for comparison. "
        "Mean ± sample standard deviation over seeds. A homogeneous method trains every client at the smallest rank "
        "whatever the profile, so its one run per seed is repeated in every profile column.",
        "",
    ]
    # Every registered metric but the headline one that every finished cell's summary holds (a
    # metric registered after the grid ran is left out, not an error).
    others = [m for m in METRICS.values() if m.name != METRIC and all(f"final{m.summary_suffix}" in r["summary"] for r in rows)]
    if rows:
        zero = [r["summary"]["zero_shot"] for r in rows]
        means = [f"{m.label} {statistics.fmean(r['summary'][f'zero_shot{m.summary_suffix}'] for r in rows):.{m.digits}f}"
                 for m in others]
        lines += [f"Zero-shot (base model, no adapter): {', '.join([f'{METRIC} {statistics.fmean(zero):.4f}', *means])}.", ""]

    def table(title, key, digits=4, delta=False):
        head = ["method", *profiles]
        body = []
        for m in methods:
            if delta and m == baseline:
                continue
            if delta:
                cols = [_fmt(paired_delta(m, p, key), digits, signed=True, of=len(seeds)) for p in profiles]
            else:
                cols = [_fmt(values(m, p, key), digits, of=len(seeds)) for p in profiles]
            body.append([label(m), *cols])
        return [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *("| " + " | ".join(row) + " |" for row in body), ""]

    lines += table(f"Final {METRIC} (held-out clients)", "final")
    differences = _differences(methods, profiles, seeds, cell_for, baseline) if baseline in methods else []
    # The paper's claim is also about FlexLoRA against the other heterogeneous methods, not
    # only against the homogeneous baseline: the same paired intervals, FlexLoRA minus each.
    rivals = [m for m in methods if m not in (baseline, OURS) and not is_homogeneous(m)]
    pairwise = []
    if OURS in methods:
        for rival in rivals:
            pairwise += [(rival, p, diffs) for (_, p), diffs in _differences([OURS], profiles, seeds, cell_for, rival)]
    # A variant asks whether its arguments beat the method without them (HetLoRA's replication
    # padding against its zero padding): the same paired intervals, variant minus plain method.
    variants = [(m, plain_method(m)) for m in methods if plain_method(m) != m and plain_method(m) in methods]
    against_plain = [(variant, plain, p, diffs) for variant, plain in variants
                     for (_, p), diffs in _differences([variant], profiles, seeds, cell_for, plain)]
    forest = _forest(differences, pairwise, baseline, profiles, label)
    if forest:
        lines += _forest_lines(forest, label(baseline))
    lines += _difference_tables(differences, profiles, label, baseline, of=len(seeds))
    lines += _difference_tables([((f"{OURS} − {rival}", p), diffs) for rival, p, diffs in pairwise], profiles,
                                lambda name: name, "the other heterogeneous methods", what="the difference each row names",
                                of=len(seeds))
    lines += _difference_tables([((f"{variant} − {plain}", p), diffs) for variant, plain, p, diffs in against_plain],
                                profiles, lambda name: name, "the method without the variant's arguments",
                                what="the difference each row names", of=len(seeds))
    lines += _power_table([(f"{label(m)} − {label(baseline)}", p, diffs) for (m, p), diffs in differences]
                          + [(f"{OURS} − {rival}", p, diffs) for rival, p, diffs in pairwise]
                          + [(f"{variant} − {plain}", p, diffs) for variant, plain, p, diffs in against_plain])
    if baseline in methods:
        lines += table(f"Improvement over {label(baseline)} in {METRIC} (paired by seed)", "final", delta=True)
        lines += table(f"Change in {EVAL_LOSS.label} against {label(baseline)} (paired by seed; negative is better)",
                       f"final{EVAL_LOSS.summary_suffix}", digits=EVAL_LOSS.digits, delta=True)
    for m in others:
        lines += table(f"Final {m.title}", f"final{m.summary_suffix}", digits=m.digits)
    lines += table(f"Best {METRIC} over rounds", "best")
    lines += _truncation_table(rows, profiles)
    lines += _category_table(rows, methods, profiles, label)
    lines += ["### Cells", "", "| cell | zero-shot | final | " + "".join(f"{m.label} | " for m in others) + "wall time (s) |",
              "|---|---|---|" + "---|" * len(others) + "---|"]
    for r in rows:
        s = r["summary"]
        finals = "".join(f"{s[f'final{m.summary_suffix}']:.{m.digits}f} | " for m in others)
        lines.append(f"| {r['cell'].name} | {s['zero_shot']:.4f} | {s['final']:.4f} | {finals}{s['wall_time_s']:.0f} |")
    failed = [c.name for c in cells if (out / "cells" / c.name / "error.txt").is_file() and c not in by_cell]
    if failed:
        lines += ["", f"Failed cells (see their error.txt): {', '.join(failed)}"]
    if grid.get("commands"):
        lines += ["", "### Command", "", "```", *grid["commands"], "```"]
    # Every file is replaced whole (atomic_path): a process killed mid-report, or two processes
    # finishing cells at once, leave each file as one complete report wrote it.
    md = out / "compare.md"
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    with _csv_writer(out / "compare.csv") as w:
        head = ["method", "profile", "seeds", "final_mean", "final_sd", f"delta_vs_{baseline}_mean", f"delta_vs_{baseline}_sd"]
        for metric in others:  # mean and sd of each other metric; the eval loss's paired change too
            key = metric.summary_suffix.lstrip("_")
            head += [f"{key}_mean", f"{key}_sd"] + ([f"{key}_delta_vs_{baseline}_mean", f"{key}_delta_vs_{baseline}_sd"]
                                                   if metric is EVAL_LOSS else [])
        w.writerow([*head, "best_mean", "zero_shot"])
        for m in methods:
            for p in profiles:
                final = values(m, p, "final")
                if not final:
                    continue
                d = paired_delta(m, p, "final") if baseline in methods else []
                row = [label(m), p, len(final), *_mean_sd(final), *_mean_sd(d)]
                for metric in others:
                    key = f"final{metric.summary_suffix}"
                    row += _mean_sd(values(m, p, key))
                    if metric is EVAL_LOSS:
                        row += _mean_sd(paired_delta(m, p, key) if baseline in methods else [])
                row += [_mean_sd(values(m, p, "best"))[0], _mean_sd(values(m, p, "zero_shot"))[0]]
                w.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in row])
    with _csv_writer(out / "differences.csv") as w:
        w.writerow(["method", "profile", "metric", f"mean_minus_{baseline}", *DIFFERENCE_COLUMNS])
        for (m, p), diffs in differences:
            for d in diffs:
                w.writerow([label(m), p, d.metric, f"{d.mean:.6f}", *_difference_cells(d)])
    _write_pairs(out / f"differences_{OURS}.csv", [(OURS, rival, p, diffs) for rival, p, diffs in pairwise])
    _write_pairs(out / "differences_variants.csv", against_plain)
    with _csv_writer(out / "cells.csv") as w:
        w.writerow(["method", "profile", "seed", "round", METRIC, *(m.name for m in others)])
        for r in rows:
            for rec in r["history"]:
                if rec.get("eval"):
                    e = rec["eval"]
                    w.writerow([r["cell"].method, r["cell"].profile, r["cell"].seed, rec["round"],
                                f"{e[METRIC]:.6f}", *(f"{e[m.name]:.6f}" for m in others)])
    if rows:
        _figures(out, rows, methods, profiles, seeds, cell_for, label, forest)
    if echo:
        echo(f"compare: report {md} ({len(rows)}/{len(cells)} cells)")
    return md


def _forest(differences, pairwise, baseline, profiles, label):
    from flexlora.compare_figures import forest_rows

    return forest_rows(differences, pairwise, baseline, OURS, profiles, label, METRIC) if differences or pairwise else []


def _forest_lines(forest, baseline_label: str) -> list[str]:
    intervals = " / ".join(sorted({r.interval for r in forest}))
    return [
        "### The differences at a glance", "",
        f"![Paired differences: each method − {baseline_label} and each method − {OURS}, per profile]({FOREST_PNG})", "",
        f"Per resource profile, each method − {baseline_label}, then each method − {OURS}, in {METRIC}: the mean (◆, "
        f"filled when significant), the 95% interval over {intervals} (the one \"significant\" follows), one dot per "
        f"seed. [{SCORES_PNG}]({SCORES_PNG}): the scores themselves (round curves where intermediate rounds were "
        "evaluated, otherwise each seed's final score).", "",
    ]


def _figures(out: Path, rows, methods, profiles, seeds, cell_for, label, forest) -> None:
    """forest.png (every difference against the baseline and against FlexLoRA) and scores.png
    (round curves, or final scores where only the first and last rounds were evaluated). They
    replace compare.png, whose straight lines from round 0 to the last round drew progress
    nobody measured: a compare.png left by an older version is removed."""
    from flexlora.compare_figures import plot_forest, plot_scores, score_panels

    plot_forest(out / FOREST_PNG, forest, profiles, METRIC)
    zero_shot = statistics.fmean(r["summary"]["zero_shot"] for r in rows)
    plot_scores(out / SCORES_PNG, score_panels(methods, profiles, seeds, cell_for, label, is_homogeneous), zero_shot)
    (out / "compare.png").unlink(missing_ok=True)


def _final_examples(row) -> list[dict] | None:
    """The per-example records of a cell's last evaluation (None for cells written before
    evaluation kept them)."""
    evaluated = [rec for rec in row["history"] if rec.get("eval")]
    return evaluated[-1]["eval"].get("per_example") if evaluated else None


def _final_categories(row) -> dict[str, str]:
    """Client id -> held-out task category ('Textual Entailment' for 'Textual Entailment
    1090.json') of the clients in a cell's last evaluation ({} where it recorded none)."""
    from flexlora.data.split import task_category

    evaluated = [rec for rec in row["history"] if rec.get("eval")]
    per_client = evaluated[-1]["eval"].get("per_client") or {} if evaluated else {}
    return {cid: task_category(c["category"]) for cid, c in per_client.items() if c.get("category") is not None}


def _categories_of(rows, runs) -> dict[str, str] | None:
    """The held-out category of every client the runs' examples come from, or None when any
    client lacks one (cells written before evaluation recorded them)."""
    categories: dict[str, str] = {}
    for row in rows:
        categories.update(_final_categories(row))
    clients = {str(e["client"]) for run in runs for e in run}
    return categories if clients <= set(categories) else None


def _differences(methods, profiles, seeds, cell_for, baseline):
    """[((method, profile), [PairedDifference per metric])] against the baseline, over the seeds
    where both cells are done; with the task-level interval where the examples' categories are known."""
    out = []
    for m in methods:
        if m == baseline:
            continue
        for p in (["homo"] if is_homogeneous(m) else profiles):
            cells = [(r, b) for s in seeds if (r := cell_for(m, p, s)) and (b := cell_for(baseline, p, s))]
            pairs = [(x, y, r, b) for r, b in cells if (x := _final_examples(r)) and (y := _final_examples(b))]
            if pairs:
                runs, base = [x for x, *_ in pairs], [y for _, y, *_ in pairs]
                categories = _categories_of([c for *_, r, b in pairs for c in (r, b)], runs + base)
                recorded = [name for name, metric in METRICS.items() if all(f in runs[0][0] for f, _ in metric.fields)]
                out.append(((m, p), [paired_difference(runs, base, metric, categories=categories) for metric in recorded]))
    return out


# ci95_*: the two-level interval (seeds and examples resampled); ci95_examples_*: the test
# examples resampled only; ci95_categories_*: seeds, then held-out categories resampled (empty
# where the examples come from fewer than 2 categories); `significant` follows the interval
# `significant_by` names; per_seed: the difference in each seed.
DIFFERENCE_COLUMNS = ("ci95_low", "ci95_high", "ci95_examples_low", "ci95_examples_high", "seed_sd", "seeds", "examples",
                      "significant", "significant_examples_only", "per_seed", "ci95_categories_low", "ci95_categories_high",
                      "categories", "significant_by", "significant_seeds_examples", "seeds_to_exclude_0",
                      "seeds_for_80pct_power")


@contextmanager
def _csv_writer(path: Path):
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        yield csv.writer(f)


def _write_pairs(path: Path, pairs) -> None:
    """One CSV row per (method, against, profile, PairedDifference of a metric); none if no pairs."""
    if not pairs:
        return
    with _csv_writer(path) as w:
        w.writerow(["method", "against", "profile", "metric", "mean_difference", *DIFFERENCE_COLUMNS])
        for method, against, p, diffs in pairs:
            for d in diffs:
                w.writerow([method, against, p, d.metric, f"{d.mean:.6f}", *_difference_cells(d)])


def _difference_cells(d) -> list:
    categories = [f"{d.category_low:.6f}", f"{d.category_high:.6f}"] if d.has_categories else ["", ""]
    return [f"{d.low:.6f}", f"{d.high:.6f}", f"{d.example_low:.6f}", f"{d.example_high:.6f}", f"{d.seed_sd:.6f}",
            d.seeds, d.examples, d.significant, d.significant_examples_only, " ".join(f"{x:+.6f}" for x in d.per_seed),
            *categories, d.categories, d.decided_by, d.significant_seeds_examples,
            *("" if n is None else n for n in (d.seeds_to_exclude_zero, d.seeds_for_power))]


def _seeds(n: int | None, d) -> str:
    if n is None:
        return "– (1 seed: no spread)" if d.seeds < 2 else "never (mean 0)"
    return f"> {MAX_SEEDS:,}" if n > MAX_SEEDS else str(n)


def _power_table(named) -> list[str]:
    """What the grid can resolve: per difference in the report's metric, the seeds at which a
    difference of the observed mean and spread over seeds would exclude 0 (flexlora.stats)."""
    rows = [(name, p, next(d for d in diffs if d.metric == METRIC)) for name, p, diffs in named]
    if not rows:
        return []
    lines = [
        f"### What the grid can resolve: seeds needed ({METRIC})",
        "",
        "Per difference: its mean d and the standard deviation s of the per-seed differences, as observed; the number "
        "of seeds n at which an effect of that size, with that spread, would exclude 0: the smallest n with "
        "√n·|d|/s > t(0.975, n−1) (the 95% t interval of the mean over n seeds), and for 80% power √n·|d|/s ≥ "
        "t(0.975, n−1) + t(0.80, n−1) (the noncentral t approximated by a shifted central t). Seeds only: the test "
        "examples and held-out categories stay as they are, so where significance follows the task-level interval, "
        "more seeds leave its category part as wide as it is. s from 3 seeds is itself uncertain: read these as "
        "orders of magnitude.",
        "",
        "| difference | profile | mean | sd over seeds | seeds | significant | seeds to exclude 0 | seeds for 80% power |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p, d in rows:
        verdict = ("yes" if d.significant else "no") + f" ({d.decided_by})"
        lines.append(f"| {name} | {p} | {d.mean:+.4f} | {d.seed_sd:.4f} | {d.seeds} | {verdict} | "
                     f"{_seeds(d.seeds_to_exclude_zero, d)} | {_seeds(d.seeds_for_power, d)} |")
    return lines + [""]


def _difference_tables(differences, profiles, label, baseline, what=None, of: int = 1) -> list[str]:
    """`what`: what a row's difference is (default: the row's method − the baseline); `of`: the
    grid's number of seeds (an entry over fewer says so: a method added to a finished grid runs
    seed 0 first)."""
    if not differences:
        return []
    by_key = {key: {d.metric: d for d in diffs} for key, diffs in differences}
    categories = max((d.categories for ds in by_key.values() for d in ds.values() if d.has_categories), default=0)
    intervals = (
        f"{what or 'method − ' + label(baseline)}, mean over seeds; [95% paired two-level bootstrap interval: seeds resampled "
        "with replacement and the held-out test examples resampled (the same examples for every seed and for both methods), "
        "2000 resamples]; sd: standard deviation of the per-seed difference; (examples only [...]): the interval that "
        "resamples the test examples only and keeps the seeds fixed, so it leaves training randomness out. "
    )
    if categories:
        intervals += (
            f"({SEEDS_AND_CATEGORIES} [...]): the task-level interval, which resamples the seeds and then the {categories} "
            "held-out task categories, each category's test examples together (a cluster bootstrap), since the claim is about "
            "unseen tasks. **n.s.**: the seeds-and-categories interval contains 0 (not significant): significance follows it, "
            "the widest interval this grid's design supports. With one seed the first two intervals are the same. With 3 "
            "seeds the intervals that resample seeds are coarse (10 distinct seed resamples). Eval loss: negative is better."
        )
    else:
        intervals += (
            "**n.s.**: the two-level interval contains 0 (not significant). With one seed the two intervals are the same. "
            "With 3 seeds the two-level interval is coarse (10 distinct seed resamples). Eval loss: negative is better."
        )
    lines = [f"### Difference against {label(baseline)}, with 95% intervals", "", intervals, ""]
    methods = list(dict.fromkeys(m for m, _ in by_key))

    def entry(d, digits):
        partial = f" ({d.seeds} of {of} seeds)" if d.seeds < of else ""
        return d.format(digits).replace(" n.s.", " **n.s.**") + partial

    recorded = {d.metric for ds in by_key.values() for d in ds.values()}
    for metric, digits in ((m.name, m.digits) for m in METRICS.values() if m.name in recorded):
        lines += [f"**{metric}**", "", "| method | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
        for m in methods:
            cols = []
            for p in profiles:
                d = by_key.get((m, p)) or by_key.get((m, "homo"))
                cols.append(entry(d[metric], digits) if d else "–")
            lines.append(f"| {label(m)} | " + " | ".join(cols) + " |")
        lines.append("")
    n = next(iter(by_key.values()))[METRIC]
    one_seed = " (one seed: the two-level interval is the examples-only one)" if n.seeds == 1 else ""
    from_categories = f" from {n.categories} held-out categories" if n.has_categories else ""
    lines += [f"({n.examples} paired test examples{from_categories}, {n.seeds} seed(s) in the first row's cells{one_seed}.)", ""]
    flips = [f"{label(m)} {p} {metric}" for (m, p), ds in by_key.items() for metric, d in ds.items()
             if d.significant_examples_only and not d.significant_seeds_examples]
    if flips:
        lines += [f"Significant over the test examples only, not once seeds are resampled: {', '.join(flips)}.", ""]
    for text, test in (
        ("Significant with seeds and examples resampled, not once the held-out categories are resampled",
         lambda d: d.significant_seeds_examples and not d.significant),
        ("Significant once the held-out categories are resampled, not with seeds and examples resampled",
         lambda d: d.significant and not d.significant_seeds_examples),
    ):
        found = [f"{label(m)} {p} {metric}" for (m, p), ds in by_key.items() for metric, d in ds.items()
                 if d.has_categories and test(d)]
        if found:
            lines += [f"{text}: {', '.join(found)}.", ""]
    return lines


def _truncation_table(rows, profiles) -> list[str]:
    """Mean over seeds and rounds of the rank-r slice's error ratio, per profile and module kind."""
    acc: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for r in rows:
        for trunc in r["summary"].get("truncation", {}).values():
            for kind, by_rank in trunc.items():
                slot = acc.setdefault((r["cell"].method, r["cell"].profile, kind), {})
                for rank, v in by_rank.items():
                    slot.setdefault(int(rank), []).append(v["err"])
    if not acc:
        return []
    ranks = sorted({rank for slot in acc.values() for rank in slot})
    lines = [
        "### What truncation costs: ‖ΔW − Ŵ_r‖_F / ‖ΔW‖_F of the rank-r slice a client receives",
        "",
        "Mean over layers, rounds and seeds (the paper's approximation error ratio; 0 = the client gets ΔW exactly). "
        "Each round's ΔW has rank at most the sum of that round's client ranks.",
        "",
        "| method | profile | module | " + " | ".join(f"r={r}" for r in ranks) + " |",
        "|---|---|---|" + "---|" * len(ranks),
    ]
    order = {p: i for i, p in enumerate(profiles)}
    for (method, profile, kind) in sorted(acc, key=lambda k: (k[0], order.get(k[1], 99), k[2])):
        slot = acc[(method, profile, kind)]
        cols = [f"{statistics.fmean(slot[r]):.3f}" if r in slot else "–" for r in ranks]
        lines.append(f"| {method} | {profile} | {kind} | " + " | ".join(cols) + " |")
    return lines + [""]


def _category_table(rows, methods, profiles, label) -> list[str]:
    cats = sorted({c for r in rows for c in (r["summary"].get("final_per_category") or {})})
    if len(cats) < 2:
        return []
    lines = [f"### Final {METRIC} per held-out category (mean over seeds)", "",
             "| method | profile | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
    zero = {}
    for r in rows:
        for rec in r["history"][:1]:
            for c, v in (rec["eval"] or {}).get("per_category", {}).items():
                zero.setdefault(c, []).append(v[METRIC])
    if zero:
        lines.append("| zero-shot | – | " + " | ".join(f"{statistics.fmean(zero[c]):.3f}" if c in zero else "–" for c in cats) + " |")
    for m in methods:
        for p in (["homo"] if is_homogeneous(m) else profiles):
            vals = {c: [r["summary"]["final_per_category"][c][METRIC] for r in rows
                        if r["cell"].method == m and r["cell"].profile == p and c in (r["summary"].get("final_per_category") or {})]
                    for c in cats}
            if any(vals.values()):
                lines.append(f"| {label(m)} | {p} | " + " | ".join(f"{statistics.fmean(v):.3f}" if v else "–" for v in vals.values()) + " |")
    return lines + [""]


def command_line(argv: list[str] | None = None) -> str:
    return "flexlora " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
