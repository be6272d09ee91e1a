"""The comparison grid end to end on the tiny model and a small NI-layout folder written here,
`flexlora eval` on its adapter, and held-out clients never reaching training. The report from
grid folders written without training: test_compare_report.py."""

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

from flexlora.analysis.cells import grid_cells
from flexlora.cli import main


def write_ni_fixture(folder):
    """Eight clients in the NI per-client layout; ids not contiguous; two categories."""
    folder.mkdir(parents=True)
    meta = {}
    for k, cid in enumerate([1, 2, 4, 5, 9, 11, 20, 21]):
        category = "Mathematics 8.json" if cid in (20, 21) else f"Word Analogy {cid}.json"
        train = [
            {"instruction": "Answer with one word.", "input": f"x{cid}{i}", "output": f"y{cid}", "category": category}
            for i in range(4)
        ]
        test = [{"instruction": "Answer with one word.", "input": f"t{cid}", "output": f"y{cid}", "category": category}]
        (folder / f"local_training_{cid}.json").write_text(json.dumps(train))
        (folder / f"local_test_{cid}.json").write_text(json.dumps(test))
        meta[str(cid)] = {"category": category, "train_examples_in_source": 10 + k, "holdout": False}
    (folder / "clients.json").write_text(json.dumps(meta))
    return folder


def tiny_grid_overrides(tmp_path):
    data = write_ni_fixture(tmp_path / "ni")
    return [
        "model=tiny-llama",
        "device=cpu",
        "data.source=natural-instructions",
        f"data.path={data}",
        "data.heldout_categories=[Mathematics]",
        "data.cutoff_len=256",
        "federation.rounds=2",
        "federation.clients_per_round=3",
        "train.steps=1",
        "train.batch_size=2",
        "eval.max_new_tokens=3",
        "eval.export_rank=1000",  # export the whole global ΔW, so `flexlora eval` reproduces the run's score
        "resources.t1=2",
        "resources.t2=4",
        "resources.t3_attention=4",
        "resources.t3_mlp=8",
        "resources.t4=8",
    ]


def test_grid_cells_run_fedit_once_per_seed():
    cells = grid_cells(["fedit", "flexlora"], ["uniform", "heavy-tail-strong"], [0, 1])
    assert [c.name for c in cells] == [
        "fedit-homo-seed0",
        "flexlora-uniform-seed0",
        "flexlora-heavy-tail-strong-seed0",
        "fedit-homo-seed1",
        "flexlora-uniform-seed1",
        "flexlora-heavy-tail-strong-seed1",
    ]


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
    rounds = [
        [sorted(json.loads(l)["clients"]) for l in (c / "metrics.jsonl").read_text().splitlines()[1:]] for c in cells.iterdir()
    ]
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
    last = {
        name: [json.loads(l) for l in (cells / name / "metrics.jsonl").read_text().splitlines()][-1]["eval"]
        for name in ("fedit-homo-seed0", "flexlora-uniform-seed0")
    }
    per = {name: {(e["client"], e["index"]): e for e in ev["per_example"]} for name, ev in last.items()}
    gain = [
        per["flexlora-uniform-seed0"][k]["rougeL_generated"] - per["fedit-homo-seed0"][k]["rougeL_generated"]
        for k in per["fedit-homo-seed0"]
    ]
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


@pytest.mark.parametrize(
    "config, weights, problem",
    [
        ({"r": 4, "lora_alpha": 8}, None, "KeyError: 'peft_type'"),
        ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, b"garbage", "SafetensorError"),
    ],
    ids=["config-without-peft-type", "weights-not-safetensors"],
)
def test_eval_of_a_broken_adapter_folder_is_one_line(tmp_path, capsys, config, weights, problem):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    assert main(["eval", "--adapter", str(folder), "model=tiny-llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--adapter: PEFT cannot load {folder} ({problem}" in err and len(err.splitlines()) == 1


def test_a_report_of_a_folder_that_is_no_grid_or_a_broken_one_is_one_line(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["compare", "--out", str(out), "--report-only"]
    assert main(argv) == 2
    assert f"compare: {out} is not a compare grid folder (no grid.json)" in capsys.readouterr().err
    for content, problem in [("{", "not valid JSON"), ("{}", "not a compare grid file (no 'settings', 'cells')")]:
        out.mkdir(exist_ok=True)
        (out / "grid.json").write_text(content)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{out / 'grid.json'}: {problem}" in err and err.count("\n") == 1, err
    cell = out / "cells" / "flexlora-homo-seed0"
    cell.mkdir(parents=True)
    (out / "grid.json").write_text(json.dumps({"settings": {}, "cells": [{"method": "flexlora", "profile": "homo", "seed": 0}]}))
    (cell / "summary.json").write_text('{"final": ')
    assert main(argv) == 2
    assert f"{cell / 'summary.json'}: not valid JSON" in capsys.readouterr().err
    (cell / "summary.json").write_text('{"final": 0.2}')
    assert main(argv) == 2
    assert f"{cell / 'metrics.jsonl'}: not found" in capsys.readouterr().err


def test_chat_template_without_one_fails_before_training(tmp_path, capsys):
    overrides = tiny_grid_overrides(tmp_path)
    assert main(["run", *overrides, "data.template=chat", f"output.dir={tmp_path / 'runs'}", "output.name=x"]) == 2
    assert "data.template: model tiny-llama has no chat template" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "x").exists()


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
    env = (
        {k: v for k, v in os.environ.items() if k not in ("DISTRIBUTION_RIVAL", "STAGE3_METHODS")}
        | {"STAGES": "3", "FLEXLORA": str(recorder)}
        | env
    )
    return subprocess.run(["bash", str(tmp_path / "scripts" / "compare_ni.sh")], env=env, capture_output=True, text=True)


def _every_stage_two_cell(final):
    return {
        (m, p, s): final
        for m in ["fedex", "florist", "raflora", "lora_a2"]
        for p in ["heavy-tail-light", "heavy-tail-strong"]
        for s in range(3)
    }


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
    args = [
        "compare",
        "--out",
        str(out),
        "--methods",
        "hetlora,hetlora:padding=replication",
        "--profiles",
        "uniform",
        "--seeds",
        "0",
        "--baseline",
        "hetlora",
        *overrides,
    ]
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
    for spec, message in [
        ("hetlora:padding", "'hetlora:padding' is not NAME or NAME:KEY=VALUE"),
        ("hetlora:padding=mirror", "method_args: "),
    ]:
        assert main(["compare", "--out", str(tmp_path / "other"), "--methods", spec, "--profiles", "uniform", *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


def test_stage_four_runs_hetlora_with_replication_padding_seed_zero_first(tmp_path):
    run = _compare_ni_script(tmp_path, {}, STAGES="4")
    assert run.returncode == 0, run.stderr
    calls = [line for line in run.stdout.splitlines() if line.startswith("flexlora compare")]
    assert [c.split(" --profiles")[0] for c in calls] == [
        "flexlora compare --out docs/compare_ni --methods hetlora:padding=replication"
    ] * 2
    assert ["--seeds 0 " in calls[0], "--seeds 1,2 " in calls[1]] == [True, True]


def test_two_processes_adding_cells_to_one_grid_at_once_keep_both(tmp_path, monkeypatch):
    """A stage split over two processes: each reads grid.json, adds its cells and writes it back;
    the second must not write back what it read before the first wrote (its cells would vanish
    from the report)."""
    from flexlora.analysis import cells as compare

    write = compare.write_json

    def write_slowly(path, data):  # widen the window between reading grid.json and writing it
        time.sleep(0.3)
        write(path, data)

    monkeypatch.setattr(compare, "write_json", write_slowly)
    errors = []

    def add(method):
        try:
            compare.register_cells(
                tmp_path, {"model": "tiny-llama"}, [compare.Cell(method, "uniform", 0)], "fedit", f"add {method}"
            )
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
        assert (
            main(
                ["compare", "--out", str(out), "--methods", "fedit,flexlora", "--profiles", "uniform", "--seeds", "0", *overrides]
            )
            == 0
        )
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
    assert (
        main(["compare", "--out", str(out), "--methods", "fedit,flexlora", "--profiles", "uniform", "--seeds", "0", *overrides])
        == 0
    )
    assert ran == ["fedit-homo-seed0"]
    assert "cell flexlora-uniform-seed0 was finished elsewhere" in capsys.readouterr().out
