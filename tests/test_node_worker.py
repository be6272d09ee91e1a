"""The node worker (flexlora.engines.node): a long-lived process that keeps the base model loaded
and trains the tasks a Flower ClientApp hands it over a private Unix socket.

Most tests talk to a worker served from a thread of this process (same code as `flexlora node
serve`, without a second torch start-up); the fault tests that need a process to die run the
worker as a process (`python -m flexlora.cli node serve`) and SIGKILL it by PID. The federation
test drives the project's ServerApp (`serve`) over an in-process grid that hands each Message to
the real ClientApp, so that no Flower engine has to start (the TLS deployment with workers is in
tests/test_flower_deployment_workers.py; who may attach to a worker is in
tests/test_node_worker_access.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from test_flower import InProcessGrid

import flexlora
from flexlora import lora
from flexlora.config import load_config
from flexlora.data.synthetic import make_federation
from flexlora.engines.flower import client_app, decode_update, encode_task
from flexlora.engines.flower.client_app import node_model, train_reply
from flexlora.engines.node import channel
from flexlora.engines.node.channel import ChannelError, WorkerRefused, WorkerUnavailable
from flexlora.engines.node.worker import NodeWorker
from flexlora.models import TINY, default_target_modules, load_model
from flexlora.protocol import ClientTask

SRC = str(Path(flexlora.__file__).resolve().parents[1])
OVERRIDES = [
    "model=tiny-llama",
    "device=cpu",
    "seed=0",
    "data.num_clients=4",
    "data.train_per_client=6",
    "data.test_per_client=2",
    "data.cutoff_len=512",
    "train.steps=2",
    "train.batch_size=2",
    "train.micro_batch_size=1",
    "eval.max_new_tokens=4",
    "eval.max_examples_per_client=1",
    "resources.t1=2",
    "resources.t2=4",
    "resources.t3_attention=4",
    "resources.t3_mlp=16",
    "resources.t4=16",
]


def short_dir() -> Path:
    """A private folder with a short path (a Unix socket path has at most ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix="fxn", dir="/tmp"))


@pytest.fixture(scope="module")
def nodes():
    """Four clients' training data as files, and a node config for each."""
    folder = short_dir()
    fed = make_federation(num_clients=4, train_per_client=6, test_per_client=2, seed=0)
    configs = []
    for c in fed.clients:
        path = folder / f"{c.client_id}.json"
        path.write_text(json.dumps([{"instruction": e.instruction, "input": e.input, "output": e.output} for e in c.train]))
        configs.append({"data-path": str(path), "client-id": c.client_id})
    yield configs
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


class ThreadWorker:
    """A NodeWorker serving from a thread of this process."""

    def __init__(self, load: bool = True, **kwargs):
        self.folder = short_dir()
        self.path = self.folder / "w.sock"
        self.worker = NodeWorker(TINY, **kwargs)
        if load:
            self.worker.load()
        ready = threading.Event()
        self.thread = threading.Thread(target=self.worker.serve, args=(self.path, ready), daemon=True)
        self.thread.start()
        assert ready.wait(30)

    def close(self):
        self.worker.stop()
        self.thread.join(10)
        self.folder.rmdir()


@pytest.fixture(scope="module")
def worker():
    w = ThreadWorker()
    yield w
    w.close()


def _task(cfg, node, round_=1, factors=None, ranks=2, seed=7):
    model, _ = load_model(TINY, "cpu")
    shapes = lora.module_shapes(model, default_target_modules(model))
    return ClientTask(node["client-id"], round_, "T1", {m: ranks for m in shapes}, factors, seed)


def _start_process_worker(path: Path, log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flexlora.cli", "node", "serve", "--socket", str(path), "--model", TINY, "--device", "cpu"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait_ready(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            channel.worker_status(path)
            return
        except WorkerUnavailable:
            time.sleep(0.3)
    raise AssertionError(f"the worker was not ready within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# ---------------------------------------------------------------- the same training as in-process


def test_a_task_through_the_worker_gives_the_in_process_update_bit_for_bit(worker, nodes):
    cfg = load_config(overrides=OVERRIDES)
    node = nodes[0]
    local = lambda c: node_model({}, c)  # noqa: E731  (the in-process ClientApp's model)
    first = encode_task(_task(cfg, node), cfg)
    via_worker = decode_update(channel.train_on_worker(worker.path, first, {**node, "worker-socket": str(worker.path)}))
    in_process = decode_update(train_reply(first, node, local))
    # Round 2 starts from factors (tensors travel down too), at another rank.
    second = encode_task(_task(cfg, node, 2, via_worker.factors, ranks=2, seed=8), cfg)
    via_worker2 = decode_update(channel.train_on_worker(worker.path, second, node))
    in_process2 = decode_update(train_reply(second, node, local))
    for a, b in ((via_worker, in_process), (via_worker2, in_process2)):
        assert a.client_id == b.client_id == node["client-id"] and a.num_examples == b.num_examples
        assert a.factors.keys() == b.factors.keys() and len(a.factors) == 28
        for m in a.factors:
            assert torch.equal(a.factors[m][0], b.factors[m][0]) and torch.equal(a.factors[m][1], b.factors[m][1])
        assert a.metrics["train_loss_last"] == b.metrics["train_loss_last"]
    assert not torch.equal(via_worker2.factors[m][1], via_worker.factors[m][1])  # it did train again
    served = channel.worker_status(worker.path)["served"]
    assert [(s["client"], s["round"], s["ok"]) for s in served[-2:]] == [
        (node["client-id"], 1, True),
        (node["client-id"], 2, True),
    ]


CLIENTAPP_SIDE = r"""
import json, sys, time
started = time.perf_counter()
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flexlora.engines.flower import client_app  # the ClientApp object
from flexlora.engines.node import channel
imported = time.perf_counter() - started
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
head = json.loads(open(sys.argv[1]).read())
content = channel.frame_to_records(head, open(sys.argv[2], "rb").read())
message = Message(content, dst_node_id=7, message_type="train")
node_config = json.loads(sys.argv[3])
reply = client_app(message, Context(run_id=42, node_id=7, node_config=node_config, state=RecordDict(), run_config={}))
error = reply.error.reason if reply.has_error() else None
if error is None:
    head, body = channel.records_to_frame(reply.content, raw=True)
    open(sys.argv[4], "w").write(json.dumps(head))
    open(sys.argv[5], "wb").write(b"".join(body))
heavy = sorted(m for m in ("torch", "transformers", "peft", "accelerate", "pydantic", "flexlora.config") if m in sys.modules)
print(json.dumps({"heavy": heavy, "import_s": imported, "error": error}))
"""


def test_the_clientapp_on_the_worker_path_imports_neither_torch_nor_transformers(worker, nodes, tmp_path):
    """The real ClientApp, in a fresh process, trains through the worker: its reply is the
    update, and torch, transformers, PEFT, nor the config schema (pydantic: about 0.4 s of every
    ClientApp start, one per Message) were ever imported."""
    cfg = load_config(overrides=OVERRIDES)
    node = nodes[1]
    content = encode_task(_task(cfg, node), cfg)
    head, body = channel.records_to_frame(content, raw=True)
    (tmp_path / "task.json").write_text(json.dumps(head))
    (tmp_path / "task.bin").write_bytes(b"".join(body))
    node_config = {**node, "worker-socket": str(worker.path)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENTAPP_SIDE,
            str(tmp_path / "task.json"),
            str(tmp_path / "task.bin"),
            json.dumps(node_config),
            str(tmp_path / "reply.json"),
            str(tmp_path / "reply.bin"),
        ],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is None and result["heavy"] == [], result
    reply = channel.frame_to_records(json.loads((tmp_path / "reply.json").read_text()), (tmp_path / "reply.bin").read_bytes())
    update = decode_update(reply)
    expected = decode_update(train_reply(content, node, lambda c: node_model({}, c)))
    assert update.client_id == node["client-id"]
    assert all(torch.equal(update.factors[m][1], expected.factors[m][1]) for m in expected.factors)


def test_records_cross_the_channel_exactly_and_a_malformed_frame_is_one_line(worker):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord

    content = RecordDict(
        {
            "task": ConfigRecord({"task": "{}", "config": '{"a": 1}'}),
            "factors": ArrayRecord(
                {"b.lora_A": Array(np.arange(6, dtype=np.float16).reshape(2, 3)), "a.lora_A": Array(np.ones((1, 2), np.float32))}
            ),
            "deltas": ArrayRecord({"m.indices": Array(np.array([3, 1], np.int64))}),
        }
    )
    for raw in (False, True):  # safetensors (the previous layout's hand-off), or each Array's bytes as they are
        head, parts = channel.records_to_frame(content, raw=raw)
        back = channel.frame_to_records(head, b"".join(parts))
        assert list(back.array_records["factors"].keys()) == ["b.lora_A", "a.lora_A"]  # order kept
        for name, record in content.array_records.items():
            for key, array in record.items():
                got = back.array_records[name][key]
                assert got.numpy().dtype == array.numpy().dtype and np.array_equal(got.numpy(), array.numpy())
                assert got.data == array.data and (got.dtype, got.shape, got.stype) == (array.dtype, array.shape, array.stype)
        assert dict(back.config_records["task"]) == dict(content.config_records["task"])
    head, parts = channel.records_to_frame(content, raw=True)
    assert parts[0] is content.array_records["factors"]["b.lora_A"].data  # forwarded, not copied or converted
    with pytest.raises(ChannelError, match="lacks the tensor factors/x"):
        channel.frame_to_records({"arrays": {"factors": ["x"]}}, b"")
    with pytest.raises(ChannelError, match=r"array factors/x \(9 bytes\) runs past the payload \(4 bytes\)"):
        channel.frame_to_records({"raw": [["factors", "x", "uint8", [9], "numpy.ndarray", 9]]}, b"abcd")
    with pytest.raises(ChannelError, match="2 payload bytes no array describes"):
        channel.frame_to_records({"raw": [["factors", "x", "uint8", [2], "numpy.ndarray", 2]]}, b"abcd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # garbage on the socket: a one-line reply
        s.connect(str(worker.path))
        s.sendall(b"GET / HTTP/1.1\r\n" + b"x" * 64)
        head, _ = channel.recv_frame(s)
    assert head == {"ok": False, "error": "not a flexlora node frame (starts with b'GET ')"}
    assert channel.worker_status(worker.path)["fingerprint"]["model"] == TINY  # still serving


# ---------------------------------------------------------------- faults and bad input


def test_no_worker_listening_is_a_one_line_error_reply(run_identity, nodes, tmp_path):
    cfg = load_config(overrides=OVERRIDES)
    content = encode_task(_task(cfg, nodes[0]), cfg)
    missing = short_dir() / "nobody.sock"
    ctx = Context(
        run_id=42, node_id=1, node_config={**nodes[0], "worker-socket": str(missing)}, state=RecordDict(), run_config={}
    )
    reply = client_app(Message(content, dst_node_id=1, message_type="train"), ctx)
    assert reply.has_error()
    assert (
        reply.error.reason
        == f"WorkerUnavailable: no node worker listening at {missing} (start one: flexlora node serve --socket {missing})"
    )
    missing.parent.rmdir()


def test_a_task_for_another_base_model_is_refused_with_one_line(worker, nodes):
    node = nodes[0]
    for extra, wanted in (("model_dtype=bfloat16", "tiny-llama (bfloat16, seed 0)"), ("seed=1", "tiny-llama (float32, seed 1)")):
        cfg = load_config(overrides=OVERRIDES + [extra])
        with pytest.raises(WorkerRefused) as e:
            channel.train_on_worker(worker.path, encode_task(_task(cfg, node), cfg), node)
        assert str(e.value) == f"ValueError: this node worker serves tiny-llama (float32, seed 0), the task is for {wanted}"
    # A node config naming another local copy of the model is another model too.
    cfg = load_config(overrides=OVERRIDES)
    with pytest.raises(WorkerRefused, match=r"the task is for /\S+/elsewhere \(float32\)"):
        channel.train_on_worker(
            worker.path, encode_task(_task(cfg, node), cfg), {**node, "model": str(Path(node["data-path"]).parent / "elsewhere")}
        )
    assert channel.worker_status(worker.path)["served"][-1]["ok"] is False  # refused, and it serves on


def test_two_tasks_at_once_are_queued_never_interleaved_or_refused_when_the_queue_is_full(worker, nodes):
    cfg = load_config(overrides=OVERRIDES + ["train.steps=3"])
    results: dict[int, object] = {}

    def train(i):
        try:
            results[i] = decode_update(
                channel.train_on_worker(worker.path, encode_task(_task(cfg, nodes[i], seed=i), cfg), nodes[i])
            )
        except Exception as e:  # noqa: BLE001  (the test inspects it)
            results[i] = e

    before = len(channel.worker_status(worker.path)["served"])
    threads = [threading.Thread(target=train, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    served = channel.worker_status(worker.path)["served"][before:]
    assert sorted(s["client"] for s in served) == sorted(nodes[i]["client-id"] for i in (0, 1))
    first, second = sorted(served, key=lambda s: s["started"])
    assert first["finished"] <= second["started"]  # one after the other on the one model

    # With no queue, a task that arrives while another trains is refused at once.
    worker.worker.max_queued = 0
    try:
        slow = threading.Thread(target=train, args=(2,))
        slow.start()
        deadline = time.monotonic() + 60
        while worker.worker._pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(WorkerRefused, match=r"^node worker busy: a task is training and 0 wait \(--max-queued 0\)$"):
            channel.train_on_worker(worker.path, encode_task(_task(cfg, nodes[3]), cfg), nodes[3])
        slow.join(300)
        assert not isinstance(results[2], Exception)
    finally:
        worker.worker.max_queued = 4


def _wait_for_file(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


# ---------------------------------------------------------------- a federation


def test_a_federation_with_workers_drops_a_dead_node_and_takes_back_a_restarted_one(run_identity, nodes, tmp_path):
    """Four nodes through the project's ServerApp: A trains on a worker process that is killed
    mid-task in round 2 and restarted before round 3, B on a worker, C in-process (no worker),
    D names a socket nobody listens on. Every round completes from the others; A's and D's
    failures are dropouts with their one-line reasons; what round 1 saved stays; A is back in
    round 3."""
    from flexlora.engines.flower import serve
    from flexlora.experiment import Experiment

    cfg = load_config(
        overrides=OVERRIDES
        + [
            "federation.rounds=3",
            "federation.clients_per_round=4",
            "flower.min_nodes=4",
            "resources.profile=[T1, T2, T3, T4]",
            f"output.dir={tmp_path / 'runs'}",
            "output.name=workers",
            "output.keep_checkpoints=3",
        ]
    )
    folder = short_dir()
    path_a, marker = folder / "a.sock", tmp_path / "paused"
    b = ThreadWorker()
    logs = [tmp_path / "a1.log", tmp_path / "a2.log"]
    proc = _start_process_worker(path_a, logs[0], {"FLEXLORA_FAULT_PAUSE": "train_step:2", "FLEXLORA_FAULT_MARKER": str(marker)})
    procs = [proc]
    try:
        _wait_ready(path_a, proc, logs[0])

        def kill_and_restart():
            _wait_for_file(marker)
            _kill(procs[0])
            procs.append(_start_process_worker(path_a, logs[1]))

        killer = threading.Thread(target=kill_and_restart, daemon=True)
        killer.start()
        configs = {
            101: {**nodes[0], "worker-socket": str(path_a)},
            102: {**nodes[1], "worker-socket": str(b.path)},
            103: dict(nodes[2]),
            104: {**nodes[3], "worker-socket": str(folder / "nobody.sock")},
        }

        class Grid(InProcessGrid):
            def _answer(self, m):
                if m.metadata.dst_node_id == 101 and m.metadata.group_id == "3":
                    killer.join(120)
                    _wait_ready(path_a, procs[-1], logs[1])  # restarted between rounds
                return super()._answer(m)

        exp = Experiment(cfg, echo=lambda *_: None, engine="flower-deployment")
        try:
            run_dir = serve(exp, Grid(configs))
        finally:
            exp.close()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        a, bb, c, d = (n["client-id"] for n in nodes)
        assert [r["round"] for r in records] == [0, 1, 2, 3]
        no_worker = f"WorkerUnavailable: no node worker listening at {folder / 'nobody.sock'} (start one: flexlora node serve --socket {folder / 'nobody.sock'})"
        assert sorted(records[1]["clients"]) == sorted([a, bb, c])
        assert records[2]["failures"][a] == (
            f"WorkerGone: the node worker at {path_a} closed the channel before replying (stopped or killed mid-task?)"
        )
        assert sorted(records[2]["clients"]) == sorted([bb, c])
        assert sorted(records[3]["clients"]) == sorted([a, bb, c])
        for r in records[1:]:
            assert r["failures"][d] == no_worker
        # What round 1 saved is still there (its checkpoint, kept), and the run finished.
        kept = {p.name for p in (run_dir / "checkpoint").iterdir()}
        assert {f"checkpoint-00000{r}.json" for r in (1, 2, 3)} | {f"state-00000{r}.safetensors" for r in (1, 2, 3)} <= kept, kept
        assert (run_dir / "summary.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
        assert "round 3: task for client" in logs[1].read_text()
        assert procs[0].returncode == -signal.SIGKILL and len(procs) == 2
        # A clean stop (SIGTERM, as systemd sends) removes the socket file; a killed worker's
        # was left behind and its successor replaced it (above).
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=60) == 0 and not path_a.exists()
    finally:
        for p in procs:
            _kill(p)
        b.close()
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
