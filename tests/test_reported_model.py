"""What a run reports is what it saves (`flexlora eval --run` reproduces summary.json), an
evaluation-only data folder needs no training clients, and FLoRA is evaluated on base + offset."""

import json

import pytest
import torch
from test_compare import write_ni_fixture

from flexlora import lora
from flexlora.cli import main
from flexlora.config import load_config
from flexlora.engines.local import local_runtime
from flexlora.evaluation import evaluate
from flexlora.experiment import Experiment, run_evaluation

BASE = [
    "model=tiny-llama",
    "device=cpu",
    "data.source=natural-instructions",
    "data.heldout_categories=[Mathematics]",
    "data.cutoff_len=256",
    "federation.rounds=2",
    "federation.clients_per_round=3",
    "train.steps=2",
    "train.batch_size=2",
    "train.lr=0.01",
    "eval.max_new_tokens=3",
    "resources.t1=2",
    "resources.t2=4",
    "resources.t3_attention=4",
    "resources.t3_mlp=8",
    "resources.t4=8",
]


def test_eval_of_the_saved_adapter_reproduces_the_summary(tmp_path):
    data = write_ni_fixture(tmp_path / "ni")
    run = tmp_path / "runs" / "r"
    # Default export rank (the largest client rank, 8): ΔW of 3 clients has a higher rank, so
    # evaluating the full ΔW would describe a model that is never written.
    assert (
        main(["run", *BASE, f"data.path={data}", "resources.profile=uniform", f"output.dir={run.parent}", "output.name=r"]) == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["rougeL_generated"] == pytest.approx(summary["final"], abs=1e-9)
    assert again["rougeL_teacher_forced"] == pytest.approx(summary["final_teacher_forced"], abs=1e-9)
    assert again["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert summary["final_eval_loss"] != pytest.approx(summary["zero_shot_eval_loss"], rel=1e-4)  # it trained
    assert summary["adapter"] and "rank 8" in summary["evaluated"]


@pytest.mark.parametrize("clients", ["heldout", "all"])
def test_eval_of_a_folder_whose_clients_are_all_held_out(tmp_path, clients):
    data = write_ni_fixture(tmp_path / "ni")
    ids = "[1, 2, 4, 5, 9, 11, 20, 21]"
    cfg = load_config(overrides=[*BASE, f"data.path={data}", f"data.heldout_ids={ids}"])
    metrics = run_evaluation(cfg, None, clients=clients, echo=lambda *_: None)
    assert metrics["num_examples"] == 8 and len(metrics["per_client"]) == 8


def test_flora_is_evaluated_on_base_plus_offset(tmp_path):
    data = write_ni_fixture(tmp_path / "ni")
    cfg = load_config(
        overrides=[
            *BASE,
            f"data.path={data}",
            "method=flora",
            "federation.rounds=1",
            f"output.dir={tmp_path / 'runs'}",
            "output.name=f",
        ]
    )
    exp = Experiment(cfg, echo=lambda *_: None)
    exp.make_server([c.client_id for c in exp.dataset.clients])
    exp.run(local_runtime(exp))
    reported = exp.history[1]["eval"]
    offset = exp.server.base_offset()
    assert offset and exp.server.global_adapter() == (None, None)  # FLoRA's model is all offset
    layers = lora.target_layers(exp.model, list(offset))
    with torch.no_grad():  # merge the offset by hand and evaluate the bare model
        for name, delta in offset.items():
            lora.weight_matrix(layers[name]).add_(delta)
    by_hand = evaluate(
        exp.model,
        exp.tokenizer,
        exp.dataset.heldout,
        factors=None,
        ranks=None,
        alpha=cfg.lora.alpha,
        target_modules=exp.target_modules,
        template=cfg.data.template,
        cutoff_len=cfg.data.cutoff_len,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )
    assert reported["eval_loss"] == pytest.approx(by_hand["eval_loss"], rel=1e-5)
    assert reported["eval_loss"] != pytest.approx(exp.history[0]["eval"]["eval_loss"], rel=1e-4)
