"""docs/adding_a_method.md's example method (methods/rolora.py): the docs show the file as it is,
and the method runs end to end on the tiny model, in process and on Flower's simulation engine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexlora.cli import main
from flexlora.config import ExperimentConfig, ResourcesConfig, validate
from flexlora.methods import METHODS, client_hook_types
from flexlora.methods.rolora import AlternatingLoRA, FreezeFactor
from flexlora.protocol import ClientUpdate
from flexlora.server import FederatedServer

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"l0.q_proj": (8, 6), "l0.up_proj": (12, 6)}
CLIENTS = ["c0", "c1", "c2"]


def test_the_docs_show_the_example_file_as_it_is():
    doc = (ROOT / "docs" / "adding_a_method.md").read_text()
    blocks = re.findall(r"```python\n# src/flexlora/methods/rolora.py\n(.*?)```", doc, re.S)
    assert blocks, "docs/adding_a_method.md lost the example's code block"
    assert blocks[0] == (ROOT / "src" / "flexlora" / "methods" / "rolora.py").read_text()


def test_the_example_is_registered_with_its_client_hook():
    assert METHODS["rolora"] is AlternatingLoRA
    assert client_hook_types()["freeze_factor"] is FreezeFactor


def server() -> FederatedServer:
    cfg = ExperimentConfig(method="rolora")
    cfg.resources = ResourcesConfig(profile=["T1", "T2", "T4"], t1=2, t2=3, t3_attention=3, t3_mlp=5, t4=5)
    cfg.federation.clients_per_round = len(CLIENTS)
    validate(cfg)
    return FederatedServer(cfg, CLIENTS, SHAPES)


def trained(task, factor: str, step: float = 0.05) -> ClientUpdate:
    """The factors the task sent with `factor` moved by a step."""
    g = torch.Generator().manual_seed(task.seed)
    factors = {}
    for module, (A, B) in task.factors.items():
        A, B = A.clone(), B.clone()
        target = A if factor == "A" else B
        target += step * torch.randn(target.shape, generator=g)
        factors[module] = (A, B)
    return ClientUpdate(task.client_id, 10, 16.0, factors)


def test_rounds_alternate_and_a_changed_frozen_factor_is_rejected():
    srv = server()
    tasks = srv.configure(1, CLIENTS)
    assert {t.options["freeze_factor"] for t in tasks} == {"A"} and len({t.module_ranks["l0.q_proj"] for t in tasks}) == 1
    # Round 1: every client starts from the shared initial adapter (the same A, B = 0).
    assert all(torch.equal(t.factors["l0.q_proj"][0], tasks[0].factors["l0.q_proj"][0]) for t in tasks)
    updates = [trained(t, "B") for t in tasks]
    updates[1] = trained(tasks[1], "A")  # trained the frozen factor
    valid, rejected = srv.validate(updates, tasks)
    assert list(rejected) == ["c1"] and "A changed although the task froze it" in rejected["c1"]
    outcome = srv.complete_round(1, tasks, [trained(t, "B") for t in tasks])
    assert not outcome.rejected and not outcome.kept_previous_state
    # The average of the products is the product of the averages (A is shared this round).
    module, p = "l0.q_proj", [1 / 3] * 3
    scale = 16.0 / tasks[0].module_ranks[module]
    expected = sum(w * scale * u.factors[module][1] @ u.factors[module][0] for w, u in zip(p, outcome.updates))
    ((A, B),) = [srv.global_adapter()[0][module]]
    torch.testing.assert_close(scale * B @ A, expected, rtol=1e-5, atol=1e-6)
    assert {t.options["freeze_factor"] for t in srv.configure(2, CLIENTS)} == {"B"}


def _run(tmp_path, tiny_overrides, name, *extra):
    overrides = [o for o in tiny_overrides if not o.startswith("output.name")]
    assert main(["run", *extra, *overrides, "resources.profile=uniform", "method=rolora", f"output.name={name}"]) == 0
    run_dir = tmp_path / "runs" / name
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_example_runs_in_process(tmp_path, tiny_overrides):
    run_dir, records = _run(tmp_path, tiny_overrides, "local")
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["valid_updates"] == 3 and not r["rejected"] and not r["failures"]
    assert records[2]["eval"]["eval_loss"] != records[0]["eval"]["eval_loss"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_example_runs_on_flower_simulation_with_the_same_numbers(tmp_path, tiny_overrides):
    pytest.importorskip("ray", reason="Flower's simulation engine needs Ray")
    _, local = _run(tmp_path, tiny_overrides, "local")
    # In a fresh process: Flower creates its home folder (FLWR_HOME) once per process, and
    # tests/test_flower_simulation.py checks that its own run's folder gets it.
    overrides = [o for o in tiny_overrides if not o.startswith("output.name")]
    args = ["run", "--engine", "flower", *overrides, "resources.profile=uniform", "method=rolora", "output.name=flower"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "flexlora.cli", *args], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    flower = [json.loads(line) for line in (tmp_path / "runs" / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in flower] == [0, 1, 2]
    for a, b in zip(local, flower):
        assert b["eval"]["eval_loss"] == pytest.approx(a["eval"]["eval_loss"], rel=1e-5)
        assert not b.get("rejected") and not b.get("failures")
