"""The comparison report written from grid folders made here without training (every cell's
per-example scores chosen): the paired differences and their intervals (seeds and examples,
examples only, seeds and held-out categories), which one decides "significant", the seeds each
difference would need, entries over fewer seeds than the grid, and files replaced whole."""

import csv
import json

import pytest

from flexlora.analysis.cells import Cell
from flexlora.analysis.report import _fmt, write_report


def test_a_mean_over_fewer_seeds_than_the_grid_says_so():
    # An unfinished grid's methods are averaged over different seed sets; the table must show it.
    assert _fmt([0.2, 0.3], of=3) == "0.2500 ± 0.0707 (2 of 3 seeds)"
    assert _fmt([0.2, 0.3, 0.4], of=3) == "0.3000 ± 0.1000"
    assert _fmt([0.2], of=3) == "0.2000 (1 seed)" and _fmt([], of=3) == "–"


def write_finished_grid(out, scores, categories=None):
    """A grid folder as `flexlora compare` leaves it, without training: scores[(method, seed)]
    is every held-out example's Rouge-L (the same for both scores) in the cell's last evaluation;
    `categories`: example i -> its client's NI category label (client "k<i//2>", two examples
    each), recorded as evaluation records it (per_client)."""
    cells = [{"method": m, "profile": "homo" if m == "fedit" else "uniform", "seed": s} for m, s in scores]
    settings = {
        "model": "tiny-llama",
        "data": {"source": "natural-instructions", "path": "ni"},
        "federation": {"rounds": 1, "clients_per_round": 2},
        "train": {"steps": 1, "batch_size": 1},
        "eval": {"max_new_tokens": 2},
    }
    (out / "cells").mkdir(parents=True)
    (out / "grid.json").write_text(json.dumps({"settings": settings, "cells": cells, "baseline": "fedit"}))
    for cell in cells:
        values = scores[(cell["method"], cell["seed"])]
        per_example = [
            {"client": f"c{i % 3}", "index": i, "rougeL_generated": v, "rougeL_teacher_forced": v, "loss": 2.0 - v, "tokens": 1}
            for i, v in enumerate(values)
        ]
        mean = sum(values) / len(values)
        ev = {"rougeL_generated": mean, "rougeL_teacher_forced": mean, "eval_loss": 2.0 - mean, "per_example": per_example}
        if categories:
            for i, e in enumerate(per_example):
                e["client"], e["index"] = f"k{i // 2}", i % 2
            ev["per_client"] = {f"k{i // 2}": {"category": categories(i)} for i in range(len(values))}
        folder = out / "cells" / Cell(**cell).name
        folder.mkdir()
        (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "eval": ev}) + "\n")
        (folder / "summary.json").write_text(
            json.dumps(
                {
                    "final": mean,
                    "best": mean,
                    "zero_shot": 0.0,
                    "zero_shot_teacher_forced": 0.0,
                    "zero_shot_eval_loss": 2.0,
                    "final_teacher_forced": mean,
                    "final_eval_loss": 2.0 - mean,
                    "wall_time_s": 1.0,
                    "per_round": {"1": mean},
                }
            )
        )


def test_the_report_sets_flexlora_against_each_other_heterogeneous_method(tmp_path):
    # The paper's claim is FlexLoRA against HetLoRA too, not only against the homogeneous
    # baseline: the report gives that paired difference with its interval, per metric.
    base = [0.1 * (i % 5) for i in range(40)]
    scores = {}
    for seed in (0, 1):
        scores[("fedit", seed)] = base
        scores[("hetlora", seed)] = [v + 0.05 for v in base]
        scores[("flexlora", seed)] = [v + 0.15 for v in base]  # exactly 0.1 above HetLoRA on every example
    write_finished_grid(tmp_path, scores)
    md = write_report(tmp_path, echo=None).read_text()
    assert "### Difference against the other heterogeneous methods, with 95% intervals" in md
    assert "| flexlora − hetlora | +0.1000 [+0.1000, +0.1000] sd 0.0000 (examples only [+0.1000, +0.1000]) |" in md
    rows = list(csv.DictReader((tmp_path / "differences_flexlora.csv").open()))
    assert [(r["against"], r["metric"]) for r in rows] == [
        ("hetlora", "rougeL_generated"),
        ("hetlora", "rougeL_teacher_forced"),
        ("hetlora", "eval_loss"),
    ]
    assert abs(float(rows[0]["mean_difference"]) - 0.1) < 1e-9 and rows[0]["significant"] == "True"
    assert abs(float(rows[2]["mean_difference"]) + 0.1) < 1e-9  # loss is 2 - score: 0.1 lower
    # Against the homogeneous baseline, as before.
    assert "| flexlora | +0.1500 [+0.1500, +0.1500] sd 0.0000 (examples only [+0.1500, +0.1500]) |" in md


def test_the_report_sets_a_method_variant_against_the_plain_method(tmp_path):
    # Stage 4's question is whether replication padding beats HetLoRA's own zero padding: the
    # report gives that paired difference, variant minus plain method, per profile and metric.
    base = [0.1 * (i % 5) for i in range(40)]
    scores = {}
    for seed in (0, 1):
        scores[("fedit", seed)] = base
        scores[("hetlora", seed)] = [v + 0.05 for v in base]
        scores[("hetlora:padding=replication", seed)] = [v + 0.02 for v in base]  # 0.03 below zero padding
    write_finished_grid(tmp_path, scores)
    md = write_report(tmp_path, echo=None).read_text()
    assert "### Difference against the method without the variant's arguments, with 95% intervals" in md
    assert "| hetlora:padding=replication − hetlora | -0.0300 [-0.0300, -0.0300] sd 0.0000" in md
    rows = list(csv.DictReader((tmp_path / "differences_variants.csv").open()))
    assert [(r["method"], r["against"], r["metric"]) for r in rows] == [
        ("hetlora:padding=replication", "hetlora", m) for m in ("rougeL_generated", "rougeL_teacher_forced", "eval_loss")
    ]
    assert abs(float(rows[0]["mean_difference"]) + 0.03) < 1e-9 and rows[0]["significant"] == "True"


def test_significance_follows_the_interval_that_resamples_seeds(tmp_path):
    # Seeds that disagree (as FlexLoRA − FedIT under heavy-tail-strong did on NI: +0.041, +0.038,
    # −0.048): over the test examples alone the mean gain looks certain, over seeds it is not.
    base = [0.1 * (i % 5) + 0.001 * (i % 7) for i in range(300)]
    scores = {}
    for seed, gain in enumerate((0.04, 0.04, -0.05)):
        scores[("fedit", seed)] = base
        scores[("flexlora", seed)] = [v + gain + 0.01 * ((i * (seed + 1)) % 5 - 2) for i, v in enumerate(base)]
    write_finished_grid(tmp_path, scores)
    md = write_report(tmp_path, echo=None).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| flexlora | +0.0100 ["))
    assert row.endswith("**n.s.** |") and "(examples only [+0.0" in row
    assert "Significant over the test examples only, not once seeds are resampled: flexlora uniform rougeL_generated" in md
    d = {r["metric"]: r for r in csv.DictReader((tmp_path / "differences.csv").open())}["rougeL_generated"]
    assert d["significant"] == "False" and d["significant_examples_only"] == "True"
    assert float(d["ci95_low"]) < 0 < float(d["ci95_examples_low"]) < float(d["ci95_examples_high"]) < float(d["ci95_high"])
    assert [round(float(x), 6) for x in d["per_seed"].split()] == [0.04, 0.04, -0.05]


def test_a_gain_that_lives_in_one_held_out_category_is_not_significant_over_tasks(tmp_path):
    # FlexLoRA − FLoRA on NI had this shape: most of the gain from two of nine categories.
    # Resampling test examples calls it significant; resampling the categories does not.
    base = [0.05 * (i % 7) for i in range(180)]
    scores = {}
    for seed in (0, 1, 2):
        scores[("fedit", seed)] = base
        scores[("flexlora", seed)] = [v + (0.3 if i < 20 else -0.005) + 0.001 * seed for i, v in enumerate(base)]
    write_finished_grid(tmp_path, scores, categories=lambda i: f"Category {'ABCDEFGHI'[i // 20]} {100 + i // 2}.json")
    md = write_report(tmp_path, echo=None).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| flexlora | +0.0299 ["))
    assert "(seeds and categories [-0.0" in row and row.endswith("**n.s.** |")
    assert "resamples the seeds and then the 9 held-out task categories" in md and "significant only when both exclude 0" in md
    assert "(180 paired test examples from 9 held-out categories, 3 seed(s)" in md
    assert (
        "Significant with seeds and examples resampled, not once the held-out categories are resampled: "
        "flexlora uniform rougeL_generated" in md
    )
    d = {r["metric"]: r for r in csv.DictReader((tmp_path / "differences.csv").open())}["rougeL_generated"]
    assert d["significant_by"] == "seeds and examples and seeds and categories" and d["categories"] == "9"
    assert d["significant"] == "False" and d["significant_seeds_examples"] == "True"
    assert float(d["ci95_categories_low"]) < 0 < float(d["ci95_low"])
    # The seeds agree (+0.0289, +0.0299, +0.0309): two seeds would do; the categories are what
    # the grid lacks, and the report says the seed count leaves them as they are.
    assert (
        "| flexlora − fedit (homo) | uniform | +0.0299 | 0.0010 | 3 | no (seeds and examples and seeds and categories) | 2 | 2 |"
        in md
    )
    assert "more seeds leave its category part as wide as it is" in md
    assert (d["seeds_to_exclude_0"], d["seeds_for_80pct_power"]) == ("2", "2")


def test_with_one_seed_the_report_says_the_two_intervals_are_one(tmp_path):
    base = [0.1 * (i % 5) for i in range(40)]
    write_finished_grid(tmp_path, {("fedit", 0): base, ("flexlora", 0): [v + 0.02 * (i % 3) for i, v in enumerate(base)]})
    md = write_report(tmp_path, echo=None).read_text()
    assert "1 seed(s) in the first row's cells (one seed: the two-level interval is the examples-only one)" in md
    d = {r["metric"]: r for r in csv.DictReader((tmp_path / "differences.csv").open())}["rougeL_generated"]
    assert (d["ci95_low"], d["ci95_high"]) == (d["ci95_examples_low"], d["ci95_examples_high"])


def test_a_difference_over_fewer_seeds_than_the_grid_says_so(tmp_path):
    # A method added to a grid runs seed 0 first: its paired difference rests on one seed while
    # the others' rest on three, and its entry must say so.
    base = [0.1 * (i % 5) for i in range(40)]
    scores = {("fedit", s): base for s in (0, 1, 2)}
    scores.update({("flexlora", s): [v + 0.02 for v in base] for s in (0, 1, 2)})
    scores[("hetlora", 0)] = [v + 0.01 for v in base]
    write_finished_grid(tmp_path, scores)
    md = write_report(tmp_path, echo=None).read_text()
    assert "| hetlora | +0.0100 [+0.0100, +0.0100] (1 of 3 seeds) |" in md
    assert "| flexlora | +0.0200 [+0.0200, +0.0200] sd 0.0000 (examples only [+0.0200, +0.0200]) |" in md
    assert "| flexlora − hetlora | +0.0100 [+0.0100, +0.0100] (1 of 3 seeds) |" in md
    # One seed has no spread over seeds: the report says so instead of a number of seeds.
    assert (
        "| hetlora − fedit (homo) | uniform | +0.0100 | 0.0000 | 1 | yes (seeds and examples) | "
        "– (1 seed: no spread) | – (1 seed: no spread) |" in md
    )


def test_a_report_interrupted_while_writing_leaves_each_previous_file_whole(tmp_path, monkeypatch):
    # Two grid processes finishing cells at the same moment, or one killed mid-report, must not
    # leave a truncated or mixed file: each report file is replaced whole or not at all.
    base = [0.1 * (i % 5) for i in range(20)]
    write_finished_grid(tmp_path, {("fedit", 0): base, ("hetlora", 0): base, ("flexlora", 0): [v + 0.1 for v in base]})
    write_report(tmp_path, echo=None)
    before = {name: (tmp_path / name).read_text() for name in ("compare.md", "differences.csv", "differences_flexlora.csv")}

    def crash(d):
        raise RuntimeError("killed while writing the differences")

    monkeypatch.setattr("flexlora.analysis.differences._difference_cells", crash)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, echo=None)
    for name, text in before.items():
        assert (tmp_path / name).read_text() == text, name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
