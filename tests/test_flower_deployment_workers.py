"""The loopback deployment of tests/test_flower_deployment.py (SuperLink and SuperNodes as
separate processes, TLS with a test CA, registered SuperNode keys), with a node worker beside
each SuperNode (`flexlora node serve`, node config `worker-socket`): two rounds of FlexLoRA on
the tiny model, trained by the workers, and the global adapter checked as there. The harness
(flexlora.bench.loopback.Loopback) stops every process it started by PID."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from tiny_deployment import on_nodes, tiny_flexlora

from flexlora import lora
from flexlora.bench.loopback import BIN, Loopback
from flexlora.data.synthetic import make_federation
from flexlora.models import TINY, load_model

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason=f"flower-superlink not found in {BIN}")


def test_two_rounds_of_flexlora_on_a_loopback_deployment_with_node_workers(tmp_path):
    fed = make_federation(num_clients=2, train_per_client=6, test_per_client=1, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    configs = []
    for c, rank in zip(fed.clients, ({"lora-rank": 8}, {"rank-type": "T1"})):
        path = data / f"{c.client_id}.json"
        path.write_text(json.dumps([{"instruction": e.instruction, "input": e.input, "output": e.output} for e in c.train]))
        configs.append({"data-path": str(path), **rank})
    run_dir = tmp_path / "runs" / "deployed"
    overrides = [*tiny_flexlora(2), *on_nodes(2)]
    with Loopback(
        tmp_path / "fed", configs, ["--model", TINY, "--device", "cpu", "--threads", "1"], {"OMP_NUM_THREADS": "1"}
    ) as fed_:
        fed_.run(overrides, run_dir, timeout_s=600)
        worker_logs = [fed_.procs.log(f"worker-{i}") for i in (1, 2)]
        supernode_logs = [fed_.procs.log(f"supernode-{i}") for i in (1, 2)]

    # Every node's two tasks were trained by its worker (which loaded the model once).
    for i, (log, c) in enumerate(zip(worker_logs, fed.clients), 1):
        assert log.count("loaded tiny-llama (float32, seed 0)") == 1, log[-2000:]
        for r in (1, 2):
            assert re.search(rf"round {r}: client {c.client_id} trained in [0-9.]+ s", log), log[-2000:]
        assert "Receiving: train message" in supernode_logs[i - 1]

    clients = json.loads((run_dir / "clients.json").read_text())
    assert {cid: c["rank_type"] for cid, c in clients.items()} == {fed.clients[0].client_id: "r8", fed.clients[1].client_id: "T1"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert sorted(r["clients"]) == sorted(c.client_id for c in fed.clients) and not r["failures"] and not r["rejected"]
        # Packed both ways, forwarded to the worker as Flower delivered it (see test_node_worker.py).
        assert {m["objects_up"] for m in r["clients"].values()} == {6}
        assert {m["objects_down"] for m in r["clients"].values()} == {6}

    # The global FlexLoRA adapter at full rank (eval.export_rank=64): per module, the sum of the
    # two clients' ranks (8 + 2), a PEFT adapter that changes the model.
    base, _ = load_model(TINY, "cpu")
    ids = torch.arange(12).unsqueeze(0)
    before = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    ranks = lora.get_ranks(peft_model)
    assert ranks and set(ranks.values()) == {8 + 2}
    assert not torch.allclose(peft_model(ids).logits, before)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "flower-deployment" and summary["per_round"].keys() == {"0", "1", "2"}
    for proc in fed_.procs.started:
        assert proc[1].poll() is not None, f"{proc[0]} is still running"
