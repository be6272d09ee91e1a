"""`flexlora run --engine flower` on Flower's simulation engine (Ray actors as ClientApps) gives
the same run as the in-process runtime, with the same seed."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flexlora.cli import main

pytest.importorskip("ray", reason="Flower's simulation engine needs Ray: pip install 'flwr[simulation]==1.41.*'")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_flower_simulation_matches_the_in_process_runtime(tmp_path, tiny_overrides, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith("output.name")] + ["resources.profile=uniform"]
    assert main(["run", *overrides, "output.name=local"]) == 0
    assert main(["run", "--engine", "flower", *overrides, "output.name=flower"]) == 0
    assert "through flower-simulation" in capsys.readouterr().out
    local, flwr = tmp_path / "runs" / "local", tmp_path / "runs" / "flower"

    # Same clients at the same ranks, same rounds, same per-client training and evaluation.
    assert json.loads((local / "clients.json").read_text()) == json.loads((flwr / "clients.json").read_text())
    assert len({c["rank_type"] for c in json.loads((flwr / "clients.json").read_text()).values()}) > 1
    a, b = _records(local), _records(flwr)
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        # Tolerance: the actor trains with as many torch threads as the in-process run (all
        # cores by default), so results agree bit for bit here; 1e-5 leaves room for a
        # different thread count (flower.cpus_per_worker), which reorders float sums.
        assert rb["eval"]["eval_loss"] == pytest.approx(ra["eval"]["eval_loss"], rel=1e-5)
        assert rb["eval"]["rougeL_generated"] == pytest.approx(ra["eval"]["rougeL_generated"], abs=1e-6)
        assert rb["eval"]["rougeL_teacher_forced"] == pytest.approx(ra["eval"]["rougeL_teacher_forced"], abs=1e-6)
        assert ra.get("clients", {}).keys() == rb.get("clients", {}).keys()
        for cid, ma in ra.get("clients", {}).items():
            mb = rb["clients"][cid]
            assert (mb["rank_type"], mb["max_rank"], mb["steps"]) == (ma["rank_type"], ma["max_rank"], ma["steps"])
            assert mb["train_loss_last"] == pytest.approx(ma["train_loss_last"], rel=1e-5)
            # Only the Flower run moves bytes; the reply carries at least the factors.
            assert mb["bytes_up"] >= mb["payload_bytes_up"] > 0 and "bytes_up" not in ma
        assert not rb.get("failures")
    ga, gb = load_file(local / "adapter" / "adapter_model.safetensors"), load_file(flwr / "adapter" / "adapter_model.safetensors")
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6)
    summary = json.loads((flwr / "summary.json").read_text())
    assert summary["engine"] == "flower-simulation"
    assert (flwr / "flwr-home").is_dir()  # Flower's files stay inside the run folder
