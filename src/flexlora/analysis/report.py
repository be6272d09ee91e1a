"""The comparison report: compare.md, compare.csv (mean ± spread per method and profile),
cells.csv (every cell's metrics per round), the paired differences' files and tables
(flexlora.analysis.differences), forest.png and scores.png (flexlora.analysis.figures), from a
grid folder's finished cells. Every file is replaced whole: a process killed mid-report, or two
processes finishing cells at once, leave each file as one complete report wrote it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from flexlora.analysis.cells import Cell, is_homogeneous, load_cells
from flexlora.analysis.differences import OURS, Comparisons, comparisons, csv_writer, difference_sections, write_difference_files
from flexlora.metrics import EVAL_LOSS, METRIC, METRICS, TEACHER_FORCED
from flexlora.reporting import atomic_path

FOREST_PNG, SCORES_PNG = "forest.png", "scores.png"


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


@dataclass
class GridView:
    """A grid folder's cells, finished rows and the lookups every table uses."""

    out: Path
    grid: dict
    rows: list[dict]
    cells: list[Cell] = field(init=False)
    baseline: str | None = field(init=False)
    methods: list[str] = field(init=False)
    profiles: list[str] = field(init=False)
    seeds: list[int] = field(init=False)

    def __post_init__(self):
        self.cells = [Cell(**c) for c in self.grid["cells"]]
        self.baseline = self.grid.get("baseline")
        self.methods = list(dict.fromkeys(c.method for c in self.cells))
        self.profiles = list(dict.fromkeys(c.profile for c in self.cells if not is_homogeneous(c.method))) or ["homo"]
        self.seeds = sorted({c.seed for c in self.cells})
        self.by_cell = {r["cell"]: r for r in self.rows}
        # Every registered metric but the headline one that every finished cell's summary holds
        # (a metric registered after the grid ran is left out, not an error).
        self.others = [
            m for m in METRICS.values() if m.name != METRIC and all(f"final{m.summary_suffix}" in r["summary"] for r in self.rows)
        ]

    def cell_for(self, method: str, profile: str, seed: int):
        return self.by_cell.get(Cell(method, "homo" if is_homogeneous(method) else profile, seed))

    def values(self, method, profile, key):
        return [r["summary"][key] for s in self.seeds if (r := self.cell_for(method, profile, s))]

    def paired_delta(self, method, profile, key="final"):
        out = []
        for s in self.seeds:
            r, b = self.cell_for(method, profile, s), self.cell_for(self.baseline, profile, s)
            if r and b:
                out.append(r["summary"][key] - b["summary"][key])
        return out

    @staticmethod
    def label(method):
        return f"{method} (homo)" if is_homogeneous(method) else method

    def table(self, title, key, digits=4, delta=False) -> list[str]:
        """Per method and profile: mean ± sd over seeds of a summary value (or of its paired
        change against the baseline)."""
        head = ["method", *self.profiles]
        body = []
        for m in self.methods:
            if delta and m == self.baseline:
                continue
            if delta:
                cols = [_fmt(self.paired_delta(m, p, key), digits, signed=True, of=len(self.seeds)) for p in self.profiles]
            else:
                cols = [_fmt(self.values(m, p, key), digits, of=len(self.seeds)) for p in self.profiles]
            body.append([self.label(m), *cols])
        return [
            f"### {title}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *("| " + " | ".join(row) + " |" for row in body),
            "",
        ]


def write_report(out: str | Path, echo=print) -> Path:
    """compare.md, compare.csv, cells.csv, differences*.csv, forest.png and scores.png from the
    finished cells of the grid folder `out`; returns compare.md's path."""
    out = Path(out)
    view = GridView(out, *load_cells(out))
    c = comparisons(view.methods, view.profiles, view.seeds, view.cell_for, view.baseline)
    forest = _forest(c, view.baseline, view.profiles, view.label)
    md = out / "compare.md"
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join(_markdown(view, c, forest)) + "\n")
    _write_tables(view)
    write_difference_files(out, c, view.baseline, view.label)
    if view.rows:
        _figures(view, forest)
    if echo:
        echo(f"compare: report {md} ({len(view.rows)}/{len(view.cells)} cells)")
    return md


def _markdown(view: GridView, c: Comparisons, forest) -> list[str]:
    rows, baseline, label, others = view.rows, view.baseline, view.label, view.others
    settings = view.grid["settings"]
    lines = [
        "# Comparison grid",
        "",
        f"Data: `{settings['data']['source']}` at `{settings['data']['path']}`; model `{settings['model']}`; "
        f"{settings['federation']['rounds']} rounds, {settings['federation']['clients_per_round']} clients per round, "
        f"{settings['train']['steps']} local steps of batch {settings['train']['batch_size']}, seeds {', '.join(map(str, view.seeds))}; "
        f"{len(rows)}/{len(view.cells)} cells done.",
        "",
        f"Metric: **{METRIC}** — Rouge-L F1 of greedy generations (max {settings['eval']['max_new_tokens']} new tokens; "
        "rouge-score with a Unicode-aware tokenizer, identical to its default on English, see docs/data_and_eval.md) "
        "on the held-out clients (tasks never trained on), weighted by test-set size, after the last round. "
        f"`{TEACHER_FORCED.name}` is the released FlexLoRA code's metric (argmax of teacher-forced logits), for comparison. "
        "Mean ± sample standard deviation over seeds. A homogeneous method trains every client at the smallest rank "
        "whatever the profile, so its one run per seed is repeated in every profile column.",
        "",
    ]
    if rows:
        zero = [r["summary"]["zero_shot"] for r in rows]
        means = [
            f"{m.label} {statistics.fmean(r['summary'][f'zero_shot{m.summary_suffix}'] for r in rows):.{m.digits}f}"
            for m in others
        ]
        lines += [f"Zero-shot (base model, no adapter): {', '.join([f'{METRIC} {statistics.fmean(zero):.4f}', *means])}.", ""]
    lines += view.table(f"Final {METRIC} (held-out clients)", "final")
    if forest:
        lines += _forest_lines(forest, label(baseline))
    lines += difference_sections(c, view.profiles, label, baseline, of=len(view.seeds))
    if baseline in view.methods:
        lines += view.table(f"Improvement over {label(baseline)} in {METRIC} (paired by seed)", "final", delta=True)
        lines += view.table(
            f"Change in {EVAL_LOSS.label} against {label(baseline)} (paired by seed; negative is better)",
            f"final{EVAL_LOSS.summary_suffix}",
            digits=EVAL_LOSS.digits,
            delta=True,
        )
    for m in others:
        lines += view.table(f"Final {m.title}", f"final{m.summary_suffix}", digits=m.digits)
    lines += view.table(f"Best {METRIC} over rounds", "best")
    lines += _truncation_table(rows, view.profiles)
    lines += _category_table(rows, view.methods, view.profiles, label)
    lines += [
        "### Cells",
        "",
        "| cell | zero-shot | final | " + "".join(f"{m.label} | " for m in others) + "wall time (s) |",
        "|---|---|---|" + "---|" * len(others) + "---|",
    ]
    for r in rows:
        s = r["summary"]
        finals = "".join(f"{s[f'final{m.summary_suffix}']:.{m.digits}f} | " for m in others)
        lines.append(f"| {r['cell'].name} | {s['zero_shot']:.4f} | {s['final']:.4f} | {finals}{s['wall_time_s']:.0f} |")
    failed = [c.name for c in view.cells if (view.out / "cells" / c.name / "error.txt").is_file() and c not in view.by_cell]
    if failed:
        lines += ["", f"Failed cells (see their error.txt): {', '.join(failed)}"]
    if view.grid.get("commands"):
        lines += ["", "### Command", "", "```", *view.grid["commands"], "```"]
    return lines


def _write_tables(view: GridView) -> None:
    """compare.csv (per method and profile) and cells.csv (per cell and evaluated round)."""
    baseline, others = view.baseline, view.others
    with csv_writer(view.out / "compare.csv") as w:
        head = ["method", "profile", "seeds", "final_mean", "final_sd", f"delta_vs_{baseline}_mean", f"delta_vs_{baseline}_sd"]
        for metric in others:  # mean and sd of each other metric; the eval loss's paired change too
            key = metric.summary_suffix.lstrip("_")
            head += [f"{key}_mean", f"{key}_sd"] + (
                [f"{key}_delta_vs_{baseline}_mean", f"{key}_delta_vs_{baseline}_sd"] if metric is EVAL_LOSS else []
            )
        w.writerow([*head, "best_mean", "zero_shot"])
        for m in view.methods:
            for p in view.profiles:
                final = view.values(m, p, "final")
                if not final:
                    continue
                d = view.paired_delta(m, p, "final") if baseline in view.methods else []
                row = [view.label(m), p, len(final), *_mean_sd(final), *_mean_sd(d)]
                for metric in others:
                    key = f"final{metric.summary_suffix}"
                    row += _mean_sd(view.values(m, p, key))
                    if metric is EVAL_LOSS:
                        row += _mean_sd(view.paired_delta(m, p, key) if baseline in view.methods else [])
                row += [_mean_sd(view.values(m, p, "best"))[0], _mean_sd(view.values(m, p, "zero_shot"))[0]]
                w.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in row])
    with csv_writer(view.out / "cells.csv") as w:
        w.writerow(["method", "profile", "seed", "round", METRIC, *(m.name for m in others)])
        for r in view.rows:
            for rec in r["history"]:
                if rec.get("eval"):
                    e = rec["eval"]
                    w.writerow(
                        [
                            r["cell"].method,
                            r["cell"].profile,
                            r["cell"].seed,
                            rec["round"],
                            f"{e[METRIC]:.6f}",
                            *(f"{e[m.name]:.6f}" for m in others),
                        ]
                    )


def _forest(c: Comparisons, baseline, profiles, label):
    from flexlora.analysis.figures import forest_rows

    if not (c.differences or c.pairwise):
        return []
    return forest_rows(c.differences, c.pairwise, baseline, OURS, profiles, label, METRIC)


def _forest_lines(forest, baseline_label: str) -> list[str]:
    intervals = " / ".join(sorted({r.interval for r in forest}))
    return [
        "### The differences at a glance",
        "",
        f"![Paired differences: each method − {baseline_label} and each method − {OURS}, per profile]({FOREST_PNG})",
        "",
        f"Per resource profile, each method − {baseline_label}, then each method − {OURS}, in {METRIC}: the mean (◆, "
        f"filled when significant), the 95% interval over {intervals} (where it names two, their union: "
        f'"significant" needs both to exclude 0), one dot per seed. [{SCORES_PNG}]({SCORES_PNG}): the scores '
        "themselves (round curves where intermediate rounds were evaluated, otherwise each seed's final score).",
        "",
    ]


def _figures(view: GridView, forest) -> None:
    """forest.png (every difference against the baseline and against FlexLoRA) and scores.png
    (round curves, or final scores where only the first and last rounds were evaluated). They
    replace compare.png, whose straight lines from round 0 to the last round drew progress
    nobody measured: a compare.png left by an older version is removed."""
    from flexlora.analysis.figures import plot_forest, plot_scores, score_panels

    plot_forest(view.out / FOREST_PNG, forest, view.profiles, METRIC)
    zero_shot = statistics.fmean(r["summary"]["zero_shot"] for r in view.rows)
    panels = score_panels(view.methods, view.profiles, view.seeds, view.cell_for, view.label, is_homogeneous)
    plot_scores(view.out / SCORES_PNG, panels, zero_shot)
    (view.out / "compare.png").unlink(missing_ok=True)


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
    for method, profile, kind in sorted(acc, key=lambda k: (k[0], order.get(k[1], 99), k[2])):
        slot = acc[(method, profile, kind)]
        cols = [f"{statistics.fmean(slot[r]):.3f}" if r in slot else "–" for r in ranks]
        lines.append(f"| {method} | {profile} | {kind} | " + " | ".join(cols) + " |")
    return lines + [""]


def _category_table(rows, methods, profiles, label) -> list[str]:
    cats = sorted({c for r in rows for c in (r["summary"].get("final_per_category") or {})})
    if len(cats) < 2:
        return []
    lines = [
        f"### Final {METRIC} per held-out category (mean over seeds)",
        "",
        "| method | profile | " + " | ".join(cats) + " |",
        "|---|---|" + "---|" * len(cats),
    ]
    zero = {}
    for r in rows:
        for rec in r["history"][:1]:
            for c, v in (rec["eval"] or {}).get("per_category", {}).items():
                zero.setdefault(c, []).append(v[METRIC])
    if zero:
        lines.append(
            "| zero-shot | – | " + " | ".join(f"{statistics.fmean(zero[c]):.3f}" if c in zero else "–" for c in cats) + " |"
        )
    for m in methods:
        for p in ["homo"] if is_homogeneous(m) else profiles:
            vals = {
                c: [
                    r["summary"]["final_per_category"][c][METRIC]
                    for r in rows
                    if r["cell"].method == m and r["cell"].profile == p and c in (r["summary"].get("final_per_category") or {})
                ]
                for c in cats
            }
            if any(vals.values()):
                lines.append(
                    f"| {label(m)} | {p} | "
                    + " | ".join(f"{statistics.fmean(v):.3f}" if v else "–" for v in vals.values())
                    + " |"
                )
    return lines + [""]
