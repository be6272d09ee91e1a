"""Paired differences between the grid's methods, from the cells' per-example records: each
method against the baseline, FlexLoRA against each other heterogeneous method, each variant
against its plain method. Their tables in compare.md, their CSV files (differences.csv,
differences_flexlora.csv, differences_variants.csv) and what the grid can resolve (the seeds
each difference would need). The intervals themselves: flexlora.analysis.stats.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flexlora.analysis.cells import is_homogeneous, plain_method
from flexlora.analysis.stats import MAX_SEEDS, SEEDS_AND_CATEGORIES, paired_difference
from flexlora.metrics import METRIC, METRICS
from flexlora.reporting import atomic_path

OURS = "flexlora"  # the library's method: the report also sets it against every other heterogeneous method


@dataclass(frozen=True)
class Comparisons:
    """Every paired difference of a grid, as [PairedDifference per metric] lists."""

    differences: list  # [((method, profile), diffs)]: method − baseline
    pairwise: list  # [(rival, profile, diffs)]: OURS − rival
    against_plain: list  # [(variant, plain, profile, diffs)]: variant − plain method


def comparisons(methods, profiles, seeds, cell_for, baseline) -> Comparisons:
    differences = differences_against(methods, profiles, seeds, cell_for, baseline) if baseline in methods else []
    # The paper's claim is also about FlexLoRA against the other heterogeneous methods, not
    # only against the homogeneous baseline: the same paired intervals, FlexLoRA minus each.
    rivals = [m for m in methods if m not in (baseline, OURS) and not is_homogeneous(m)]
    pairwise = []
    if OURS in methods:
        for rival in rivals:
            pairwise += [(rival, p, diffs) for (_, p), diffs in differences_against([OURS], profiles, seeds, cell_for, rival)]
    # A variant asks whether its arguments beat the method without them (HetLoRA's replication
    # padding against its zero padding): the same paired intervals, variant minus plain method.
    variants = [(m, plain_method(m)) for m in methods if plain_method(m) != m and plain_method(m) in methods]
    against_plain = [
        (variant, plain, p, diffs)
        for variant, plain in variants
        for (_, p), diffs in differences_against([variant], profiles, seeds, cell_for, plain)
    ]
    return Comparisons(differences, pairwise, against_plain)


def difference_sections(c: Comparisons, profiles, label, baseline, of: int) -> list[str]:
    """compare.md's difference tables (against the baseline, FlexLoRA against each rival, each
    variant against its plain method) and the seeds-needed table; `of`: the grid's seeds."""
    lines = _difference_tables(c.differences, profiles, label, baseline, of=of)
    lines += _difference_tables(
        [((f"{OURS} − {rival}", p), diffs) for rival, p, diffs in c.pairwise],
        profiles,
        lambda name: name,
        "the other heterogeneous methods",
        what="the difference each row names",
        of=of,
    )
    lines += _difference_tables(
        [((f"{variant} − {plain}", p), diffs) for variant, plain, p, diffs in c.against_plain],
        profiles,
        lambda name: name,
        "the method without the variant's arguments",
        what="the difference each row names",
        of=of,
    )
    lines += _power_table(
        [(f"{label(m)} − {label(baseline)}", p, diffs) for (m, p), diffs in c.differences]
        + [(f"{OURS} − {rival}", p, diffs) for rival, p, diffs in c.pairwise]
        + [(f"{variant} − {plain}", p, diffs) for variant, plain, p, diffs in c.against_plain]
    )
    return lines


def write_difference_files(out: Path, c: Comparisons, baseline, label) -> None:
    with csv_writer(out / "differences.csv") as w:
        w.writerow(["method", "profile", "metric", f"mean_minus_{baseline}", *DIFFERENCE_COLUMNS])
        for (m, p), diffs in c.differences:
            for d in diffs:
                w.writerow([label(m), p, d.metric, f"{d.mean:.6f}", *_difference_cells(d)])
    _write_pairs(out / f"differences_{OURS}.csv", [(OURS, rival, p, diffs) for rival, p, diffs in c.pairwise])
    _write_pairs(out / "differences_variants.csv", c.against_plain)


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


def differences_against(methods, profiles, seeds, cell_for, baseline):
    """[((method, profile), [PairedDifference per metric])] against the baseline, over the seeds
    where both cells are done; with the task-level interval where the examples' categories are known."""
    out = []
    for m in methods:
        if m == baseline:
            continue
        for p in ["homo"] if is_homogeneous(m) else profiles:
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
# where the examples come from fewer than 2 categories); `significant`: every interval
# `significant_by` names excludes 0; per_seed: the difference in each seed.
DIFFERENCE_COLUMNS = (
    "ci95_low",
    "ci95_high",
    "ci95_examples_low",
    "ci95_examples_high",
    "seed_sd",
    "seeds",
    "examples",
    "significant",
    "significant_examples_only",
    "per_seed",
    "ci95_categories_low",
    "ci95_categories_high",
    "categories",
    "significant_by",
    "significant_seeds_examples",
    "seeds_to_exclude_0",
    "seeds_for_80pct_power",
)


@contextmanager
def csv_writer(path: Path):
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        yield csv.writer(f)


def _write_pairs(path: Path, pairs) -> None:
    """One CSV row per (method, against, profile, PairedDifference of a metric); none if no pairs."""
    if not pairs:
        return
    with csv_writer(path) as w:
        w.writerow(["method", "against", "profile", "metric", "mean_difference", *DIFFERENCE_COLUMNS])
        for method, against, p, diffs in pairs:
            for d in diffs:
                w.writerow([method, against, p, d.metric, f"{d.mean:.6f}", *_difference_cells(d)])


def _difference_cells(d) -> list:
    categories = [f"{d.category_low:.6f}", f"{d.category_high:.6f}"] if d.has_categories else ["", ""]
    return [
        f"{d.low:.6f}",
        f"{d.high:.6f}",
        f"{d.example_low:.6f}",
        f"{d.example_high:.6f}",
        f"{d.seed_sd:.6f}",
        d.seeds,
        d.examples,
        d.significant,
        d.significant_examples_only,
        " ".join(f"{x:+.6f}" for x in d.per_seed),
        *categories,
        d.categories,
        d.decided_by,
        d.significant_seeds_examples,
        *("" if n is None else n for n in (d.seeds_to_exclude_zero, d.seeds_for_power)),
    ]


def _seeds(n: int | None, d) -> str:
    if n is None:
        return "– (1 seed: no spread)" if d.seeds < 2 else "never (mean 0)"
    return f"> {MAX_SEEDS:,}" if n > MAX_SEEDS else str(n)


def _power_table(named) -> list[str]:
    """What the grid can resolve: per difference in the report's metric, the seeds at which a
    difference of the observed mean and spread over seeds would exclude 0 (flexlora.analysis.stats)."""
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
        "examples and held-out categories stay as they are, so where significance also needs the task-level interval, "
        "more seeds leave its category part as wide as it is. s from 3 seeds is itself uncertain: read these as "
        "orders of magnitude.",
        "",
        "| difference | profile | mean | sd over seeds | seeds | significant | seeds to exclude 0 | seeds for 80% power |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p, d in rows:
        verdict = ("yes" if d.significant else "no") + f" ({d.decided_by})"
        lines.append(
            f"| {name} | {p} | {d.mean:+.4f} | {d.seed_sd:.4f} | {d.seeds} | {verdict} | "
            f"{_seeds(d.seeds_to_exclude_zero, d)} | {_seeds(d.seeds_for_power, d)} |"
        )
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
            "unseen tasks. **n.s.**: the two-level or the seeds-and-categories interval contains 0 (not significant): a "
            "difference is significant only when both exclude 0 (neither is always the wider). With one seed the first two intervals are the same. With 3 "
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
    flips = [
        f"{label(m)} {p} {metric}"
        for (m, p), ds in by_key.items()
        for metric, d in ds.items()
        if d.significant_examples_only and not d.significant_seeds_examples
    ]
    if flips:
        lines += [f"Significant over the test examples only, not once seeds are resampled: {', '.join(flips)}.", ""]
    for text, test in (
        (
            "Significant with seeds and examples resampled, not once the held-out categories are resampled",
            lambda d: d.significant_seeds_examples and not d.significant,
        ),
        (
            "Excluding 0 once the held-out categories are resampled, not with seeds and examples resampled (so n.s.)",
            lambda d: not (d.category_low <= 0.0 <= d.category_high) and not d.significant_seeds_examples,
        ),
    ):
        found = [
            f"{label(m)} {p} {metric}"
            for (m, p), ds in by_key.items()
            for metric, d in ds.items()
            if d.has_categories and test(d)
        ]
        if found:
            lines += [f"{text}: {', '.join(found)}.", ""]
    return lines
