"""A real Flower deployment on 127.0.0.1: a SuperLink and three SuperNodes as separate processes,
with TLS (a test CA) and CLI-managed SuperNode authentication, running two rounds of FlexLoRA
on the tiny model with clients of three different ranks declared in their node configs.
Every process the test starts is stopped by its PID (its process group) in a `finally`."""

from __future__ import annotations

import json
import subprocess

import psutil
import pytest
import torch
from peft import PeftModel
from tiny_deployment import on_nodes, tiny_flexlora

from flexlora import lora

# The loopback pieces the deployment bench uses too: one copy of process handling and health checks.
from flexlora.bench.loopback import APP, BIN, Processes, flower_env, free_port, superlink_healthy, wait_for
from flexlora.data.synthetic import make_federation
from flexlora.engines.flower.certs import make_node_keys, make_tls_certificates
from flexlora.models import TINY, default_target_modules, load_model
from flexlora.resources import adapter_training_bytes, module_ranks, paper_rank_types, rank_type_for_memory

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason=f"flower-superlink not found in {BIN}")


def test_two_rounds_of_flexlora_on_a_tls_authenticated_loopback_deployment(tmp_path):
    creds = make_tls_certificates(tmp_path / "creds", ["127.0.0.1", "localhost"])
    keys = make_node_keys(tmp_path / "creds", ["node-1", "node-2", "node-3", "rogue"])

    # Each node's own data, in the three layouts a node config may point at.
    fed = make_federation(num_clients=3, train_per_client=6, test_per_client=1, seed=0)
    records = [[{"instruction": e.instruction, "input": e.input, "output": e.output} for e in c.train] for c in fed.clients]
    data = tmp_path / "data"
    (data / "site-3").mkdir(parents=True)
    (data / "site-1.json").write_text(json.dumps(records[0]))
    (data / "site-2.jsonl").write_text("\n".join(json.dumps(r) for r in records[1]))
    (data / "site-3" / "train.json").write_text(json.dumps(records[2]))
    paths = [data / "site-1.json", data / "site-2.jsonl", data / "site-3"]
    n2, n3 = len(records[1]), len(records[2])

    # Node 3 states a memory budget: enough for T3's adapter but not T4's.
    model, _ = load_model(TINY, "cpu")
    shapes = lora.module_shapes(model, default_target_modules(model))
    types = paper_rank_types(2, 4, 4, 16, 16)
    budget_mb = (adapter_training_bytes(module_ranks(types["T3"], shapes), shapes) + 1000) / 2**20
    assert rank_type_for_memory(budget_mb, shapes, types).name == "T3"
    # Node 1's operator also declares a size of 10⁹ examples (it trains on 6): with
    # federation.max_weight_share=0.5 it must get half of the weight, not all of it.
    declared = [
        ("lora-rank=8 num-examples=1000000000", "r8"),
        ('rank-type="T1"', "T1"),
        (f"memory-budget-mb={budget_mb:.6f}", "T3"),
    ]

    port = free_port()
    env = flower_env()

    def home(name: str) -> dict:  # every Flower process gets its own FLWR_HOME in tmp_path
        (tmp_path / "flwr" / name).mkdir(parents=True, exist_ok=True)
        return {**env, "FLWR_HOME": str(tmp_path / "flwr" / name)}

    cli_env = home("cli")
    (tmp_path / "flwr" / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds["ca_cert"]}"\n'
    )
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    try:
        superlink = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(creds["ca_cert"]),
                "--ssl-certfile",
                str(creds["server_cert"]),
                "--ssl-keyfile",
                str(creds["server_key"]),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            home("superlink"),
        )
        wait_for(lambda: superlink_healthy(port, creds["ca_cert"]), 90, "the SuperLink (TLS)", procs, "superlink", superlink)

        for i in (1, 2, 3):
            reg = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(keys[f"node-{i}"][1]), "loopback"],
                env=cli_env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=90,
            )
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr

        for i, (path, (resource, _)) in enumerate(zip(paths, declared), 1):
            procs.start(
                f"supernode-{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--root-certificates",
                    str(creds["ca_cert"]),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--auth-supernode-private-key",
                    str(keys[f"node-{i}"][0]),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f'data-path="{path}" {resource}',
                ],
                home(f"supernode-{i}"),
            )
        # A node whose key was never registered is refused.
        rogue = procs.start(
            "rogue",
            [
                str(BIN / "flower-supernode"),
                "--root-certificates",
                str(creds["ca_cert"]),
                "--superlink",
                f"127.0.0.1:{port}",
                "--auth-supernode-private-key",
                str(keys["rogue"][0]),
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--max-retries",
                "1",
                "--node-config",
                f'data-path="{paths[0]}" client-id="intruder"',
            ],
            home("rogue"),
        )

        run_dir = tmp_path / "runs" / "deployed"
        overrides = [
            *tiny_flexlora(3),
            "federation.max_weight_share=0.5",
            *on_nodes(3, node_wait_s=120),
            f"output.dir={run_dir.parent}",
            f"output.name={run_dir.name}",
        ]
        (tmp_path / "run.toml").write_text(f'overrides = "{" ".join(overrides)}"\n')
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "loopback", "--run-config", str(tmp_path / "run.toml"), "--stream"],
            env=cli_env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=420,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        assert (run_dir / "summary.json").is_file(), output[-4000:] + procs.log("superlink")[-3000:]

        assert rogue.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in procs.log("rogue")

        # Each node trained at the rank its node config declared, every round, nobody failed.
        clients = json.loads((run_dir / "clients.json").read_text())
        assert {cid: c["rank_type"] for cid, c in clients.items()} == {"site-1": "r8", "site-2": "T1", "site-3": "T3"}
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1, 2]
        for r in records[1:]:
            assert sorted(r["clients"]) == ["site-1", "site-2", "site-3"] and not r["failures"] and not r["rejected"]
            # The node claiming 10⁹ examples gets the cap; the two others share the rest by size.
            assert r["weights"] == pytest.approx(
                {"site-1": 0.5, "site-2": 0.5 * n2 / (n2 + n3), "site-3": 0.5 * n3 / (n2 + n3)}, abs=1e-12
            )
            for m in r["clients"].values():
                assert m["bytes_up"] >= m["payload_bytes_up"] > 0
                # Packed both ways: the message, its records, one Array and its one chunk (round 1's
                # task too: the method's shared starting adapter at the client's rank).
                assert m["objects_up"] == 6 and m["objects_down"] == 6
                assert m["transport_down_s"] > 0 and m["transport_up_s"] > 0
            # Bytes up follow the ranks: T1 (2) < r8 (8) < T3 (4 attention, 16 MLP).
            up = {cid: m["payload_bytes_up"] for cid, m in r["clients"].items()}
            assert up["site-2"] < up["site-1"] < up["site-3"]
        assert records[2]["clients"]["site-1"]["payload_bytes_down"] == records[2]["clients"]["site-1"]["payload_bytes_up"]

        # The global FlexLoRA adapter, exported at full rank (eval.export_rank=64): per module,
        # rank = the sum of the three clients' ranks (the exact SVD keeps all of
        # sum_k p_k s_k B_k A_k), a PEFT adapter that changes the model.
        config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        base, _ = load_model(TINY, "cpu")
        ids = torch.arange(12).unsqueeze(0)
        before = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
        ranks = lora.get_ranks(peft_model)
        for module, r in ranks.items():
            mlp = module.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")
            assert r == 8 + 2 + (16 if mlp else 4), (module, r, config)
        assert not torch.allclose(peft_model(ids).logits, before)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["engine"] == "flower-deployment" and summary["per_round"].keys() == {"0", "1", "2"}
    finally:
        procs.stop_all()
    for name, proc in procs.started:
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) is still running"
    for child in procs.descendants:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, f"{child} is still running"
