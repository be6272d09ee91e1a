"""`flexlora bench deployment`: what a round costs on a real Flower deployment, with and without
node workers, against the same config on Flower's simulation engine and in-process.

A loopback federation (`Loopback`): a SuperLink and N SuperNodes on 127.0.0.1, as separate
processes, with TLS (a test CA) and SuperNode authentication, as in
tests/test_flower_deployment.py; with `workers`, each SuperNode has its own node worker
(`flexlora node serve`) and hands it its tasks (node config `worker-socket`). Node i holds
training client i of the run's dataset (`partition-id`), exactly the clients the simulation's
node i and the in-process runtime train, at the same ranks.

Per round, from each run's metrics.jsonl: the wall time of the round (tasks out, updates back,
aggregation and checkpoint; the global model's evaluation, the same work on every engine, is left
out), the slowest client's training (its `train_time_s`, measured inside `train_client`), and the
overhead, the round minus that training. In-process, clients train one after the other, so its
"overhead" is the other clients' training.

Goals, on the steady rounds (2..K; round 1 when K = 1): with workers, the overhead is at most
25% of the slowest client's training; a deployment round with workers takes at most 1.3x a
simulation-engine round.

It also times a ClientApp's start-up in a fresh process: the worker path (imports the ClientApp;
no torch) against the in-process path (the ClientApp, then torch, transformers, PEFT and the
base model). The harness (`Loopback`, `Processes`) is shared with the deployment tests.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flexlora.bench.common import child_env, goal, not_checked, with_count

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[3] / "flower_app"
ENGINES = ("deployment+workers", "deployment", "simulation", "in-process")
OVERHEAD_GOAL, SIMULATION_GOAL = 0.25, 1.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env() -> dict:
    """child_env() for Flower's processes, offline."""
    return {
        **child_env(),
        # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # `flwr run` must never install the app's dependencies; and if anything tried, uv/pip find no index.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "UV_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
    }


class Processes:
    """Processes started here, each in its own session so that its children (Flower's SuperExec,
    ClientApp and ServerApp processes) stop with it; all stopped by PID in stop_all."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.descendants: list = []

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        """SIGTERM each started process's group, then SIGKILL whatever is left, by PID: the
        groups, and every descendant seen before (the SuperLink starts its SuperExec in a
        session of its own, which a group signal does not reach)."""
        import psutil

        descendants = []
        for _, proc in self.started:
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(descendants, timeout=max(0.1, deadline - time.monotonic()))
        for _, proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.descendants = descendants


def wait_for(check, timeout: float, what: str, procs: Processes, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if check():
            return
        time.sleep(0.3)
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"timed out after {timeout:.0f} s"
    raise RuntimeError(f"{what}: {state}; log:\n{procs.log(name)[-3000:]}")


def superlink_healthy(port: int, ca: Path) -> bool:
    """True once the SuperLink answers over TLS with a certificate the test CA vouches for."""
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ssl.create_default_context(cafile=str(ca)))
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def node_config_text(config: dict) -> str:
    """A node config as `--node-config` takes it (TOML values: strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


class Loopback:
    """A SuperLink with TLS and SuperNode authentication and one SuperNode per node config on
    127.0.0.1; with `worker` (the argv tail of `flexlora node serve`, e.g. ["--model",
    "tiny-llama"]), a node worker per SuperNode, its socket in the SuperNode's node config.
    `node_env`: extra environment of the node-side processes (e.g. OMP_NUM_THREADS).
    Use as a context manager: every process is stopped by PID on exit."""

    def __init__(self, workdir: str | Path, node_configs: list[dict], worker: list[str] | None = None, node_env: dict | None = None):
        self.work = Path(workdir)
        self.node_configs = node_configs
        self.worker = worker
        self.node_env = node_env or {}
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = Processes(self.work / "logs")
        # Sockets in a short private folder (a Unix socket path has at most ~100 bytes).
        self.sockets = Path(tempfile.mkdtemp(prefix="fxl", dir="/tmp")) if worker is not None else None
        self.port = free_port()
        self.env = flower_env()

    def home(self, name: str) -> dict:
        """Every Flower process gets its own FLWR_HOME."""
        (self.work / "flwr" / name).mkdir(parents=True, exist_ok=True)
        return {**self.env, "FLWR_HOME": str(self.work / "flwr" / name)}

    def socket_path(self, i: int) -> Path:
        return self.sockets / f"node-{i}.sock"

    def __enter__(self) -> Loopback:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        from flexlora.engines.flower.certs import make_node_keys, make_tls_certificates
        from flexlora.engines.node.channel import WorkerUnavailable, worker_status

        if not APP.is_dir():
            raise RuntimeError(f"the Flower app folder {APP} is missing (run from a source checkout)")
        n = len(self.node_configs)
        node_env = {**self.env, **self.node_env}
        workers = []
        for i in range(1, n + 1) if self.worker is not None else ():  # they load while the rest starts
            argv = [sys.executable, "-m", "flexlora.cli", "node", "serve", "--socket", str(self.socket_path(i)), *self.worker]
            workers.append((f"worker-{i}", self.procs.start(f"worker-{i}", argv, node_env)))
        creds = make_tls_certificates(self.work / "creds", ["127.0.0.1", "localhost"])
        keys = make_node_keys(self.work / "creds", [f"node-{i}" for i in range(1, n + 1)])
        self.cli_env = self.home("cli")
        (self.work / "flwr" / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{creds["ca_cert"]}"\n'
        )
        superlink = self.procs.start("superlink", [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(creds["ca_cert"]), "--ssl-certfile", str(creds["server_cert"]), "--ssl-keyfile", str(creds["server_key"]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
        ], self.home("superlink"))
        wait_for(lambda: superlink_healthy(self.port, creds["ca_cert"]), 180, "the SuperLink (TLS)", self.procs, "superlink", superlink)
        for i in range(1, n + 1):
            reg = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(keys[f"node-{i}"][1]), "loopback"],
                env=self.cli_env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180,
            )
            if reg.returncode != 0 or "registered successfully" not in reg.stdout:
                raise RuntimeError(f"registering node-{i} failed: {(reg.stdout + reg.stderr)[-2000:]}")
        for i, config in enumerate(self.node_configs, 1):
            if self.worker is not None:
                config = {**config, "worker-socket": str(self.socket_path(i))}
            self.procs.start(f"supernode-{i}", [
                str(BIN / "flower-supernode"),
                "--root-certificates", str(creds["ca_cert"]), "--superlink", f"127.0.0.1:{self.port}",
                "--auth-supernode-private-key", str(keys[f"node-{i}"][0]),
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", node_config_text(config),
            ], {**self.home(f"supernode-{i}"), **self.node_env})

        for i, (name, proc) in enumerate(workers, 1):
            def ready(path=self.socket_path(i)):
                try:
                    worker_status(path)
                    return True
                except WorkerUnavailable:
                    return False

            wait_for(ready, 600, f"node worker {i}", self.procs, name, proc)

    def run(self, overrides: list[str], run_dir: Path, timeout_s: float = 3600) -> float:
        """`flwr run flower_app` with these config overrides, writing to run_dir; returns its
        wall time. A failed run raises with the tail of its output."""
        (self.work / "run.toml").write_text(f"overrides = {json.dumps(' '.join([*overrides, f'output.dir={run_dir.parent}', f'output.name={run_dir.name}']))}\n")
        started = time.perf_counter()
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "loopback", "--run-config", str(self.work / "run.toml"), "--stream"],
            env=self.cli_env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout_s,
        )
        wall = time.perf_counter() - started
        (self.work / "logs" / f"flwr-run-{run_dir.name}.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0 or not (run_dir / "summary.json").is_file():
            raise RuntimeError(f"flwr run failed ({run.returncode}): {(run.stdout + run.stderr)[-3000:]}\n{self.procs.log('superlink')[-2000:]}")
        return wall

    def stop(self) -> None:
        self.procs.stop_all()
        if self.sockets is not None and self.sockets.is_dir():
            for p in self.sockets.iterdir():
                p.unlink()
            self.sockets.rmdir()


# ---------------------------------------------------------------- the benchmark


def bench_overrides(nodes: int, rounds: int, model: str, precision: str, device: str, extra: list[str]) -> list[str]:
    """The one config every engine runs: N training clients, all of them every round, the
    default training budget; a token evaluation (it is not part of the measured round)."""
    dtype, quant = ("bfloat16", "nf4") if precision == "nf4" else (precision, None)
    return [
        f"model={model}", f"model_dtype={dtype}", f"quantization={quant or 'null'}", f"device={device}", "seed=0",
        f"data.num_clients={nodes}", f"federation.clients_per_round={nodes}", f"federation.rounds={rounds}",
        f"flower.min_nodes={nodes}", "flower.node_wait_s=600", f"flower.max_in_flight={max(8, nodes)}",
        "eval.max_examples_per_client=1", "eval.max_new_tokens=4",
        *extra,
    ]


def read_rounds(run_dir: Path) -> list[dict]:
    """Per round: wall time (without the evaluation), the slowest client's training, overhead."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r.get("round") or not r.get("time"):
            continue
        t = r["time"]
        trains = [c["train_time_s"] for c in r["clients"].values() if "train_time_s" in c]
        slowest = max(trains) if trains else float("nan")
        wall = t["total_s"] - t["evaluation_s"]
        rows.append({
            "round": r["round"], "wall_s": wall, "slowest_train_s": slowest, "overhead_s": wall - slowest,
            "clients": len(r["clients"]), "failures": len(r.get("failures") or {}), "evaluation_s": t["evaluation_s"],
        })
    return rows


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


def run_benchmark(
    nodes: int = 2, rounds: int = 2, model: str = "smollm2-135m-instruct", precision: str = "float32", device: str = "cpu",
    engines: tuple[str, ...] = ENGINES, extra: list[str] = (), workdir: str | Path | None = None, threads: int | None = None,
    startup_repeat: int = 3, echo=print,
) -> dict:
    """Every engine's rounds on the same config; {"rows": [...], "startup": {...}, "config": {...}}."""
    if nodes < 1 or rounds < 1:
        raise ValueError(f"--nodes and --rounds must be >= 1, got {nodes} and {rounds}")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise ValueError(f"--engines: unknown {unknown[0]!r}; choose from {', '.join(ENGINES)}")
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
    worker_argv = ["--model", model, "--precision", precision, "--device", "auto" if device == "auto" else device, "--seed", "0", "--threads", str(threads)]
    node_configs = [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
    try:
        for engine in engines:
            run_dir = work / "runs" / engine.replace("+", "-")
            echo(f"bench deployment: {engine}, {nodes} nodes, {rounds} rounds, {model} ({precision}, {device}) ...")
            started = time.perf_counter()
            try:
                if engine.startswith("deployment"):
                    with Loopback(work / engine.replace("+", "-"), node_configs, worker_argv if engine.endswith("workers") else None,
                                  node_env={"OMP_NUM_THREADS": str(threads)}) as fed:
                        fed.run(overrides, run_dir)
                else:
                    cmd = [sys.executable, "-m", "flexlora.cli", "run", *overrides, f"output.dir={run_dir.parent}", f"output.name={run_dir.name}"]
                    if engine == "simulation":
                        cmd += ["--engine", "flower", f"flower.workers={nodes}"]
                    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=7200)
                    (work / f"{run_dir.name}.log").write_text(done.stdout + done.stderr)
                    if done.returncode != 0:
                        raise RuntimeError(f"{engine} run failed: {(done.stdout + done.stderr)[-3000:]}")
                echo(f"  done in {time.perf_counter() - started:.0f} s")
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # keep the rounds it finished; the others still run
                echo(f"  {engine} FAILED after {time.perf_counter() - started:.0f} s: {str(e).splitlines()[0]}")
            if (run_dir / "metrics.jsonl").is_file():
                rows += [{"engine": engine, **r} for r in read_rounds(run_dir)]
        startup = clientapp_startup(model, precision, device, startup_repeat) if startup_repeat else {}
    finally:
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "startup": startup, "config": {"nodes": nodes, "rounds": rounds, "model": model, "precision": precision,
                                                          "device": device, "threads_per_node": threads, "overrides": overrides}}


def steady(rows: list[dict], engine: str) -> list[dict]:
    """An engine's rounds the goals are checked on: rounds 2..K (round 1 when K = 1), and only
    rounds in which every client replied (a round short of a client is not the same work)."""
    mine = [r for r in rows if r["engine"] == engine and not r["failures"]]
    later = [r for r in mine if r["round"] >= 2]
    return later or mine


def format_table(result: dict) -> str:
    lines = [
        "| engine | round | round wall (s) | slowest client's training (s) | overhead (s) | overhead / training | clients (failed) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['engine']} | {r['round']} | {r['wall_s']:.1f} | {r['slowest_train_s']:.1f} | {r['overhead_s']:.1f} | "
            f"{r['overhead_s'] / r['slowest_train_s']:.0%} | {r['clients']} ({r['failures']}) |"
        )
    if result.get("startup"):
        lines += ["", "| ClientApp start-up, fresh process (median) | s |", "| --- | --- |"]
        lines += [f"| {name} | {s:.2f} |" for name, s in result["startup"].items()]
    return "\n".join(lines)


def goals(result: dict) -> list[str]:
    rows = result["rows"]
    lines = []
    workers = steady(rows, "deployment+workers")
    if workers:
        worst = max(workers, key=lambda r: r["overhead_s"] / r["slowest_train_s"])
        share = worst["overhead_s"] / worst["slowest_train_s"]
        lines.append(goal(
            share <= OVERHEAD_GOAL, f"with workers, a round's overhead <= {OVERHEAD_GOAL:.0%} of the slowest client's training",
            f"worst steady round {worst['round']}: {worst['overhead_s']:.1f} s over {worst['slowest_train_s']:.1f} s = {share:.0%}",
        ))
    else:
        lines.append(not_checked(f"with workers, overhead <= {OVERHEAD_GOAL:.0%}", "deployment+workers not run"))
    simulation = steady(rows, "simulation")
    if workers and simulation:
        dep = statistics.mean(r["wall_s"] for r in workers)
        sim = statistics.mean(r["wall_s"] for r in simulation)
        lines.append(goal(
            dep <= SIMULATION_GOAL * sim, f"a deployment round (workers) <= {SIMULATION_GOAL}x a simulation-engine round",
            f"steady rounds: {dep:.1f} s against {sim:.1f} s = {dep / sim:.2f}x",
        ))
    else:
        lines.append(not_checked(f"deployment round <= {SIMULATION_GOAL}x simulation", "needs deployment+workers and simulation"))
    return with_count(lines)


def write_json(result: dict, path: str | Path, argv: list[str] | None = None) -> None:
    from flexlora.reporting import write_json as write

    write(Path(path), {**result, "goals": goals(result), "command": argv})
