"""Two rounds of every baseline end to end on the tiny model, through the CLI entry point."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flexlora.cli import main
from flexlora.models import TINY, load_model

CASES = {
    # method overrides, what the run exports
    "hetlora": (["method=hetlora", "method_args={prune_threshold: 0.5, weighting: sparsity}"], "adapter"),
    "slora": (["method=slora", "method_args={sparse_rounds: 1, densities: {T1: 0.05}}"], "adapter"),
    "flora": (["method=flora"], "merged"),
    "ffa": (["method=ffa"], "adapter"),
    "flexlora+fedadam+fedprox": (
        [
            "method=flexlora",
            "method_args={server_opt: {name: fedadam, lr: 0.001}, fedprox_mu: 0.01}",
            "train.optimizer=sgd",
            "train.lr=0.01",
        ],
        "adapter",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_baseline_two_rounds(tmp_path, tiny_overrides, case, capsys):
    overrides, export = CASES[case]
    args = [*tiny_overrides, "resources.profile=uniform", "federation.clients_per_round=2", "train.steps=1", *overrides]
    assert main(["run", *args]) == 0
    run_dir = tmp_path / "runs" / "test"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert len(record["clients"]) == 2 and not record["failures"], record["failures"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == overrides[0].split("=")[1]

    base, _ = load_model(TINY, "cpu")
    ids = torch.arange(10).unsqueeze(0)
    before = base(ids).logits
    if export == "adapter":
        assert summary["adapter"] and summary["merged_model"] is None
        after = PeftModel.from_pretrained(base, str(run_dir / "adapter"))(ids).logits
    else:  # FLoRA's global model is base + merged offset: exported as full weights
        assert summary["merged_model"] and summary["adapter"] is None
        after = AutoModelForCausalLM.from_pretrained(run_dir / "merged")(ids).logits
    assert not torch.allclose(after, before)
    if case == "slora":  # round 1 was the sparse stage: its clients sent deltas, not factors
        assert records[1]["clients"]
        assert all(c["trainable_params"] > 0 for c in records[1]["clients"].values())
