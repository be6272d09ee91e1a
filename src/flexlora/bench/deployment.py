"""`flexlora bench deployment`: what a round costs on a real Flower deployment, with and without
node workers, against the same config on Flower's simulation engine and in-process, and against
the previous transport (issue 32: one Array per tensor, one push per task, 1 s polls; kept here as
a baseline only, engine `previous+workers`); on request, engine `short-waits+workers` measures
what Flower's own idle poll and object-pull backoff cost a round (bench/waits).

A loopback federation (`Loopback`): a SuperLink and N SuperNodes on 127.0.0.1, as separate
processes, with TLS (a test CA) and SuperNode authentication, as in
tests/test_flower_deployment.py; with `workers`, each SuperNode has its own node worker
(`flexlora node serve`) and hands it its tasks (node config `worker-socket`). Node i holds
training client i of the run's dataset (`partition-id`), exactly the clients the simulation's
node i and the in-process runtime train, at the same ranks.

Per round, from each run's metrics.jsonl (deployment_report.py): the wall time of the round
(tasks out, updates back, aggregation and checkpoint; the global model's evaluation, the same work
on every engine, is left out), the slowest client's training (its `train_time_s`, measured inside
`train_client`), and the overhead, the round minus that training; the CPU seconds of every
process the bench started over the round (bench/cpu.py: SuperLink, SuperNodes, SuperExecs,
ClientApps, ServerApp, workers; Ray and the run's own process on the other engines) and the
overhead's share of them, that is all but the clients' own CPU inside `train_client`; Flower
objects and bytes per message each way; each direction's transport time. In-process, clients
train one after the other, so its "overhead" is the other clients' training.

Goals, on the steady rounds (2..K; round 1 when K = 1): at most 50 Flower objects per message; a
deployment round with workers at most 1.3x a simulation-engine round; with workers, the
overhead at most 50% of the slowest client's training on a CPU machine (every process shares its
cores; 25% on a GPU); the overhead's CPU seconds at most 1/3 of the previous transport's.

It also times a ClientApp's start-up in a fresh process: the worker path (imports the ClientApp;
no torch) against the in-process path (the ClientApp, then torch, transformers, PEFT and the
base model). The harness (`Loopback`, `Processes`) is in bench/loopback.py, shared with the
deployment tests.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flexlora.bench.common import child_env, comma_list, report
from flexlora.bench.deployment_report import format_table, goals, read_rounds, steady  # noqa: F401  (the command's report)
from flexlora.bench.loopback import SUPEREXEC_POLL_S, Loopback
from flexlora.bench.waits import SHORT_ENV, read_waits
from flexlora.errors import ConfigError

ENGINES = ("deployment+workers", "previous+workers", "deployment", "simulation", "in-process")
# short-waits+workers: deployment+workers with Flower's SuperNode idle poll and object-pull backoff
# cut to SHORT_WAITS_S (bench/waits), to measure what those two waits, which only Flower can
# change, cost a round. Not in the default --engines.
SHORT_WAITS, SHORT_WAITS_S = "short-waits+workers", 0.1


# ---------------------------------------------------------------- the benchmark


def bench_overrides(nodes: int, rounds: int, model: str, precision: str, device: str, extra: list[str]) -> list[str]:
    """The one config every engine runs: N training clients, all of them every round, the
    default training budget; a token evaluation (it is not part of the measured round)."""
    dtype, quant = ("bfloat16", "nf4") if precision == "nf4" else (precision, None)
    return [
        f"model={model}",
        f"model_dtype={dtype}",
        f"quantization={quant or 'null'}",
        f"device={device}",
        "seed=0",
        f"data.num_clients={nodes}",
        f"federation.clients_per_round={nodes}",
        f"federation.rounds={rounds}",
        f"flower.min_nodes={nodes}",
        "flower.node_wait_s=600",
        f"flower.max_in_flight={max(8, nodes)}",
        "eval.max_examples_per_client=1",
        "eval.max_new_tokens=4",
        *extra,
    ]


def clientapp_startup(model: str, precision: str, device: str, repeat: int = 3) -> dict:
    """Seconds from a fresh interpreter to a ClientApp ready to hand a task on (worker path) or
    to train it (in-process path: torch, transformers, PEFT and the base model loaded too);
    medians of `repeat` runs, interleaved."""
    dtype, quant = ("bfloat16", "nf4") if precision == "nf4" else (precision, None)
    worker = "import flexlora.engines.flower.client_app, flexlora.engines.node.channel, sys; assert 'torch' not in sys.modules"
    inprocess = (
        "import flexlora.engines.flower.client_app; from flexlora.client import train_client; "
        "from flexlora.experiment import resolve_device; from flexlora.models import load_model; "
        f"load_model({model!r}, resolve_device({device!r}), dtype={dtype!r}, quantization={quant!r})"
    )
    times: dict[str, list[float]] = {"worker path": [], "in-process path": []}
    for _ in range(repeat):
        for name, code in (("worker path", worker), ("in-process path", inprocess)):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=child_env(), check=True, capture_output=True, timeout=900)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(v) for name, v in times.items()}


def accelerator(device: str) -> str:
    """'gpu' where the nodes train on one (--device cuda, or auto on a machine with CUDA), else 'cpu'."""
    if device == "cpu":
        return "cpu"
    import torch

    return "gpu" if device.startswith("cuda") or torch.cuda.is_available() else "cpu"


def run_benchmark(
    nodes: int = 2,
    rounds: int = 2,
    model: str = "smollm2-135m-instruct",
    precision: str = "float32",
    device: str = "cpu",
    engines: tuple[str, ...] = ENGINES,
    extra: list[str] = (),
    workdir: str | Path | None = None,
    threads: int | None = None,
    startup_repeat: int = 3,
    echo=print,
) -> dict:
    """Every engine's rounds on the same config; {"rows": [...], "startup": {...}, "config": {...}}."""
    if nodes < 1 or rounds < 1:
        raise ValueError(f"--nodes and --rounds must be >= 1, got {nodes} and {rounds}")
    unknown = sorted(set(engines) - {*ENGINES, SHORT_WAITS})
    if unknown:
        raise ValueError(f"--engines: unknown {unknown[0]!r}; choose from {', '.join((*ENGINES, SHORT_WAITS))}")
    if precision not in ("float32", "bfloat16", "nf4"):
        raise ValueError(f"--precision: float32, bfloat16 or nf4, got {precision!r}")
    # Nodes train at once: each gets an equal share of the cores, as the simulation's actors do
    # (flower.cpus_per_worker = cores / workers); in-process, one client at a time gets them all.
    threads = threads or max(1, (os.cpu_count() or 1) // nodes)
    overrides = bench_overrides(nodes, rounds, model, precision, device, list(extra))
    keep = workdir is not None
    work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="flexlora-bench-deployment-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    worker_argv = [
        "--model",
        model,
        "--precision",
        precision,
        "--device",
        "auto" if device == "auto" else device,
        "--seed",
        "0",
        "--threads",
        str(threads),
    ]
    node_configs = [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
    from flexlora.bench.cpu import CpuSampler
    from flexlora.engines.flower.server_app import PREVIOUS_TRANSPORT_ENV

    try:
        for engine in engines:
            run_dir = work / "runs" / engine.replace("+", "-")
            echo(f"bench deployment: {engine}, {nodes} nodes, {rounds} rounds, {model} ({precision}, {device}) ...")
            started = time.perf_counter()
            cpu = CpuSampler()
            try:
                if engine.startswith(("deployment", "previous", "short-waits")):
                    previous = engine.startswith("previous")
                    # The previous transport: its ServerApp sends per-array messages one push at a
                    # time and polls every second; Flower's SuperExecs at their default.
                    env = {PREVIOUS_TRANSPORT_ENV: "1"} if previous else {}
                    if engine == SHORT_WAITS:
                        env[SHORT_ENV] = str(SHORT_WAITS_S)
                    with (
                        cpu,
                        Loopback(
                            work / engine.replace("+", "-"),
                            node_configs,
                            worker_argv if engine.endswith("workers") else None,
                            node_env={"OMP_NUM_THREADS": str(threads)},
                            env=env or None,
                            superexec_poll_s=None if previous else SUPEREXEC_POLL_S,
                            waits_dir=work / engine.replace("+", "-") / "waits",
                        ) as fed,
                    ):
                        fed.run(overrides, run_dir)
                else:
                    cmd = [
                        sys.executable,
                        "-m",
                        "flexlora.cli",
                        "run",
                        *overrides,
                        f"output.dir={run_dir.parent}",
                        f"output.name={run_dir.name}",
                    ]
                    if engine == "simulation":
                        cmd += ["--engine", "flower", f"flower.workers={nodes}"]
                    with cpu:
                        done = subprocess.run(
                            cmd, env=child_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=7200
                        )
                    (work / f"{run_dir.name}.log").write_text(done.stdout + done.stderr)
                    if done.returncode != 0:
                        raise RuntimeError(f"{engine} run failed: {(done.stdout + done.stderr)[-3000:]}")
                echo(f"  done in {time.perf_counter() - started:.0f} s")
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # keep the rounds it finished; the others still run
                echo(f"  {engine} FAILED after {time.perf_counter() - started:.0f} s: {str(e).splitlines()[0]}")
            if (run_dir / "metrics.jsonl").is_file():
                waits = read_waits(work / engine.replace("+", "-") / "waits")
                rows += [{"engine": engine, **r} for r in read_rounds(run_dir, cpu, waits)]
        startup = clientapp_startup(model, precision, device, startup_repeat) if startup_repeat else {}
    finally:
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return {
        "rows": rows,
        "startup": startup,
        "config": {
            "nodes": nodes,
            "rounds": rounds,
            "model": model,
            "precision": precision,
            "device": device,
            "accelerator": accelerator(device),  # which overhead goal applies (deployment_report.OVERHEAD_GOAL)
            "threads_per_node": threads,
            "overrides": overrides,
        },
    }


def write_json(result: dict, path: str | Path, argv: list[str] | None = None) -> None:
    from flexlora.reporting import write_json as write

    write(Path(path), {**result, "goals": goals(result), "command": argv})


# ---------------------------------------------------------------- the command


HELP = (
    "a loopback Flower deployment (TLS, node auth) with and without node workers, per round: wall time, slowest "
    "client's training, overhead; the same config on Flower's simulation engine and in-process"
)


def add_arguments(parser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes, each holding one training client (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="base model (default smollm2-135m-instruct; random-llama-1b on a GPU)"
    )
    parser.add_argument(
        "--precision", default="float32", choices=["float32", "bfloat16", "nf4"], help="base weights (default float32)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="which runs, comma-separated (previous+workers: the previous transport, the baseline of the CPU goal; "
        f"also {SHORT_WAITS}: Flower's idle poll and object-pull backoff cut to {SHORT_WAITS_S} s, to measure their cost)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per node (default: cores / nodes)")
    parser.add_argument(
        "--startup-repeat", type=int, default=3, help="fresh-process ClientApp start-ups to time per path (0: skip)"
    )
    parser.add_argument("--workdir", help="keep run folders and every process's log here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the rows and goals to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. train.steps=6")


def run_command(args) -> None:
    try:
        result = run_benchmark(
            args.nodes,
            args.rounds,
            args.model,
            args.precision,
            args.device,
            tuple(comma_list(args.engines)),
            args.overrides,
            workdir=args.workdir,
            threads=args.threads,
            startup_repeat=args.startup_repeat,
        )
    except ValueError as e:
        raise ConfigError(f"bench deployment: {e}") from None
    report(__name__, result, args.json, args.argv)
