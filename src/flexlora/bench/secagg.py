"""`flexlora bench secagg`: what Flower's SecAgg+ (`flower.secure_aggregation=true`) costs a round,
for FlexLoRA, whose clients upload their dense s_k B_k A_k (one entry per weight of every target
module), against FedIT, whose clients upload their factors, each with and without SecAgg+.

Every run is the same config on the loopback deployment (`Loopback`: a SuperLink and N
SuperNodes as processes on 127.0.0.1, TLS and SuperNode authentication; node i holds training
client i) or on Flower's simulation engine (`--engine simulation`). Per round, from each run's
metrics.jsonl: the wall time (the global model's evaluation left out), the slowest client's
training, and Flower's bytes both ways summed over the clients (`message_bytes`: every
serialised object of every message, all four SecAgg+ stages under secure aggregation; TLS and
HTTP framing not included). Under SecAgg+ a masked upload is one int64 per entry, so the dense
upload costs 8 bytes per weight of the target modules, whatever the ranks.

Goal lines: every round of every run aggregated all its clients, and under SecAgg+ the ServerApp
received no array from any client (only masked vectors, spread over the whole modulus).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flexlora.bench.common import child_env, comma_list, goal, report, with_count
from flexlora.bench.deployment import bench_overrides
from flexlora.bench.loopback import Loopback
from flexlora.errors import ConfigError

ENGINES = ("deployment", "simulation")


def read_rounds(run_dir: Path) -> list[dict]:
    """Per round: wall time without the evaluation, the slowest client's training, Flower's
    bytes both ways over all clients, clients and failures, and (under SecAgg+) the arrays the
    ServerApp received and the masked vectors' share inside the unmasked range."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r.get("round") or not r.get("time"):
            continue
        clients = r["clients"].values()
        rows.append(
            {
                "round": r["round"],
                "wall_s": r["time"]["total_s"] - r["time"]["evaluation_s"],
                "slowest_train_s": max((c.get("train_time_s", 0.0) for c in clients), default=0.0),
                "bytes_up": sum(c.get("bytes_up", 0) for c in clients),
                "bytes_down": sum(c.get("bytes_down", 0) for c in clients),
                "clients": len(r["clients"]),
                "failures": len(r.get("failures") or {}),
                "arrays_received": sum(c.get("arrays_received", 0) for c in clients),
                "share_in_unmasked_range": max((c.get("share_in_unmasked_range", 0.0) for c in clients), default=0.0),
            }
        )
    return rows


def run_benchmark(
    nodes: int = 3,
    rounds: int = 2,
    model: str = "tiny-llama",
    device: str = "cpu",
    engine: str = "deployment",
    methods: tuple[str, ...] = ("flexlora", "fedit"),
    extra: list[str] = (),
    workdir: str | Path | None = None,
    echo=print,
) -> dict:
    """Each method with and without SecAgg+ on one config; {"rows": [...], "config": {...}}."""
    if engine not in ENGINES:
        raise ValueError(f"--engine: {engine!r}; choose from {', '.join(ENGINES)}")
    if nodes < 2 or rounds < 1:
        raise ValueError(f"--nodes must be >= 2 (SecAgg+ needs two clients) and --rounds >= 1, got {nodes} and {rounds}")
    overrides = bench_overrides(nodes, rounds, model, "float32", device, list(extra))
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="flexlora-bench-secagg-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for method in methods:
            for secure in (False, True):
                name = f"{method}-{'secagg' if secure else 'plain'}"
                run_dir = work / "runs" / name
                config = [*overrides, f"method={method}", f"flower.secure_aggregation={str(secure).lower()}"]
                echo(f"bench secagg: {name}, {nodes} nodes, {rounds} rounds, {model} on {engine} ...")
                started = time.perf_counter()
                try:
                    if engine == "deployment":
                        node_configs = [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
                        with Loopback(work / name, node_configs, node_env={"OMP_NUM_THREADS": "1"}) as fed:
                            fed.run(config, run_dir)
                    else:
                        cmd = [
                            sys.executable,
                            "-m",
                            "flexlora.cli",
                            "run",
                            "--engine",
                            "flower",
                            *config,
                            f"flower.workers={nodes}",
                        ]
                        cmd += [f"output.dir={run_dir.parent}", f"output.name={run_dir.name}"]
                        done = subprocess.run(
                            cmd, env=child_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=7200
                        )
                        (work / f"{name}.log").write_text(done.stdout + done.stderr)
                        if done.returncode != 0:
                            raise RuntimeError(f"{name} failed: {(done.stdout + done.stderr)[-3000:]}")
                    echo(f"  done in {time.perf_counter() - started:.0f} s")
                except (RuntimeError, subprocess.TimeoutExpired) as e:  # keep what the others measure
                    echo(f"  {name} FAILED after {time.perf_counter() - started:.0f} s: {str(e).splitlines()[0]}")
                if (run_dir / "metrics.jsonl").is_file():
                    rows += [{"method": method, "secagg": secure, **r} for r in read_rounds(run_dir)]
    finally:
        if workdir is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "config": {"nodes": nodes, "rounds": rounds, "model": model, "engine": engine, "overrides": overrides}}


def format_table(result: dict) -> str:
    lines = [
        "| method | SecAgg+ | round | round wall (s) | slowest client's training (s) | bytes up, all clients (MiB) | bytes down (MiB) | clients (failed) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {'yes' if r['secagg'] else 'no'} | {r['round']} | {r['wall_s']:.1f} | {r['slowest_train_s']:.1f} | "
            f"{r['bytes_up'] / 2**20:.2f} | {r['bytes_down'] / 2**20:.2f} | {r['clients']} ({r['failures']}) |"
        )
    return "\n".join(lines)


def goals(result: dict) -> list[str]:
    rows = result["rows"]
    nodes = result["config"]["nodes"]
    short = [r for r in rows if r["clients"] != nodes or r["failures"]]
    lines = [
        goal(
            not short and bool(rows), "every round aggregated all its clients", f"{len(rows) - len(short)} of {len(rows)} rounds"
        )
    ]
    secure = [r for r in rows if r["secagg"]]
    if secure:
        arrays = sum(r["arrays_received"] for r in secure)
        share = max(r["share_in_unmasked_range"] for r in secure)
        lines.append(
            goal(
                arrays == 0 and share < 0.01,
                "under SecAgg+ the ServerApp receives no array, only masked vectors",
                f"{arrays} arrays; at most {share:.2%} of masked entries in the unmasked range 0..q",
            )
        )
    return with_count(lines)


def write_json(result: dict, path: str | Path, argv: list[str] | None = None) -> None:
    from flexlora.reporting import write_json as write

    write(Path(path), {**result, "goals": goals(result), "command": argv})


HELP = "bytes and time per round with and without Flower's SecAgg+, FlexLoRA's dense uploads against FedIT's factors"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--nodes", type=int, default=3, help="SuperNodes (simulation: ClientApps), one training client each (default 3)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    parser.add_argument(
        "--model", default="tiny-llama", help="base model (default tiny-llama: a dense SmolLM2 upload is ~810 MiB a client)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    parser.add_argument("--engine", default="deployment", choices=ENGINES, help="loopback deployment (default) or simulation")
    parser.add_argument(
        "--methods", default="flexlora,fedit", help="methods, comma-separated (each run with and without SecAgg+)"
    )
    parser.add_argument("--workdir", help="keep run folders and logs here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the rows and goals to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. train.steps=6")


def run_command(args) -> None:
    try:
        result = run_benchmark(
            args.nodes,
            args.rounds,
            args.model,
            args.device,
            args.engine,
            tuple(comma_list(args.methods)),
            args.overrides,
            args.workdir,
        )
    except ValueError as e:
        raise ConfigError(f"bench secagg: {e}") from None
    report(__name__, result, args.json, args.argv)
