"""Trust boundaries of a run (issue 13): a client cannot buy the global model with a claimed
dataset size (in-process engine here; the Flower ClientApp in test_flower.py, a TLS deployment
in test_flower_deployment.py, the server alone in test_validation.py), and one run folder has
one writer (two real processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import smallest_run, start_flexlora_run

import flexlora.engines.local as local_module
import flexlora.experiment as experiment_module
from flexlora.cli import main
from flexlora.methods.flexlora import dense_delta
from flexlora.round_aggregation import RoundAggregation
from flexlora.runlock import LOCK_NAME


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_in_process_a_billion_examples_buy_at_most_the_cap_and_an_over_claim_is_rejected(tmp_path, tiny_overrides, monkeypatch):
    """4 clients, all sampled. Client 0's data says 10⁹ examples (its declared size); client 1
    trains on 6 but its reply claims 10⁹. With federation.max_weight_share=0.5: client 1 is
    rejected with the reason, client 0 gets 0.5, clients 2 and 3 share the rest, the weights are
    in metrics.jsonl and the global ΔW is Σ p_k s_k B_k A_k of the aggregated updates."""
    load = experiment_module.load_federated_dataset

    def heavy_first_client(*args, **kwargs):
        dataset = load(*args, **kwargs)
        dataset.clients[0].weight = 10**9
        return dataset

    train = local_module.train_client

    def over_claiming(model, tokenizer, data, task, *args):
        update = train(model, tokenizer, data, task, *args)
        return dataclasses.replace(update, num_examples=10**9) if data.client_id == ids[1] else update

    aggregated = []  # per round: (the updates folded, the state after)
    fold, finish = RoundAggregation.fold, RoundAggregation.finish

    def capture_fold(self, update, weight):
        self.captured = [*getattr(self, "captured", []), update]
        fold(self, update, weight)

    def capture_finish(self):
        outcome = finish(self)
        aggregated.append((self.captured, {k: v.clone() for k, v in self.server.state.items()}))
        return outcome

    monkeypatch.setattr(experiment_module, "load_federated_dataset", heavy_first_client)
    monkeypatch.setattr(local_module, "train_client", over_claiming)
    monkeypatch.setattr(RoundAggregation, "fold", capture_fold)
    monkeypatch.setattr(RoundAggregation, "finish", capture_finish)
    overrides = [o for o in tiny_overrides if not o.startswith(("data.num_clients", "federation.clients_per_round"))]
    ids = [f"syn-{i:03d}" for i in range(4)]
    assert (
        main(["run", *overrides, "data.num_clients=4", "federation.clients_per_round=4", "federation.max_weight_share=0.5"]) == 0
    )

    rec = records(tmp_path / "runs" / "test")
    assert [r["round"] for r in rec] == [0, 1, 2] and len(aggregated) == 2
    for r, (updates, state) in zip(rec[1:], aggregated):
        assert set(r["rejected"]) == {ids[1]}, r["rejected"]
        assert r["rejected"][ids[1]] == "num_examples 1000000000 is above the 6 this client declared"
        n = {u.client_id: u.num_examples for u in updates}
        assert n[ids[0]] == 10**9 and n[ids[2]] < 10
        rest = n[ids[2]] + n[ids[3]]
        assert r["weights"] == pytest.approx(
            {ids[0]: 0.5, ids[2]: 0.5 * n[ids[2]] / rest, ids[3]: 0.5 * n[ids[3]] / rest}, abs=1e-12
        )
        assert {u.client_id for u in updates} == set(r["weights"])
        for module in state_modules(state):
            expected = sum(
                r["weights"][u.client_id] * u.scale(module) * (u.factors[module][1].double() @ u.factors[module][0].double())
                for u in updates
            )
            # The state keeps ΔW's top-K triplets (K bounded by the largest client rank): compare
            # with the best rank-K approximation of the expected ΔW.
            K = state[f"{module}.S"].shape[0]
            U, S, Vh = torch.linalg.svd(expected, full_matrices=False)
            torch.testing.assert_close(dense_delta(state, module).double(), (U[:, :K] * S[:K]) @ Vh[:K], rtol=1e-4, atol=1e-6)


def state_modules(state: dict) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in state})


# --- one writer per run folder ------------------------------------------------------------

ARGS = smallest_run(clients=3, rounds=1)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_second_process_is_refused_while_a_run_holds_its_folder_and_a_kill_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    holder = start_flexlora_run(
        [*ARGS, f"output.dir={tmp_path}", "output.name=run"],
        tmp_path / "holder.txt",
        {"FLEXLORA_FAULT_PAUSE": "train_step:1", "FLEXLORA_FAULT_MARKER": str(marker)},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert holder.poll() is None, holder.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never reached its first training step"
            time.sleep(0.1)
        before = snapshot(run_dir)
        assert "config.yaml" in before and LOCK_NAME in before
        # A --resume of the same folder, and the run started again with and without --overwrite:
        # each is refused with one line naming the folder and the holder, exit 2, touching nothing.
        for argv in (
            ["--resume", str(run_dir)],
            ["--overwrite", *ARGS, f"output.dir={tmp_path}", "output.name=run"],
            [*ARGS, f"output.dir={tmp_path}", "output.name=run"],  # without --overwrite: says who holds it
        ):
            second = start_flexlora_run(argv, tmp_path / "second.txt", stderr=subprocess.PIPE)
            assert second.wait(timeout=240) == 2, second.stderr.read()
            err = second.stderr.read()
            ours = [line for line in err.splitlines() if line.startswith("flexlora")]  # not library warnings
            assert len(ours) == 1 and ours[0].startswith("flexlora: error: "), err
            assert f"run folder {run_dir} is in use by pid {holder.pid} on " in ours[0] and "(flexlora run " in ours[0], err
            assert snapshot(run_dir) == before
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=60)
    # The kill released the lock (the lock file is still there, holding nobody): resume works.
    assert (run_dir / LOCK_NAME).exists()
    resumed = start_flexlora_run(["--resume", str(run_dir)], tmp_path / "resumed.txt", stderr=subprocess.PIPE)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert [r["round"] for r in records(run_dir)] == [0, 1] and (run_dir / "adapter").is_dir()


# --- a full disk or a failed write ----------------------------------------------------------

from safetensors.torch import load_file  # noqa: E402

from flexlora.checkpoint import load_checkpoint  # noqa: E402
from flexlora.faults import WRITE_ENV  # noqa: E402

WRITE_ARGS = [a for a in ARGS if not a.startswith("federation.rounds")] + ["federation.rounds=2"]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference run, keeping two checkpoints (output.* does not change the results)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["run", *WRITE_ARGS, f"output.dir={out}", "output.name=run", "output.keep_checkpoints=2"]) == 0
    return out / "run"


@pytest.mark.parametrize(
    "point, code, what, committed",
    [
        ("checkpoint_tensors", "ENOSPC", "writing the checkpoint tensors", 1),
        ("checkpoint_tensors", "EACCES", "writing the checkpoint tensors", 1),
        ("checkpoint_index", "ENOSPC", "writing the checkpoint index", 1),
        ("checkpoint_index", "EIO", "writing the checkpoint index", 1),
        ("metrics_line", "ENOSPC", "appending its line to", 2),
    ],
)
def test_a_failed_write_in_a_round_loses_nothing_and_says_how_to_resume(
    tmp_path, uninterrupted, monkeypatch, capsys, point, code, what, committed
):
    """The disk fills (or permission is lost, or an I/O error) at one write of round 2: the run
    stops with one line naming the write and the resume command, exit 1; the previous
    checkpoint and metrics.jsonl are intact and loadable (no partial line, no temporary file);
    --resume then ends with the uninterrupted run's adapter."""
    import errno

    run_dir = tmp_path / "run"
    monkeypatch.setenv(WRITE_ENV, f"{point}:2:{code}")
    assert main(["run", *WRITE_ARGS, f"output.dir={tmp_path}", "output.name=run"]) == 1
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("flexlora")]
    assert len(ours) == 1 and ours[0].startswith("flexlora: error: round 2: " + what), err
    assert os.strerror(getattr(errno, code)) in ours[0] and ours[0].endswith(f"continue with: flexlora run --resume {run_dir}")
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["round"] for line in text.splitlines()] == [0, 1]
    assert not [p for p in (run_dir / "checkpoint").iterdir() if p.name.endswith(".tmp")]
    ckpt = load_checkpoint(run_dir / "checkpoint")
    assert ckpt.round == committed and [r["round"] for r in ckpt.history] == list(range(committed + 1))

    monkeypatch.delenv(WRITE_ENV)
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert f"resuming {run_dir} after round {committed} of 2" in capsys.readouterr().out
    assert [r["round"] for r in records(run_dir)] == [0, 1, 2]
    expected, got = adapter(uninterrupted), adapter(run_dir)
    assert got.keys() == expected.keys() and len(got) > 0
    for key in expected:
        assert (got[key] - expected[key]).abs().max().item() <= 1e-6, key


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_a_clear_error_or_falls_back_to_a_kept_one(tmp_path, uninterrupted, capsys):
    import shutil

    folder = uninterrupted / "checkpoint"
    assert {p.name for p in folder.iterdir()} == {
        "checkpoint.json",
        "checkpoint-000001.json",
        "checkpoint-000002.json",
        "state-000001.safetensors",
        "state-000002.safetensors",
    }
    index = json.loads((folder / "checkpoint.json").read_text())
    assert len(index["tensors_sha256"]) == 64

    # Only the newest checkpoint (keep_checkpoints=1 keeps no other): a one-line error, exit 2.
    alone = tmp_path / "alone"
    shutil.copytree(uninterrupted, alone)
    for extra in ("checkpoint-000001.json", "checkpoint-000002.json", "state-000001.safetensors"):
        (alone / "checkpoint" / extra).unlink()
    flip_a_byte(alone / "checkpoint" / "state-000002.safetensors")
    assert main(["run", "--resume", str(alone)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flexlora")]
    assert len(err) == 1 and "state-000002.safetensors are corrupted: sha256" in err[0], err

    # Two kept: the resume falls back to round 1, says so, runs round 2 again, same adapter.
    kept = tmp_path / "kept"
    shutil.copytree(uninterrupted, kept)
    flip_a_byte(kept / "checkpoint" / "state-000002.safetensors")
    assert main(["run", "--resume", str(kept)]) == 0
    out = capsys.readouterr().out
    assert (
        "are corrupted" in out
        and "falling back to the checkpoint of round 1" in out
        and f"resuming {kept} after round 1 of 2" in out
    )
    assert [r["round"] for r in records(kept)] == [0, 1, 2]
    expected, got = adapter(uninterrupted), adapter(kept)
    assert all((got[k] - expected[k]).abs().max().item() <= 1e-6 for k in expected)
    assert load_checkpoint(kept / "checkpoint").round == 2  # rewritten, verifies again
