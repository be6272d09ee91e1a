"""Client failures on the real in-process runtime (tiny model): injected dropout, timeouts,
crashing clients; resuming a finished run and bad resumes; --overwrite; no pickle."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import yaml
from conftest import smallest_run

from flexlora.cli import main
from flexlora.client import ClientTask
from flexlora.config import load_config
from flexlora.data.types import ClientData, Example
from flexlora.engines.local import LocalRuntime
from flexlora.models import TINY, load_model
from flexlora.server import FederatedServer


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """A 5-round run, 4 of 6 clients a round, each sampled client failing with probability 0.3
    (seed 2 draws 7 failures in 20 client-rounds, at least one in every round)."""
    out = tmp_path_factory.mktemp("dropout")
    overrides = [
        "seed=2",
        *smallest_run(clients=6, rounds=5, per_round=4),
        "federation.dropout_rate=0.3",
        f"output.dir={out}",
        "output.name=run",
    ]
    assert main(["run", *overrides]) == 0
    return out / "run", overrides


def test_30_percent_dropout_over_several_rounds_completes(dropout_run):
    run_dir, overrides = dropout_run
    cfg = load_config(overrides=overrides)
    rec = records(run_dir)
    assert [r["round"] for r in rec] == [0, 1, 2, 3, 4, 5]
    # Which clients fail is a seeded draw per (seed, round, client): recompute it independently.
    expected = {
        r: {
            c
            for c in FederatedServer(cfg, [f"syn-{i:03d}" for i in range(6)], {"m": (4, 4)}).sample(r)
            if random.Random(f"dropout-{cfg.seed}-{r}-{c}").random() < 0.3
        }
        for r in range(1, 6)
    }
    assert sum(map(len, expected.values())) == 7 and all(expected.values())
    for r in rec[1:]:
        assert set(r["failures"]) == expected[r["round"]]
        assert all("InjectedFailure" in reason and "\n" not in reason for reason in r["failures"].values())
        assert len(r["clients"]) == 4 - len(r["failures"]) == r["valid_updates"]
        assert r["kept_previous_state"] == (r["valid_updates"] == 0)
        assert r["eval"] is not None
    assert json.loads((run_dir / "summary.json").read_text())["adapter"]
    assert (run_dir / "checkpoint" / "checkpoint.json").is_file()


def test_resuming_a_finished_run_changes_nothing(dropout_run, capsys):
    run_dir, _ = dropout_run
    before = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "after round 5 of 5" in capsys.readouterr().out
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert [r["round"] for r in records(run_dir)] == [0, 1, 2, 3, 4, 5]


def test_bad_resumes_are_one_line_errors(dropout_run, tmp_path, capsys):
    run_dir, _ = dropout_run

    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    fails(["run", "--resume", str(tmp_path / "nowhere")], "is not a run folder (no config.yaml)")
    fails(["run", "--resume", str(run_dir), "method=fedit"], "'method' cannot be changed when resuming")
    fails(["run", "--resume", str(run_dir), "--overwrite"], "cannot be combined with it")
    fails(["run", "--resume", str(run_dir), "federation.rounds=2"], "the checkpoint is already at round 5")

    # A config.yaml edited after the run started, and a truncated checkpoint, on a copy.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.5
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    fails(["run", "--resume", str(copy)], "--resume: train.lr is 0.5 but the checkpoint was written with 0.0003")
    cfg["train"]["lr"] = 0.0003
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    state = next((copy / "checkpoint").glob("state-*.safetensors"))
    state.write_bytes(state.read_bytes()[:1000])
    fails(["run", "--resume", str(copy)], "are missing or truncated")


def test_timeout_and_crash_become_dropouts(tmp_path):
    model, tokenizer = load_model(TINY, "cpu")
    cfg = load_config(overrides=["model=tiny-llama", "device=cpu", "train.steps=3", "train.batch_size=1", "data.cutoff_len=64"])
    ex = Example("Repeat.", "abc", "abc")
    clients = [ClientData("ok", "t", [ex, ex]), ClientData("slow", "t", [ex, ex]), ClientData("empty", "t", [])]
    runtime = LocalRuntime(model, tokenizer, clients, cfg, ["q_proj", "v_proj"])
    ranks = {f"model.layers.{i}.self_attn.{m}": 2 for i in range(4) for m in ("q_proj", "v_proj")}

    def task(cid, **options):
        return ClientTask(cid, 1, "T1", ranks, None, seed=1, options=options)

    wrong = {m: (torch.zeros(3, 256), torch.zeros(256, 3)) for m in ranks}  # rank 3, adapter has 2
    results = list(
        runtime.train(
            [
                task("ok", timeout_s=600.0),
                task("slow", timeout_s=1e-9),
                task("empty"),
                task("ok", inject_failure=True),
                dataclasses.replace(task("ok"), factors=wrong),
            ]
        )
    )
    assert [type(r).__name__ for r in results] == ["ClientUpdate"] + ["ClientFailure"] * 4
    assert "ClientTimeout" in results[1].reason and "timed out after 1e-09 s at step 0/3" in results[1].reason
    assert "no training examples" in results[2].reason
    assert "InjectedFailure" in results[3].reason
    assert "do not fit the adapter" in results[4].reason
    # Failed clients left the shared model clean, and the next client trains as the first did.
    assert not any("lora" in name for name, _ in model.named_modules())
    (again,) = runtime.train([task("ok")])
    assert all(torch.equal(a, b) for m in ranks for a, b in zip(results[0].factors[m], again.factors[m]))
    assert all(not p.requires_grad for p in model.parameters())


def test_all_clients_timing_out_keeps_the_base_model(tmp_path, tiny_overrides):
    assert main(["run", *tiny_overrides, "federation.rounds=1", "federation.client_timeout_s=1e-9"]) == 0
    rec = records(tmp_path / "runs" / "test")
    assert rec[1]["valid_updates"] == 0 and rec[1]["kept_previous_state"] is True
    assert len(rec[1]["failures"]) == 3 and all("timed out" in r for r in rec[1]["failures"].values())
    assert rec[1]["eval"]["rougeL_generated"] == rec[0]["eval"]["rougeL_generated"]
    assert json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())["adapter"] is None


def test_overwrite_flag_replaces_an_existing_run_folder(tmp_path, tiny_overrides):
    run_dir = tmp_path / "runs" / "test"
    run_dir.mkdir(parents=True)
    (run_dir / "old.txt").write_text("old run")
    assert main(["run", *tiny_overrides, "federation.rounds=1", "--overwrite"]) == 0
    assert not (run_dir / "old.txt").exists() and (run_dir / "summary.json").is_file()


def test_no_pickle_anywhere_in_the_package():
    """Tensors at rest and on the wire go through safetensors / Flower Arrays; torch.load is
    only allowed with weights_only=True."""
    import re
    from pathlib import Path

    import flexlora

    for path in Path(flexlora.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "torch.save(" not in text, path
