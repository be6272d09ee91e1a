"""What `flexlora bench deployment` reads from each run and prints: per engine and round the wall
time, the slowest client's training, the overhead, the overhead's CPU seconds (every process but
the training itself), Flower objects and bytes per message; the CPU seconds by process; the goals.

A round's rows come from its metrics.jsonl record: `time` (wall seconds, evaluation left out),
`clock` (its wall-clock start and end before the evaluation: the window the CPU seconds are read
over, see bench/cpu.py), and per client `train_time_s` / `train_cpu_time_s` (measured inside
`train_client`), `objects_*` / `bytes_*` (codec.message_objects) and `transport_*_s` (the task's
push to its receipt on the node; the reply's making to its decoding on the server).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from flexlora.bench.common import goal, not_checked, with_count
from flexlora.bench.waits import waits_in

WORKERS, PREVIOUS, SIMULATION = "deployment+workers", "previous+workers", "simulation"
OBJECTS_GOAL, SIMULATION_GOAL, CPU_GOAL = 50, 1.3, 1 / 3
# Overhead over the slowest client's training: 25% where nodes have their own accelerator; 50% on
# a CPU machine whose cores every process of the federation shares.
OVERHEAD_GOAL = {"gpu": 0.25, "cpu": 0.50}


def read_rounds(run_dir: Path, cpu=None, waits: list[dict] | None = None) -> list[dict]:
    """Per round: wall time (without the evaluation), the slowest client's training, overhead;
    with a CpuSampler, CPU seconds per process role over the round and the overhead's CPU (all
    of it but the clients' training); with `waits` (bench/waits), what Flower's idle waits cost
    the round (waits_in: the SuperNodes' idle sleep after the tasks' push, object-pull backoff)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r.get("round") or not r.get("time"):
            continue
        t, clients = r["time"], list(r["clients"].values())
        trains = [c["train_time_s"] for c in clients if "train_time_s" in c]
        slowest = max(trains) if trains else float("nan")
        wall = t["total_s"] - t["evaluation_s"]
        row = {
            "round": r["round"],
            "wall_s": wall,
            "slowest_train_s": slowest,
            "overhead_s": wall - slowest,
            "clients": len(clients),
            "failures": len(r.get("failures") or {}),
            "evaluation_s": t["evaluation_s"],
            "aggregation_s": t.get("aggregation_s"),
        }
        for key in ("objects_down", "objects_up", "bytes_down", "bytes_up"):
            values = [c[key] for c in clients if key in c]
            row[key] = max(values) if values else None
        for key in ("transport_down_s", "transport_up_s"):
            values = [c[key] for c in clients if key in c]
            row[key] = max(values) if values else None
        clock = r.get("clock")
        if cpu is not None and clock:
            by_role = cpu.window(clock["started"], clock["round_ended"])
            training = sum(c.get("train_cpu_time_s", 0.0) for c in clients)
            row.update(cpu_s=by_role, train_cpu_s=training, overhead_cpu_s=sum(by_role.values()) - training)
        if waits is not None and clock:
            pushes = [c["received_at"] - c["transport_down_s"] for c in clients if "transport_down_s" in c]
            row["waits_s"] = waits_in(waits, clock["started"], clock["round_ended"], min(pushes, default=None))
        rows.append(row)
    return rows


def steady(rows: list[dict], engine: str) -> list[dict]:
    """An engine's rounds the goals are checked on: rounds 2..K (round 1 when K = 1), and only
    rounds in which every client replied (a round short of a client is not the same work)."""
    mine = [r for r in rows if r["engine"] == engine and not r["failures"]]
    later = [r for r in mine if r["round"] >= 2]
    return later or mine


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _waits(waits: dict | None) -> str:
    if waits is None:
        return "—"
    return f"{waits.get('supernode idle', 0.0):.1f}, {waits.get('object-pull backoff', 0.0):.1f}"


def _mean(rounds: list[dict], value) -> float:
    return statistics.mean(value(r) for r in rounds)


def format_table(result: dict) -> str:
    mib = lambda v: None if v is None else v / 2**20  # noqa: E731
    lines = [
        "| engine | round | round wall (s) | slowest client's training (s) | overhead (s) | overhead / training "
        "| overhead CPU (s) | objects / message (down, up) | MiB / message (down, up) | transport (s, down, up) "
        "| Flower's waits (s: SuperNode idle after the push, object-pull backoff) | clients (failed) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['engine']} | {r['round']} | {r['wall_s']:.1f} | {r['slowest_train_s']:.1f} | {r['overhead_s']:.1f} | "
            f"{r['overhead_s'] / r['slowest_train_s']:.0%} | {_num(r.get('overhead_cpu_s'), '.1f')} | "
            f"{_num(r.get('objects_down'), 'd')}, {_num(r.get('objects_up'), 'd')} | "
            f"{_num(mib(r.get('bytes_down')), '.1f')}, {_num(mib(r.get('bytes_up')), '.1f')} | "
            f"{_num(r.get('transport_down_s'), '.1f')}, {_num(r.get('transport_up_s'), '.1f')} | "
            f"{_waits(r.get('waits_s'))} | {r['clients']} ({r['failures']}) |"
        )
    roles = sorted({role for r in result["rows"] for role in (r.get("cpu_s") or {})})
    if roles:
        lines += [
            "",
            "CPU seconds per steady round by process (mean; the training's own CPU is in the worker or ClientApp row, "
            "and subtracted in 'overhead'):",
            "",
            "| engine | " + " | ".join(roles) + " | training | overhead |",
            "| --- " * (len(roles) + 3) + "|",
        ]
        for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
            rounds = [r for r in steady(result["rows"], engine) if r.get("cpu_s") is not None]
            if not rounds:
                continue
            cells = [f"{_mean(rounds, lambda r, role=role: r['cpu_s'].get(role, 0.0)):.1f}" for role in roles]
            training, overhead = (_mean(rounds, lambda r, k=k: r[k]) for k in ("train_cpu_s", "overhead_cpu_s"))
            lines.append(f"| {engine} | " + " | ".join(cells) + f" | {training:.1f} | {overhead:.1f} |")
    if result.get("startup"):
        lines += ["", "| ClientApp start-up, fresh process (median) | s |", "| --- | --- |"]
        lines += [f"| {name} | {s:.2f} |" for name, s in result["startup"].items()]
    return "\n".join(lines)


def goals(result: dict) -> list[str]:
    rows = result["rows"]
    config = result.get("config", {})
    device = config.get("accelerator") or ("cpu" if config.get("device", "cpu") == "cpu" else "gpu")
    lines = []
    workers, previous, simulation = (steady(rows, e) for e in (WORKERS, PREVIOUS, SIMULATION))
    counted = [(r["round"], key, r[key]) for r in workers for key in ("objects_down", "objects_up") if r.get(key) is not None]
    if counted:
        worst = max(counted, key=lambda c: c[2])
        before = [r[k] for r in previous for k in ("objects_down", "objects_up") if r.get(k) is not None]
        lines.append(
            goal(
                worst[2] <= OBJECTS_GOAL,
                f"<= {OBJECTS_GOAL} Flower objects per message",
                f"at most {worst[2]} ({worst[1].split('_')[1]}, round {worst[0]})"
                + (f"; the previous transport: {max(before)}" if before else ""),
            )
        )
    else:
        lines.append(not_checked(f"<= {OBJECTS_GOAL} objects per message", f"{WORKERS} not run"))
    if workers and simulation:
        dep, sim = (statistics.mean(r["wall_s"] for r in rounds) for rounds in (workers, simulation))
        lines.append(
            goal(
                dep <= SIMULATION_GOAL * sim,
                f"a deployment round (workers) <= {SIMULATION_GOAL}x a simulation-engine round",
                f"steady rounds: {dep:.1f} s against {sim:.1f} s = {dep / sim:.2f}x",
            )
        )
    else:
        lines.append(not_checked(f"deployment round <= {SIMULATION_GOAL}x simulation", f"needs {WORKERS} and {SIMULATION}"))
    if workers:
        share_goal = OVERHEAD_GOAL[device]
        worst = max(workers, key=lambda r: r["overhead_s"] / r["slowest_train_s"])
        share = worst["overhead_s"] / worst["slowest_train_s"]
        lines.append(
            goal(
                share <= share_goal,
                f"with workers, a round's overhead <= {share_goal:.0%} of the slowest client's training ({device})",
                f"worst steady round {worst['round']}: {worst['overhead_s']:.1f} s over {worst['slowest_train_s']:.1f} s = {share:.0%}",
            )
        )
    else:
        lines.append(not_checked("with workers, overhead <= its share of training", f"{WORKERS} not run"))
    now, then = ([r["overhead_cpu_s"] for r in rounds if r.get("overhead_cpu_s") is not None] for rounds in (workers, previous))
    if now and then:
        a, b = statistics.mean(now), statistics.mean(then)
        lines.append(
            goal(
                a <= CPU_GOAL * b,
                "overhead CPU seconds per round <= 1/3 of the previous transport's (both with workers, this run)",
                f"steady rounds: {a:.1f} CPU-s against {b:.1f} CPU-s = {a / b:.2f}x",
            )
        )
    else:
        lines.append(not_checked("overhead CPU <= 1/3 of the previous transport's", f"needs {WORKERS} and {PREVIOUS}"))
    return with_count(lines)
