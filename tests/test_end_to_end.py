"""Two rounds end to end on the tiny model, through the CLI entry point."""

import json

import pytest
import torch
from peft import PeftModel

from flexlora.cli import main
from flexlora.models import TINY, load_model


@pytest.mark.parametrize("method", ["flexlora", "fedit"])
def test_two_rounds_write_a_complete_run_folder(tmp_path, tiny_overrides, method, capsys):
    assert main(["run", *tiny_overrides, f"method={method}", "resources.profile=uniform"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "test"
    assert f"run folder: {run_dir}" in out
    assert "zero-shot" in out and "rougeL_generated" in out

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert len(record["clients"]) == 3
        assert set(record["time"]) >= {"client_training_s", "evaluation_s", "aggregation_s", "other_s"}
        for client in record["clients"].values():
            assert client["rank_type"] in {"T1", "T2", "T3", "T4"}
            assert client["trainable_params"] > 0 and client["train_time_s"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "rougeL_generated"
    assert summary["per_round"].keys() == {"0", "1", "2"}
    assert (run_dir / "metric.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").is_file()

    # The exported global adapter loads with plain PEFT and changes the model's output.
    base, _ = load_model(TINY, "cpu")
    ids = torch.arange(10).unsqueeze(0)
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    assert not torch.allclose(model(ids).logits, before)


def test_existing_run_folder_is_not_overwritten(tmp_path, tiny_overrides, capsys):
    run_dir = tmp_path / "runs" / "test"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("precious\n")
    assert main(["run", *tiny_overrides]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == "precious\n"
