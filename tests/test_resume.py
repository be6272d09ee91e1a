"""Kill a real `flexlora run` subprocess (SIGKILL, by PID) at three points, resume it with
`--resume`, and check that the final global adapter equals the uninterrupted run's, tensor by
tensor. The process is stopped at an exact point by flexlora.faults (it pauses there and
writes a marker; the kill comes from here). About a minute on 2 cores."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import smallest_run, start_flexlora_run
from safetensors.torch import load_file

from flexlora.cli import main

ARGS = smallest_run(clients=4, rounds=3, steps=2)


def run_to_end(args: list[str], log: Path) -> None:
    proc = start_flexlora_run(args, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_to_end([*ARGS, f"output.dir={out}", "output.name=run"], out / "log.txt")
    return out / "run"


@pytest.mark.parametrize(
    "point, resumed_after",
    [
        ("train_step:2:3", 1),  # round 2, first step of the second client (the first one has trained)
        ("checkpoint:1", 1),  # right after round 1's checkpoint was committed, before it was logged
        ("evaluation:2", 1),  # round 2 aggregated, evaluation under way, no checkpoint yet
    ],
)
def test_killed_run_resumes_to_the_same_adapter(tmp_path, uninterrupted, point, resumed_after, capsys):
    marker = tmp_path / "paused"
    run_dir = tmp_path / "run"
    proc = start_flexlora_run(
        [*ARGS, f"output.dir={tmp_path}", "output.name=run"],
        tmp_path / "killed.txt",
        {"FLEXLORA_FAULT_PAUSE": point, "FLEXLORA_FAULT_MARKER": str(marker)},
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"run ended before reaching {point}:\n" + (tmp_path / "killed.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, f"run never reached {point}"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()

    # A fresh run into the same folder is refused (in-process: it stops before any work);
    # --resume continues it.
    assert main(["run", *ARGS, f"output.dir={tmp_path}", "output.name=run"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    run_to_end(["--resume", str(run_dir)], tmp_path / "resumed.txt")
    assert f"resuming {run_dir} after round {resumed_after} of 3" in (tmp_path / "resumed.txt").read_text()

    expected, got = adapter(uninterrupted), adapter(run_dir)
    assert got.keys() == expected.keys() and len(got) > 0
    for key in expected:
        assert got[key].shape == expected[key].shape, key
    # The same model: per module the same update B @ A. (Not the same factors to the bit: round 1
    # starts every client from one shared A, so ΔW has near-equal singular values whose vectors a
    # 1e-7 rounding difference — e.g. MKL changing its thread count under load — can rotate.)
    for key in (k for k in expected if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        want, have = expected[b_key] @ expected[key], got[b_key] @ got[key]
        assert (have - want).abs().max().item() <= 1e-6 + 1e-4 * want.abs().max().item(), key
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]  # nothing lost, nothing logged twice
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, uninterrupted))
    assert summary["per_round"] == reference["per_round"]
