"""A loopback Flower deployment on one machine (`Loopback`): a SuperLink and N SuperNodes on
127.0.0.1 as separate processes, with TLS (a test CA) and SuperNode authentication, each node
optionally handing its tasks to its own node worker (`flexlora node serve`); and the process
handling it needs (`Processes`: start, log, stop every process it started by PID). Used by
`flexlora bench deployment` and by the deployment tests.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flexlora.bench.common import child_env
from flexlora.engines import FLOWER_APP as APP
from flexlora.extras import require

BIN = Path(sys.executable).parent
# Seconds between a SuperExec's polls for a task to start (a ClientApp on a node, the ServerApp
# beside the SuperLink): Flower's default is 1 s, of which a task waits half on average at every
# start; set as docs/flower.md's setup sets it.
SUPEREXEC_POLL_S = 0.2
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


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
            proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
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
    `node_env`: extra environment of the node-side processes (e.g. OMP_NUM_THREADS); `env`: of
    every process; `superexec_poll_s`: the SuperExecs' poll interval (None: Flower's default);
    `waits_dir`: record Flower's idle waits there (bench/waits).
    Use as a context manager: every process is stopped by PID on exit."""

    def __init__(
        self,
        workdir: str | Path,
        node_configs: list[dict],
        worker: list[str] | None = None,
        node_env: dict | None = None,
        env: dict | None = None,
        superexec_poll_s: float | None = SUPEREXEC_POLL_S,
        waits_dir: Path | None = None,
    ):
        self.work = Path(workdir)
        self.node_configs = node_configs
        self.worker = worker
        self.node_env = node_env or {}
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = Processes(self.work / "logs")
        # Sockets in a short private folder (a Unix socket path has at most ~100 bytes).
        self.sockets = Path(tempfile.mkdtemp(prefix="fxl", dir="/tmp")) if worker is not None else None
        self.port = free_port()
        self.env = {**flower_env(), **(env or {})}
        if superexec_poll_s is not None:
            self.env[SUPEREXEC_POLL_ENV] = str(superexec_poll_s)
        if waits_dir is not None:
            from flexlora.bench import waits

            Path(waits_dir).mkdir(parents=True, exist_ok=True)
            self.env[waits.ENV] = str(waits_dir)
            self.env["PYTHONPATH"] = os.pathsep.join([str(waits.FOLDER), self.env.get("PYTHONPATH", "")])

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

        require("psutil", "a loopback Flower deployment (flexlora bench deployment)")
        if not (APP / "pyproject.toml").is_file():
            raise RuntimeError(f"the Flower app {APP} is missing from the installed package")
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
        superlink = self.procs.start(
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
                str(self.port),
            ],
            self.home("superlink"),
        )
        wait_for(
            lambda: superlink_healthy(self.port, creds["ca_cert"]), 180, "the SuperLink (TLS)", self.procs, "superlink", superlink
        )
        for i in range(1, n + 1):
            reg = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(keys[f"node-{i}"][1]), "loopback"],
                env=self.cli_env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=180,
            )
            if reg.returncode != 0 or "registered successfully" not in reg.stdout:
                raise RuntimeError(f"registering node-{i} failed: {(reg.stdout + reg.stderr)[-2000:]}")
        for i, config in enumerate(self.node_configs, 1):
            if self.worker is not None:
                config = {**config, "worker-socket": str(self.socket_path(i))}
            self.procs.start(
                f"supernode-{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--root-certificates",
                    str(creds["ca_cert"]),
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--auth-supernode-private-key",
                    str(keys[f"node-{i}"][0]),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config_text(config),
                ],
                {**self.home(f"supernode-{i}"), **self.node_env},
            )

        for i, (name, proc) in enumerate(workers, 1):
            socket_path = self.socket_path(i)

            def ready(path=socket_path):
                try:
                    worker_status(path)
                    return True
                except WorkerUnavailable:
                    return False

            wait_for(ready, 600, f"node worker {i}", self.procs, name, proc)

    def run(self, overrides: list[str], run_dir: Path, timeout_s: float = 3600) -> float:
        """`flwr run` of the packaged Flower app with these config overrides, writing to run_dir; returns its
        wall time. A failed run raises with the tail of its output."""
        (self.work / "run.toml").write_text(
            f"overrides = {json.dumps(' '.join([*overrides, f'output.dir={run_dir.parent}', f'output.name={run_dir.name}']))}\n"
        )
        started = time.perf_counter()
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "loopback", "--run-config", str(self.work / "run.toml"), "--stream"],
            env=self.cli_env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
        )
        wall = time.perf_counter() - started
        (self.work / "logs" / f"flwr-run-{run_dir.name}.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0 or not (run_dir / "summary.json").is_file():
            raise RuntimeError(
                f"flwr run failed ({run.returncode}): {(run.stdout + run.stderr)[-3000:]}\n{self.procs.log('superlink')[-2000:]}"
            )
        return wall

    def stop(self) -> None:
        self.procs.stop_all()
        if self.sockets is not None and self.sockets.is_dir():
            for p in self.sockets.iterdir():
                p.unlink()
            self.sockets.rmdir()
