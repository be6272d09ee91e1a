"""The comparison grid end to end on the tiny model and a small NI-layout folder written here,
`flexlora eval` on its adapter, and held-out clients never reaching training."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import threading
import time

import pytest
import yaml

from flexlora.cli import main
from flexlora.compare import Cell, _fmt, grid_cells, write_report


def write_ni_fixture(folder):
    """Eight clients in the NI per-client layout; ids not contiguous; two categories."""
    folder.mkdir(parents=True)
    meta = {}
    for k, cid in enumerate([1, 2, 4, 5, 9, 11, 20, 21]):
        category = "Mathematics 8.json" if cid in (20, 21) else f"Word Analogy {cid}.json"
        train = [{"instruction": "Answer with one word.", "input": f"x{cid}{i}", "output": f"y{cid}", "category": category} for i in range(4)]
        test = [{"instruction": "Answer with one word.", "input": f"t{cid}", "output": f"y{cid}", "category": category}]
        (folder / f"local_training_{cid}.json").write_text(json.dumps(train))
        (folder / f"local_test_{cid}.json").write_text(json.dumps(test))
        meta[str(cid)] = {"category": category, "train_examples_in_source": 10 + k, "holdout": False}
    (folder / "clients.json").write_text(json.dumps(meta))
    return folder


def tiny_grid_overrides(tmp_path):
    data = write_ni_fixture(tmp_path / "ni")
    return [
        "model=tiny-llama", "device=cpu",
        "data.source=natural-instructions", f"data.path={data}", "data.heldout_categories=[Mathematics]",
        "data.cutoff_len=256", "federation.rounds=2", "federation.clients_per_round=3",
        "train.steps=1", "train.batch_size=2", "eval.max_new_tokens=3",
        "eval.export_rank=1000",  # export the whole global ΔW, so `flexlora eval` reproduces the run's score
        "resources.t1=2", "resources.t2=4", "resources.t3_attention=4", "resources.t3_mlp=8", "resources.t4=8",
    ]


def test_grid_cells_run_fedit_once_per_seed():
    cells = grid_cells(["fedit", "flexlora"], ["uniform", "heavy-tail-strong"], [0, 1])
    assert [c.name for c in cells] == [
        "fedit-homo-seed0", "flexlora-uniform-seed0", "flexlora-heavy-tail-strong-seed0",
        "fedit-homo-seed1", "flexlora-uniform-seed1", "flexlora-heavy-tail-strong-seed1",
    ]


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
    settings = {"model": "tiny-llama", "data": {"source": "natural-instructions", "path": "ni"},
                "federation": {"rounds": 1, "clients_per_round": 2}, "train": {"steps": 1, "batch_size": 1},
                "eval": {"max_new_tokens": 2}}
    (out / "cells").mkdir(parents=True)
    (out / "grid.json").write_text(json.dumps({"settings": settings, "cells": cells, "baseline": "fedit"}))
    for cell in cells:
        values = scores[(cell["method"], cell["seed"])]
        per_example = [{"client": f"c{i % 3}", "index": i, "rougeL_generated": v, "rougeL_teacher_forced": v,
                        "loss": 2.0 - v, "tokens": 1} for i, v in enumerate(values)]
        mean = sum(values) / len(values)
        ev = {"rougeL_generated": mean, "rougeL_teacher_forced": mean, "eval_loss": 2.0 - mean, "per_example": per_example}
        if categories:
            for i, e in enumerate(per_example):
                e["client"], e["index"] = f"k{i // 2}", i % 2
            ev["per_client"] = {f"k{i // 2}": {"category": categories(i)} for i in range(len(values))}
        folder = out / "cells" / Cell(**cell).name
        folder.mkdir()
        (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "eval": ev}) + "\n")
        (folder / "summary.json").write_text(json.dumps({
            "final": mean, "best": mean, "zero_shot": 0.0, "zero_shot_teacher_forced": 0.0, "zero_shot_eval_loss": 2.0,
            "final_teacher_forced": mean, "final_eval_loss": 2.0 - mean, "wall_time_s": 1.0, "per_round": {"1": mean}}))


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
        ("hetlora", "rougeL_generated"), ("hetlora", "rougeL_teacher_forced"), ("hetlora", "eval_loss")]
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
        ("hetlora:padding=replication", "hetlora", m) for m in ("rougeL_generated", "rougeL_teacher_forced", "eval_loss")]
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
    assert "resamples the seeds and then the 9 held-out task categories" in md and "significance follows it" in md
    assert "(180 paired test examples from 9 held-out categories, 3 seed(s)" in md
    assert "Significant with seeds and examples resampled, not once the held-out categories are resampled: " \
           "flexlora uniform rougeL_generated" in md
    d = {r["metric"]: r for r in csv.DictReader((tmp_path / "differences.csv").open())}["rougeL_generated"]
    assert d["significant_by"] == "seeds and categories" and d["categories"] == "9"
    assert d["significant"] == "False" and d["significant_seeds_examples"] == "True"
    assert float(d["ci95_categories_low"]) < 0 < float(d["ci95_low"])
    # The seeds agree (+0.0289, +0.0299, +0.0309): two seeds would do; the categories are what
    # the grid lacks, and the report says the seed count leaves them as they are.
    assert "| flexlora − fedit (homo) | uniform | +0.0299 | 0.0010 | 3 | no (seeds and categories) | 2 | 2 |" in md
    assert "more seeds leave its category part as wide as it is" in md
    assert (d["seeds_to_exclude_0"], d["seeds_for_80pct_power"]) == ("2", "2")


def test_with_one_seed_the_report_says_the_two_intervals_are_one(tmp_path):
    base = [0.1 * (i % 5) for i in range(40)]
    write_finished_grid(tmp_path, {("fedit", 0): base, ("flexlora", 0): [v + 0.02 * (i % 3) for i, v in enumerate(base)]})
    md = write_report(tmp_path, echo=None).read_text()
    assert "1 seed(s) in the first row's cells (one seed: the two-level interval is the examples-only one)" in md
    d = {r["metric"]: r for r in csv.DictReader((tmp_path / "differences.csv").open())}["rougeL_generated"]
    assert (d["ci95_low"], d["ci95_high"]) == (d["ci95_examples_low"], d["ci95_examples_high"])


def test_two_cell_grid_end_to_end_resumes_and_never_trains_heldout_clients(tmp_path, capsys):
    overrides = tiny_grid_overrides(tmp_path)
    out = tmp_path / "grid"
    args = ["compare", "--out", str(out), "--methods", "fedit,flexlora", "--profiles", "uniform", "--seeds", "0", *overrides]
    assert main(args) == 0
    cells = out / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["fedit-homo-seed0", "flexlora-uniform-seed0"]

    heldout = {"20", "21"}
    for cell in cells.iterdir():
        data = json.loads((cell / "data.json").read_text())
        assert set(data["heldout_clients"]) == heldout
        records = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
        trained = {cid for r in records[1:] for cid in r["clients"]}
        assert trained and not trained & heldout  # held-out clients never train
        assert records[-1]["eval"]["per_category"].keys() == {"Mathematics"}
    # Both cells sampled the same clients each round (same seed).
    rounds = [[sorted(json.loads(l)["clients"]) for l in (c / "metrics.jsonl").read_text().splitlines()[1:]] for c in cells.iterdir()]
    assert rounds[0] == rounds[1]
    flex = [json.loads(l) for l in (cells / "flexlora-uniform-seed0" / "metrics.jsonl").read_text().splitlines()]
    trunc = flex[1]["truncation"]
    assert set(trunc) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for by_rank in trunc.values():
        for v in by_rank.values():
            assert 0 <= v["err"] <= v["err_max"] <= 1 and 0 <= v["kept"] <= 1

    md = (out / "compare.md").read_text()
    assert "| fedit (homo) |" in md and "| flexlora |" in md and "Improvement over fedit (homo)" in md
    assert "What truncation costs" in md and "flexlora compare --out" in md
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["method"], r["profile"]) for r in rows] == [("fedit (homo)", "uniform"), ("flexlora", "uniform")]
    flex_row = rows[1]
    fedit_final = json.loads((cells / "fedit-homo-seed0" / "summary.json").read_text())["final"]
    flex_final = json.loads((cells / "flexlora-uniform-seed0" / "summary.json").read_text())["final"]
    assert abs(float(flex_row["delta_vs_fedit_mean"]) - (flex_final - fedit_final)) < 1e-6
    assert (out / "forest.png").stat().st_size > 1000 and (out / "scores.png").stat().st_size > 1000
    # The paired difference with its bootstrap interval, recomputed here from the per-example scores.
    assert "Difference against fedit (homo), with 95% intervals" in md
    diffs = {r["metric"]: r for r in csv.DictReader((out / "differences.csv").open())}
    assert set(diffs) == {"rougeL_generated", "rougeL_teacher_forced", "eval_loss"}
    last = {name: [json.loads(l) for l in (cells / name / "metrics.jsonl").read_text().splitlines()][-1]["eval"]
            for name in ("fedit-homo-seed0", "flexlora-uniform-seed0")}
    per = {name: {(e["client"], e["index"]): e for e in ev["per_example"]} for name, ev in last.items()}
    gain = [per["flexlora-uniform-seed0"][k]["rougeL_generated"] - per["fedit-homo-seed0"][k]["rougeL_generated"] for k in per["fedit-homo-seed0"]]
    d = diffs["rougeL_generated"]
    assert abs(float(d["mean_minus_fedit"]) - sum(gain) / len(gain)) < 1e-6 and int(d["examples"]) == len(gain) == 2
    assert float(d["ci95_low"]) <= float(d["mean_minus_fedit"]) <= float(d["ci95_high"])
    assert (d["significant"] == "True") == (not float(d["ci95_low"]) <= 0 <= float(d["ci95_high"]))
    capsys.readouterr()

    # Resuming runs nothing that is done; a finished cell is never redone.
    stamp = (cells / "fedit-homo-seed0" / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "2 cells (2 done)" in capsys.readouterr().out
    assert (cells / "fedit-homo-seed0" / "summary.json").stat().st_mtime_ns == stamp

    # A cell killed after its last round (no summary yet) resumes from its checkpoint.
    flex_dir = cells / "flexlora-uniform-seed0"
    (flex_dir / "summary.json").unlink()
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((flex_dir / "summary.json").read_text())["final"] == flex_final
    assert [json.loads(l)["round"] for l in (flex_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]

    # The same folder with other base settings is refused.
    assert main([*args, "train.lr=0.1"]) == 2
    assert "holds a grid run with other settings (train.lr differs)" in capsys.readouterr().err

    # `flexlora eval` of a cell's saved adapter on the same held-out clients reproduces its final score.
    metrics_path = tmp_path / "eval.json"
    assert main(["eval", "--run", str(cells / "flexlora-uniform-seed0"), "--out", str(metrics_path)]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert abs(metrics["rougeL_generated"] - flex_final) < 1e-6
    assert abs(metrics["eval_loss"] - flex[-1]["eval"]["eval_loss"]) < 1e-4
    assert main(["eval", "--run", str(cells / "flexlora-uniform-seed0"), "--base", "--clients", "training"]) == 0
    assert "base model tiny-llama on 6 training clients" in capsys.readouterr().out


def test_eval_needs_an_adapter_or_base(tmp_path, capsys):
    assert main(["eval", "model=tiny-llama"]) == 2
    assert "needs --adapter DIR, --run RUN_DIR or --base" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path), "model=tiny-llama"]) == 2
    assert "is not a PEFT adapter folder" in capsys.readouterr().err


def test_chat_template_without_one_fails_before_training(tmp_path, capsys):
    overrides = tiny_grid_overrides(tmp_path)
    assert main(["run", *overrides, "data.template=chat", f"output.dir={tmp_path / 'runs'}", "output.name=x"]) == 2
    assert "data.template: model tiny-llama has no chat template" in capsys.readouterr().err


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
    assert "| hetlora − fedit (homo) | uniform | +0.0100 | 0.0000 | 1 | yes (seeds and examples) | " \
           "– (1 seed: no spread) | – (1 seed: no spread) |" in md


def _compare_ni_script(tmp_path, finals, **env):
    """scripts/compare_ni.sh (stage 3 unless env sets STAGES) in a copy of the repository layout,
    with stage 2's cells written from `finals` ({(method, profile, seed): Rouge-L}) and `flexlora` replaced by a
    recorder of its arguments."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(repo / "scripts" / "compare_ni.sh", tmp_path / "scripts" / "compare_ni.sh")
    for (method, profile, seed), final in finals.items():
        cell = tmp_path / "docs" / "compare_ni" / "cells" / f"{method}-{profile}-seed{seed}"
        cell.mkdir(parents=True)
        (cell / "summary.json").write_text(json.dumps({"final": final}))
    recorder = tmp_path / "flexlora"
    recorder.write_text('#!/usr/bin/env bash\necho "flexlora $*"\n')
    recorder.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DISTRIBUTION_RIVAL", "STAGE3_METHODS")} | {"STAGES": "3", "FLEXLORA": str(recorder)} | env
    return subprocess.run(["bash", str(tmp_path / "scripts" / "compare_ni.sh")], env=env, capture_output=True, text=True)


def _every_stage_two_cell(final):
    return {(m, p, s): final for m in ["fedex", "florist", "raflora", "lora_a2"]
            for p in ["heavy-tail-light", "heavy-tail-strong"] for s in range(3)}


def test_stage_three_runs_flexlora_against_the_new_method_with_the_best_mean_score(tmp_path):
    # florist wins on the mean over its 6 cells although raflora has the single best cell
    finals = _every_stage_two_cell(0.20)
    finals |= {cell: 0.25 for cell in _every_stage_two_cell(0) if cell[0] == "florist"}
    finals[("raflora", "heavy-tail-strong", 1)] = 0.40
    run = _compare_ni_script(tmp_path, finals)
    assert run.returncode == 0, run.stderr
    assert "--methods flexlora,florist --profiles log-uniform-8-200 --seeds 0,1,2" in run.stdout


def test_stage_three_refuses_to_pick_before_stage_two_is_done(tmp_path):
    finals = _every_stage_two_cell(0.20)
    del finals[("fedex", "heavy-tail-strong", 2)]
    run = _compare_ni_script(tmp_path, finals)
    assert run.returncode != 0
    assert "not finished: fedex-heavy-tail-strong-seed2" in run.stderr
    assert "flexlora compare" not in run.stdout


def test_stage_three_splits_into_flexlora_and_the_rival(tmp_path):
    """Two processes share the stage: FlexLoRA's cells need no stage-2 result, the rival's do."""
    finals = _every_stage_two_cell(0.20)
    finals |= {cell: 0.25 for cell in _every_stage_two_cell(0) if cell[0] == "lora_a2"}
    del finals[("fedex", "heavy-tail-strong", 2)]
    alone = _compare_ni_script(tmp_path / "flexlora", finals, STAGE3_METHODS="flexlora")
    assert alone.returncode == 0, alone.stderr
    assert "--methods flexlora --profiles log-uniform-8-200" in alone.stdout
    assert _compare_ni_script(tmp_path / "early", finals, STAGE3_METHODS="rival").returncode != 0
    finals[("fedex", "heavy-tail-strong", 2)] = 0.20
    rival = _compare_ni_script(tmp_path / "rival", finals, STAGE3_METHODS="rival")
    assert rival.returncode == 0, rival.stderr
    assert "--methods lora_a2 --profiles log-uniform-8-200" in rival.stdout
    wrong = _compare_ni_script(tmp_path / "wrong", finals, STAGE3_METHODS="flexlora,best")
    assert wrong.returncode == 2 and "STAGE3_METHODS: unknown 'best'" in wrong.stderr


def test_a_method_variant_runs_in_cells_of_its_own_with_its_method_args(tmp_path, capsys):
    overrides = [*tiny_grid_overrides(tmp_path), "federation.rounds=1"]
    out = tmp_path / "grid"
    args = ["compare", "--out", str(out), "--methods", "hetlora,hetlora:padding=replication", "--profiles", "uniform",
            "--seeds", "0", "--baseline", "hetlora", *overrides]
    assert main(args) == 0
    cells = out / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["hetlora-padding-replication-uniform-seed0", "hetlora-uniform-seed0"]
    config = {p.name: yaml.safe_load((p / "config.yaml").read_text()) for p in cells.iterdir()}
    assert config["hetlora-padding-replication-uniform-seed0"]["method"] == "hetlora"
    assert config["hetlora-padding-replication-uniform-seed0"]["method_args"] == {"padding": "replication"}
    assert config["hetlora-uniform-seed0"]["method_args"] == {}
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["hetlora", "hetlora:padding=replication"]
    capsys.readouterr()

    # A variant that is not NAME:KEY=VALUE, or whose value the method refuses, stops before any cell runs.
    for spec, message in [("hetlora:padding", "'hetlora:padding' is not NAME or NAME:KEY=VALUE"),
                          ("hetlora:padding=mirror", "method_args: ")]:
        assert main(["compare", "--out", str(tmp_path / "other"), "--methods", spec, "--profiles", "uniform", *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


def test_stage_four_runs_hetlora_with_replication_padding_seed_zero_first(tmp_path):
    run = _compare_ni_script(tmp_path, {}, STAGES="4")
    assert run.returncode == 0, run.stderr
    calls = [line for line in run.stdout.splitlines() if line.startswith("flexlora compare")]
    assert [c.split(" --profiles")[0] for c in calls] == ["flexlora compare --out docs/compare_ni --methods hetlora:padding=replication"] * 2
    assert ["--seeds 0 " in calls[0], "--seeds 1,2 " in calls[1]] == [True, True]


def test_two_processes_adding_cells_to_one_grid_at_once_keep_both(tmp_path, monkeypatch):
    """A stage split over two processes: each reads grid.json, adds its cells and writes it back;
    the second must not write back what it read before the first wrote (its cells would vanish
    from the report)."""
    from flexlora import compare

    write = compare.write_json

    def write_slowly(path, data):  # widen the window between reading grid.json and writing it
        time.sleep(0.3)
        write(path, data)

    monkeypatch.setattr(compare, "write_json", write_slowly)
    errors = []

    def add(method):
        try:
            compare.register_cells(tmp_path, {"model": "tiny-llama"}, [compare.Cell(method, "uniform", 0)], "fedit", f"add {method}")
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(m,)) for m in ("fedex", "florist")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert sorted(c["method"] for c in grid["cells"]) == ["fedex", "florist"]
    assert sorted(grid["commands"]) == ["add fedex", "add florist"]


def test_a_cell_running_in_another_process_is_skipped_not_restarted(tmp_path, capsys):
    from flexlora.runlock import RunLock

    overrides = [*tiny_grid_overrides(tmp_path), "federation.rounds=1"]
    out = tmp_path / "grid"
    busy = RunLock(out / "cells" / "fedit-homo-seed0").acquire()  # as a second process running that cell holds it
    try:
        assert main(["compare", "--out", str(out), "--methods", "fedit,flexlora", "--profiles", "uniform", "--seeds", "0", *overrides]) == 0
    finally:
        busy.release()
    printed = capsys.readouterr().out
    assert "cell fedit-homo-seed0 is running elsewhere" in printed and "in use by pid" in printed
    assert not (out / "cells" / "fedit-homo-seed0" / "config.yaml").exists()  # nothing written into it
    assert (out / "cells" / "flexlora-uniform-seed0" / "summary.json").is_file()


def test_a_cell_another_process_finished_meanwhile_is_not_run_again(tmp_path, monkeypatch, capsys):
    import flexlora.engines

    overrides = [*tiny_grid_overrides(tmp_path), "federation.rounds=1"]
    out = tmp_path / "grid"
    real, ran = flexlora.engines.run_experiment, []

    def run_then_the_other_process_finishes_the_next_cell(cfg, **kwargs):
        ran.append(cfg.output.name)
        run_dir = real(cfg, **kwargs)
        other = out / "cells" / "flexlora-uniform-seed0"  # a finished run folder, as the other process leaves it
        other.mkdir(parents=True)
        for name in ("metrics.jsonl", "summary.json"):
            shutil.copy(run_dir / name, other / name)
        return run_dir

    monkeypatch.setattr(flexlora.engines, "run_experiment", run_then_the_other_process_finishes_the_next_cell)
    assert main(["compare", "--out", str(out), "--methods", "fedit,flexlora", "--profiles", "uniform", "--seeds", "0", *overrides]) == 0
    assert ran == ["fedit-homo-seed0"]
    assert "cell flexlora-uniform-seed0 was finished elsewhere" in capsys.readouterr().out


def test_a_report_interrupted_while_writing_leaves_each_previous_file_whole(tmp_path, monkeypatch):
    # Two grid processes finishing cells at the same moment, or one killed mid-report, must not
    # leave a truncated or mixed file: each report file is replaced whole or not at all.
    base = [0.1 * (i % 5) for i in range(20)]
    write_finished_grid(tmp_path, {("fedit", 0): base, ("hetlora", 0): base, ("flexlora", 0): [v + 0.1 for v in base]})
    write_report(tmp_path, echo=None)
    before = {name: (tmp_path / name).read_text() for name in ("compare.md", "differences.csv", "differences_flexlora.csv")}

    def crash(d):
        raise RuntimeError("killed while writing the differences")

    monkeypatch.setattr("flexlora.compare._difference_cells", crash)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, echo=None)
    for name, text in before.items():
        assert (tmp_path / name).read_text() == text, name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
