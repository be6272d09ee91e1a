"""`flexlora bench deployment`'s measuring pieces without a federation: the CPU seconds of child
processes by role over a window (bench/cpu.py), and the report's rows and four goals
(bench/deployment_report.py) on a run folder written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flexlora.bench.cpu import CpuSampler, children_role, role_of
from flexlora.bench.deployment_report import format_table, goals, read_rounds

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_a_short_lived_grandchild_is_counted_in_full_and_by_its_role():
    """A process that burns CPU and exits between two samples is still counted (in its parent's
    children times); what ran before the window is not."""
    pytest.importorskip("psutil")
    # The child starts a grandchild that burns 0.6 s and exits, says so, and stays alive (as a
    # SuperExec does after its ClientApp): the grandchild lives between two samples 2 s apart.
    code = f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {BURN.format(s=0.6)!r}])\nprint('done', flush=True)\ntime.sleep(30)\n"
    with CpuSampler(interval_s=2.0) as cpu:
        before = time.time()
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "done"
            time.sleep(2.5)  # a sample while the child is alive, the grandchild reaped
            after = time.time()
        finally:
            child.kill()
            child.wait()
    used = sum(cpu.window(before, after).values())
    assert 0.55 <= used <= 0.6 + 1.5  # the burn, plus two interpreters' start-up
    assert sum(cpu.window(before - 100, before - 50).values()) == 0.0
    assert role_of(["/venv/bin/python3.11", "/venv/bin/flwr-clientapp", "--token", "x"]) == "clientapp"
    assert role_of(["python", "-m", "flexlora.cli", "node", "serve", "--socket", "s"]) == "worker"
    assert children_role("superexec", "supernode") == "clientapp" and children_role("superexec", "superlink") == "serverapp"


def _record(round_, wall, trains, cpus, objects=(30, 30), started=1000.0):
    clients = {
        f"c{i}": {"train_time_s": t, "train_cpu_time_s": c, "objects_down": objects[0], "objects_up": objects[1]}
        for i, (t, c) in enumerate(zip(trains, cpus))
    }
    return {
        "round": round_,
        "clients": clients,
        "failures": {},
        "time": {"total_s": wall + 2.0, "evaluation_s": 2.0},
        "clock": {"started": started, "round_ended": started + wall},
    }


class FixedCpu:
    """A CpuSampler stand-in: the same CPU seconds per role for any window."""

    def __init__(self, by_role):
        self.by_role = by_role

    def window(self, start, end):
        return dict(self.by_role)


def _rows(tmp_path, engine, records, cpu):
    run = tmp_path / engine
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [{"round": 0, "eval": {}}, *records]))
    return [{"engine": engine, **r} for r in read_rounds(run, cpu)]


def test_the_report_reads_each_round_and_checks_the_four_goals(tmp_path):
    # With workers: rounds of 14 s for 10 s of training (40%), 30 objects a message, 12 CPU-s
    # of which 8 are the two clients' training: 4 CPU-s of overhead. The previous transport: 14
    # CPU-s of overhead, 844 objects. Simulation: 12 s rounds (14 / 12 = 1.17x).
    workers = _rows(
        tmp_path,
        "deployment+workers",
        [_record(r, 14.0, (10.0, 9.0), (4.0, 4.0)) for r in (1, 2)],
        FixedCpu({"worker": 9.0, "superlink": 3.0}),
    )
    previous = _rows(
        tmp_path,
        "previous+workers",
        [_record(r, 30.0, (10.0, 9.0), (4.0, 4.0), (844, 844)) for r in (1, 2)],
        FixedCpu({"worker": 12.0, "superlink": 10.0}),
    )
    simulation = _rows(tmp_path, "simulation", [_record(r, 12.0, (10.0, 9.0), (4.0, 4.0)) for r in (1, 2)], None)
    row = workers[1]
    assert (row["wall_s"], row["slowest_train_s"], row["overhead_s"]) == (14.0, 10.0, 4.0)
    assert row["overhead_cpu_s"] == pytest.approx(12.0 - 8.0) and row["objects_down"] == 30
    result = {"rows": workers + previous + simulation, "config": {"device": "cpu"}}
    lines = goals(result)
    assert lines[0] == "PASS <= 50 Flower objects per message (at most 30 (down, round 2); the previous transport: 844)"
    assert lines[1].startswith(
        "PASS a deployment round (workers) <= 1.3x a simulation-engine round (steady rounds: 14.0 s against 12.0 s = 1.17x)"
    )
    assert lines[2].startswith("PASS with workers, a round's overhead <= 50% of the slowest client's training (cpu)")
    assert (
        lines[3].startswith("PASS overhead CPU seconds per round <= 1/3 of the previous transport's")
        and "4.0 CPU-s against 14.0 CPU-s = 0.29x" in lines[3]
    )
    assert lines[-1] == "goals: 4 of 4 met"
    # On a GPU the overhead goal is 25%; 40% fails it.
    assert goals({**result, "config": {"device": "cuda"}})[2].startswith("FAIL with workers, a round's overhead <= 25%")
    table = format_table(result)
    assert "| deployment+workers | 2 | 14.0 | 10.0 | 4.0 | 40% | 4.0 | 30, 30 | —, — | —, — | — | 2 (0) |" in table
    assert "| engine | superlink | worker | training | overhead |" in table
    # Without the baseline or the simulation, those goals are skipped, not failed.
    skipped = goals({"rows": workers, "config": {"device": "cpu"}})
    assert sum(line.startswith("SKIP") for line in skipped) == 2


def test_flowers_idle_waits_are_recorded_where_flower_sleeps_and_nowhere_else(tmp_path):
    """The bench's sitecustomize (bench/waits) records the SuperNode's idle sleep and the object
    pull's backoff by the function that waits (Flower's own names), nothing else, in any process
    started with it on PYTHONPATH."""
    import os

    from flexlora.bench import waits

    code = (
        "import threading, time\n"
        "def start_client_internal():\n    time.sleep(0.3)\n"  # the SuperNode's loop
        "def pull_with_retries():\n    threading.Event().wait(0.2)\n"  # an object pull's backoff
        "start_client_internal(); pull_with_retries(); time.sleep(0.1)\n"  # the last is nobody's
    )
    env = {
        **os.environ,
        waits.ENV: str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(waits.FOLDER), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.time()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    recorded = sorted(waits.read_waits(tmp_path), key=lambda w: w["start"])
    assert [w["kind"] for w in recorded] == ["supernode idle", "object-pull backoff"]
    assert recorded[0]["seconds"] == pytest.approx(0.3, abs=0.1) and recorded[1]["seconds"] == pytest.approx(0.2, abs=0.1)
    total = waits.waits_in(recorded, started, time.time())
    assert total == pytest.approx({"supernode idle": recorded[0]["seconds"], "object-pull backoff": recorded[1]["seconds"]})  # fmt: skip
    assert waits.waits_in(recorded, recorded[0]["start"] + 0.1, recorded[0]["start"] + 0.2) == pytest.approx(
        {"supernode idle": 0.1, "object-pull backoff": 0.0}, abs=1e-6
    )
    # A task pushed 0.1 s into a SuperNode's idle sleep waits for the rest of it; object pulls
    # backing off side by side count once.
    sleeping = [
        {"kind": "supernode idle", "start": 10.0, "seconds": 3.0, "pid": 1},
        {"kind": "supernode idle", "start": 12.5, "seconds": 3.0, "pid": 2},
        {"kind": "object-pull backoff", "start": 20.0, "seconds": 1.0, "pid": 1},
        {"kind": "object-pull backoff", "start": 20.5, "seconds": 1.0, "pid": 3},
    ]
    assert waits.waits_in(sleeping, 0.0, 30.0, pushed_at=12.6) == pytest.approx(
        {"supernode idle": 2.9, "object-pull backoff": 1.5}
    )


def test_the_short_waits_counterfactual_cuts_only_flowers_two_waits(tmp_path):
    """With FLEXLORA_WAITS_SHORT_S (engine short-waits+workers), the SuperNode's idle sleep and an
    object pull's backoff last at most that long (what the two waits cost a round is then
    measured, not read); every other sleep keeps its length."""
    from flexlora.bench import waits

    code = (
        "import threading, time\n"
        "def start_client_internal():\n    time.sleep(3.0)\n"
        "def pull_with_retries():\n    threading.Event().wait(timeout=2.0); threading.Event().wait(1.0)\n"
        "t = time.perf_counter(); start_client_internal(); pull_with_retries(); flower = time.perf_counter() - t\n"
        "t = time.perf_counter(); time.sleep(0.4); other = time.perf_counter() - t\n"
        "print(flower, other)\n"
    )
    env = {
        **os.environ,
        waits.ENV: str(tmp_path),
        waits.SHORT_ENV: "0.05",
        "PYTHONPATH": os.pathsep.join([str(waits.FOLDER), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    flower, other = map(float, done.stdout.split())
    assert flower < 1.0 and other >= 0.4
    recorded = sorted(waits.read_waits(tmp_path), key=lambda w: w["start"])
    assert [w["kind"] for w in recorded] == ["supernode idle", "object-pull backoff", "object-pull backoff"]
    assert all(w["seconds"] < 0.5 for w in recorded)
