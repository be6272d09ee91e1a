"""Flower apps: any aggregation method of the project on Flower's simulation and deployment
engines, with the project's own server, client step and evaluation unchanged.

- ServerApp (`server_app`, or `run_simulation`): builds the same `Experiment` as the in-process
  runtime (model, data, FederatedServer, centralised evaluation, run folder), finds out which
  client each node holds, and runs the same `run_rounds` loop with `FlowerRuntime`, which only
  turns ClientTasks into Flower Messages and replies back into ClientUpdates.
- `FederatedStrategy`: a Flower Strategy around the FederatedServer. One Message per node, each
  with the LoRA factors at that client's own ranks (Flower's stock strategies send one shared
  ArrayRecord to everyone); `configure_train`/`aggregate_train` are built from the same two
  halves FlowerRuntime uses, so the strategy also works under Flower's own `Strategy.start`.
- ClientApp (`client_app`): `query` says which client a node holds and what it can afford;
  `train` runs `client.train_client` on the node's data and replies with the factors.

On the wire (no pickle): factors are an ArrayRecord "factors" with keys `<module>.lora_A` /
`<module>.lora_B` (numpy .npy bytes, float32 or float16 per `flower.transport_dtype`); the
ClientTask and the experiment config travel as JSON strings in a ConfigRecord "task"; the
reply's ClientUpdate fields in a ConfigRecord "update". A method's global base offset (FLoRA,
SLoRA's sparse stage) goes down as an ArrayRecord "base_offset" (one dense (out, in) array per
module, transport dtype); SLoRA's sparse deltas come back as an ArrayRecord "deltas"
(`<module>.indices` int64, `<module>.values`), their shapes in the "update" JSON.

Which client a node is: in simulation, node i holds training client i (`partition-id`); in a
deployment, the node config names its data (`data-path`, optionally `client-id`) and its
resources (`lora-rank=N`, `rank-type=T3` or `memory-budget-mb=M`; none: the run's profile).
A node declares its size (aggregation weight n_k) once, in its discovery reply: its training-set
size, or `num-examples=N` from its node config (set by the node's operator); the server rejects
a later reply claiming more, and `federation.max_weight_share` bounds what any declared size buys.

torch, transformers and PEFT are imported only where a model or tensor is needed: in a
deployment every Message starts a fresh ClientApp process, and a `query` needs none of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import time
from dataclasses import asdict
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from flexlora.config import ConfigError, ExperimentConfig, config_from_dict, load_config
from flexlora.data.types import ClientData, Example
from flexlora.resources import declared_rank_type, paper_rank_types

if TYPE_CHECKING:
    import torch

    from flexlora.protocol import ClientUpdate, Factors
    from flexlora.protocol import ClientTask
    from flexlora.protocol import ClientFailure
    from flexlora.server import FederatedServer

log = logging.getLogger(__name__)

TASK, UPDATE, FACTORS, NODE = "task", "update", "factors", "node"
OFFSET, DELTAS = "base_offset", "deltas"  # the protocol's other tensor fields (see protocol.flatten)
DTYPES = {"float32": np.float32, "float16": np.float16}
# Node-config keys a deployment node may set (simulation sets partition-id/num-partitions).
RESOURCE_KEYS = ("lora-rank", "rank-type", "memory-budget-mb")  # and num-examples, data-path, client-id
CLIENT_ERROR = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


# ---------------------------------------------------------------------------------------------
# Codecs: ClientTask / ClientUpdate <-> Flower records
# ---------------------------------------------------------------------------------------------


def tensors_to_record(tensors: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """Named tensors as an ArrayRecord: floating-point ones cast to the transport dtype (and
    checked finite in it), integer ones as int64."""
    import torch

    record = ArrayRecord()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            array = t.to(torch.float32).numpy().astype(DTYPES[dtype])
            if not np.isfinite(array).all():
                raise ValueError(f"{name} is not finite as {dtype} (overflow?); use flower.transport_dtype=float32")
        else:
            array = t.numpy().astype(np.int64)
        record[name] = Array(array)
    return record


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The inverse of tensors_to_record: float32 and int64 tensors."""
    import torch

    out = {}
    for name, array in record.items():
        value = array.numpy()
        out[name] = torch.from_numpy(value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float32))
    return out


def factors_to_record(factors: dict[str, Factors], dtype: str = "float32") -> ArrayRecord:
    """LoRA factors as an ArrayRecord (`<module>.lora_A` / `.lora_B`), cast to the transport dtype."""
    from flexlora import protocol  # torch: only where tensors are

    return tensors_to_record(protocol.factors_to_tensors(factors), dtype)


def record_to_factors(record: ArrayRecord) -> dict[str, Factors]:
    """The inverse of factors_to_record, as float32 tensors."""
    from flexlora import protocol  # torch: only where tensors are

    return protocol.tensors_to_factors(record_to_tensors(record))


def encode(obj, dtype: str, meta_record: str, **extra: str) -> RecordDict:
    """A protocol object as Flower records: each tensor field of protocol.flatten as an
    ArrayRecord named after the field, the metadata as JSON in ConfigRecord `meta_record`
    (with `extra` JSON strings beside it). No method-specific code: a new payload field of
    the protocol travels as it is."""
    from flexlora import protocol  # torch: only where tensors are

    tensors, meta = protocol.flatten(obj)
    grouped: dict[str, dict] = {name: {} for name in meta["tensor_fields"]}
    for key, t in tensors.items():
        name, _, rest = key.partition("/")
        grouped[name][rest] = t
    content = RecordDict({meta_record: ConfigRecord({meta_record: json.dumps(meta), **extra})})
    for name, group in grouped.items():
        content[name] = tensors_to_record(group, dtype)
    return content


def decode(content: RecordDict, meta_record: str):
    """The inverse of encode (one-line ValueError on a malformed message)."""
    from flexlora import protocol  # torch: only where tensors are

    meta = json.loads(content.config_records[meta_record][meta_record])
    tensors = {}
    for name in meta.get("tensor_fields", ()):
        if name not in content.array_records:
            raise ValueError(f"the message lacks its {name!r} arrays")
        tensors.update({f"{name}/{k}": v for k, v in record_to_tensors(content.array_records[name]).items()})
    return protocol.unflatten(tensors, meta)


def encode_task(task: ClientTask, cfg: ExperimentConfig) -> RecordDict:
    return encode(task, cfg.flower.transport_dtype, TASK, config=json.dumps(cfg.to_dict()))


def decode_task(content: RecordDict) -> tuple[ClientTask, ExperimentConfig]:
    task = decode(content, TASK)
    # Checked on the server already; paths in it are the server's, not this node's.
    cfg = config_from_dict(json.loads(content.config_records[TASK]["config"]), check=False)
    return task, cfg


def encode_update(update: ClientUpdate, dtype: str) -> RecordDict:
    return encode(update, dtype, UPDATE)


def decode_update(content: RecordDict) -> ClientUpdate:
    from flexlora import protocol  # torch: only where tensors are

    update = decode(content, UPDATE)
    if not isinstance(update, protocol.ClientUpdate):
        raise ValueError(f"expected a ClientUpdate, got a {type(update).__name__}")
    return update


def message_bytes(message: Message) -> int:
    """Bytes Flower transfers for a message: its serialized objects (identical array chunks,
    e.g. all-zero B matrices, are sent once). TLS/HTTP framing is not included."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors alone (numel x itemsize): LoRA factors, and a base offset or sparse
    deltas where the method sends them."""
    return sum(
        int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        for key in (FACTORS, OFFSET, DELTAS)
        if key in content.array_records
        for a in content.array_records[key].values()
    )


# ---------------------------------------------------------------------------------------------
# Server side: strategy and runtime
# ---------------------------------------------------------------------------------------------


class FederatedStrategy(Strategy):
    """A Flower Strategy that sends every sampled client its own task (factors at its own ranks)
    and hands the replies to the project's FederatedServer, whatever its aggregation method."""

    def __init__(self, server: FederatedServer, nodes: dict[str, int], timeout_s: float = 3600.0):
        self.server = server
        self.nodes = dict(nodes)  # client id -> Flower node id
        self.timeout_s = timeout_s
        self._pending: dict[int, tuple[list[ClientTask], list[Message]]] = {}
        self.last_results: list[ClientUpdate | ClientFailure] = []

    # The two halves shared with FlowerRuntime.
    def task_messages(self, tasks: list[ClientTask]) -> list[Message]:
        cfg = self.server.cfg
        unknown = [t.client_id for t in tasks if t.client_id not in self.nodes]
        if unknown:
            raise ValueError(f"no Flower node holds client {unknown[0]}")
        return [
            Message(encode_task(t, cfg), dst_node_id=self.nodes[t.client_id], message_type=MessageType.TRAIN, group_id=str(t.round))
            for t in tasks
        ]

    def collect(self, tasks: list[ClientTask], messages: list[Message], replies) -> list[ClientUpdate | ClientFailure]:
        """Replies -> one ClientUpdate or ClientFailure per task, in task order (the order the
        in-process runtime aggregates in), each update's metrics with the bytes moved."""
        from flexlora.protocol import ClientFailure

        by_node = {r.metadata.src_node_id: r for r in replies}
        results: list[ClientUpdate | ClientFailure] = []
        for task, message in zip(tasks, messages):
            reply = by_node.get(message.metadata.dst_node_id)
            if reply is None:
                results.append(ClientFailure(task.client_id, f"no reply within {self.timeout_s:.0f} s"))
            elif reply.has_error():
                results.append(ClientFailure(task.client_id, reply.error.reason))
            else:
                try:
                    update = decode_update(reply.content)
                    if update.client_id != task.client_id:
                        raise ValueError(f"reply from client {update.client_id} to a task for {task.client_id}")
                except (KeyError, ValueError, TypeError) as e:
                    results.append(ClientFailure(task.client_id, f"bad reply: {type(e).__name__}: {e}"))
                    continue
                update.metrics.update(
                    bytes_down=message_bytes(message),
                    bytes_up=message_bytes(reply),
                    payload_bytes_down=payload_bytes(message.content),
                    payload_bytes_up=payload_bytes(reply.content),
                )
                results.append(update)
        return results

    # Flower's Strategy interface.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # The global state lives in the FederatedServer; `arrays` (Flower's shared model) is unused.
        tasks = self.server.configure(server_round, self.server.sample(server_round))
        messages = self.task_messages(tasks)
        self._pending[server_round] = (tasks, messages)
        return messages

    def aggregate_train(self, server_round: int, replies):
        tasks, messages = self._pending.pop(server_round)
        self.last_results = self.collect(tasks, messages, list(replies))
        # The server validates each update against its task, leaves rejected ones out and
        # aggregates (or keeps the previous state), exactly as for the in-process runtime.
        outcome = self.server.complete_round(server_round, tasks, self.last_results)
        updates = outcome.updates
        if outcome.kept_previous_state:
            return None, None
        state = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in (self.server.state or {}).items()})
        losses = [u.metrics["train_loss_last"] for u in updates if "train_loss_last" in u.metrics]
        metrics = MetricRecord({"clients": len(updates), "train_loss_last": float(np.mean(losses)) if losses else 0.0})
        return state, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return []  # evaluation is centralised: the ServerApp scores the global adapter on held-out clients

    def aggregate_evaluate(self, server_round: int, replies):
        return None

    def summary(self) -> None:
        log.info("FederatedStrategy: method %s, %d nodes", self.server.cfg.method, len(self.nodes))


class FlowerRuntime:
    """A `server.Runtime` over a Flower Grid: tasks out as Messages, replies back as updates."""

    def __init__(self, strategy: FederatedStrategy, grid: Grid):
        self.strategy = strategy
        self.grid = grid

    def train(self, tasks: list[ClientTask]) -> list[ClientUpdate | ClientFailure]:
        messages = self.strategy.task_messages(tasks)
        replies = self.grid.send_and_receive(messages, timeout=self.strategy.timeout_s)
        return self.strategy.collect(tasks, messages, list(replies))


def wait_for_nodes(grid: Grid, count: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} Flower nodes connected within {wait_s:.0f} s (flower.min_nodes, flower.node_wait_s)")
        time.sleep(0.5)


def discover(grid: Grid, cfg: ExperimentConfig, min_nodes: int, echo=print) -> dict[str, dict]:
    """Ask every connected node which client it holds: client id -> its query reply (node_id,
    num_examples and any declared resources)."""
    nodes = wait_for_nodes(grid, min_nodes, cfg.flower.node_wait_s)
    content = RecordDict({TASK: ConfigRecord({"config": json.dumps(cfg.to_dict())})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY, group_id="discover") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=cfg.flower.round_timeout_s))
    found: dict[str, dict] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            echo(f"flexlora: warning: node {node} left out: {reply.error.reason}")
            continue
        info = json.loads(reply.content.config_records[NODE]["node"])
        cid = info["client_id"]
        if cid in found:
            raise RuntimeError(f"nodes {found[cid]['node_id']} and {node} both hold client {cid}; give each a distinct client-id")
        found[cid] = {**info, "node_id": node}
    silent = sorted(set(nodes) - {r.metadata.src_node_id for r in replies})
    if silent:
        echo(f"flexlora: warning: {len(silent)} node(s) did not answer within {cfg.flower.round_timeout_s:.0f} s and are left out: {silent}")
    if not found:
        raise RuntimeError("no Flower node answered with a usable client")
    return found


def serve(exp, grid: Grid, min_nodes: int | None = None) -> Path:
    """The ServerApp's work: discover the nodes' clients, build the server, run every round
    through Flower, write the run folder (the same files as the in-process runtime)."""
    cfg = exp.cfg
    if min_nodes is None:
        min_nodes = cfg.flower.min_nodes or cfg.federation.clients_per_round
    found = discover(grid, cfg, min_nodes, exp.echo)
    order = {c.client_id: i for i, c in enumerate(exp.dataset.clients)}
    # The server's own dataset order where it knows the clients (simulation: identical rank
    # draws to the in-process runtime), else by id.
    client_ids = sorted(found, key=lambda cid: (order.get(cid, math.inf), cid))
    r = cfg.resources
    rank_types = paper_rank_types(r.t1, r.t2, r.t3_attention, r.t3_mlp, r.t4)
    declared = {}
    sizes = {cid: found[cid]["num_examples"] for cid in client_ids}
    for cid in client_ids:
        try:
            rank_type = declared_rank_type(found[cid].get("resources", {}), exp.shapes, rank_types)
        except ValueError as e:
            raise ConfigError(f"node {found[cid]['node_id']} (client {cid}): {e}") from None
        if rank_type is not None:
            declared[cid] = rank_type
    server = exp.make_server(client_ids, declared, sizes)
    strategy = FederatedStrategy(server, {cid: found[cid]["node_id"] for cid in client_ids}, cfg.flower.round_timeout_s)
    exp.run(FlowerRuntime(strategy, grid))
    return exp.finish()


def config_from_run_config(run_config) -> tuple[ExperimentConfig, Path | None]:
    """(experiment config, run folder to resume or None) of a deployment run, from its run
    config: `config-file` (a YAML path on the SuperLink's machine, may be empty), `overrides`
    (key=value words, shell-quoted where needed) and `resume` (a run folder to continue from
    its last checkpoint; its config.yaml is then the config file)."""
    resume = str(run_config.get("resume", "") or "") or None
    path = str(run_config.get("config-file", "") or "") or None
    if resume is not None:
        if path is not None:
            raise ConfigError("run config: resume takes its config from the run folder; leave config-file empty")
        path = str(Path(resume) / "config.yaml")
        if not Path(path).is_file():
            raise ConfigError(f"run config: resume: {resume} is not a run folder (no config.yaml)")
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    return load_config(path, [*overrides, "engine=flower"]), Path(resume) if resume else None


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from flexlora.experiment import Experiment

    cfg, resume = config_from_run_config(context.run_config)
    exp = Experiment(cfg, engine="flower-deployment", resume=resume)
    try:
        serve(exp, grid)
    finally:
        exp.close()


# ---------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------

_CACHE: dict[str, tuple] = {}  # one model and one dataset per process (clients swap adapters)


def _cached(kind: str, key, build):
    hit = _CACHE.get(kind)
    if hit is None or hit[0] != key:
        _CACHE[kind] = hit = (key, build())
    return hit[1]


def load_node_data(path: str | Path, client_id: str | None = None) -> ClientData:
    """A deployment node's own training data: a JSON list or JSONL file of
    {"instruction", "input", "output"} records, or a folder with train.json / train.jsonl
    (and optionally test.json(l))."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data-path not found: {path}")
    if path.is_dir():
        train = _first_existing(path, ("train.json", "train.jsonl"))
        if train is None:
            raise FileNotFoundError(f"data-path {path} is a folder without train.json or train.jsonl")
        test = _first_existing(path, ("test.json", "test.jsonl"))
        name = path.name
    else:
        train, test, name = path, None, path.stem
    examples = _read_examples(train)
    if not examples:
        raise ValueError(f"{train}: no training examples")
    category = examples[0].category or name
    return ClientData(client_id or name, category, examples, _read_examples(test) if test else [])


def _first_existing(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_examples(path: Path) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    examples = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise ValueError(f"{path}: record {i} needs string fields 'instruction' and 'output'")
        examples.append(Example(row["instruction"], str(row.get("input") or ""), row["output"], str(row.get("category") or "")))
    return examples


def node_client(node_config, cfg: ExperimentConfig) -> ClientData:
    """The client this node holds: its own files (deployment) or partition i of the run's
    dataset (simulation); node config `num-examples` sets its declared size (data weight)."""
    data = _node_data(node_config, cfg)
    if "num-examples" in node_config:
        n = node_config["num-examples"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"node config num-examples must be a positive integer, got {n!r}")
        data = dataclasses.replace(data, weight=n)
    return data


def _node_data(node_config, cfg: ExperimentConfig) -> ClientData:
    if node_config.get("data-path"):
        path = str(node_config["data-path"])
        cid = node_config.get("client-id")
        return _cached("data", ("file", path, cid), lambda: load_node_data(path, str(cid) if cid else None))
    if "partition-id" in node_config:
        from flexlora.data.sources import load_federated_dataset

        key = ("dataset", json.dumps(asdict(cfg.data), sort_keys=True), cfg.seed)
        dataset = _cached("data", key, lambda: load_federated_dataset(cfg.data, cfg.seed))
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(dataset.clients):
            raise ValueError(f"partition-id {pid} is outside the {len(dataset.clients)} training clients")
        return dataset.clients[pid]
    raise ValueError("the node config names no data: set data-path (and optionally client-id)")


def node_model(node_config, cfg: ExperimentConfig):
    """(model, tokenizer, target modules) on this node; node config `model` / `device` override
    the run's (e.g. a local copy of the same base model)."""
    from flexlora.experiment import load_base, resolve_device
    from flexlora.models import default_target_modules

    source = str(node_config.get("model") or cfg.model)
    device = resolve_device(str(node_config.get("device") or cfg.device))
    model, tokenizer = _cached(
        "model",
        (source, str(device), cfg.seed, cfg.model_dtype, cfg.quantization, cfg.train.gradient_checkpointing),
        lambda: load_base(cfg, device, source),
    )
    return model, tokenizer, cfg.lora.target_modules or default_target_modules(model)


def _error_reply(message: Message, e: Exception) -> Message:
    log.warning("client failed: %s: %s", type(e).__name__, e)
    return Message(Error(code=CLIENT_ERROR, reason=f"{type(e).__name__}: {e}"), reply_to=message)


client_app = ClientApp()


@client_app.query()
def _client_query(message: Message, context: Context) -> Message:
    try:
        cfg = config_from_dict(json.loads(message.content.config_records[TASK]["config"]), check=False)
        data = node_client(context.node_config, cfg)
        resources = {k: context.node_config[k] for k in RESOURCE_KEYS if k in context.node_config}
        info = {"client_id": data.client_id, "num_examples": data.num_examples, "resources": resources}
        return Message(RecordDict({NODE: ConfigRecord({"node": json.dumps(info)})}), reply_to=message)
    except Exception as e:  # a node's failure is a reply, not a crash of the federation
        return _error_reply(message, e)


@client_app.train()
def _client_train(message: Message, context: Context) -> Message:
    from flexlora.client import train_client

    try:
        task, cfg = decode_task(message.content)
        data = node_client(context.node_config, cfg)
        if data.client_id != task.client_id:
            raise ValueError(f"a task for client {task.client_id} reached the node holding {data.client_id}")
        model, tokenizer, targets = node_model(context.node_config, cfg)
        update = train_client(model, tokenizer, data, task, cfg, targets)
        return Message(encode_update(update, cfg.flower.transport_dtype), reply_to=message)
    except Exception as e:
        return _error_reply(message, e)


# ---------------------------------------------------------------------------------------------
# `flexlora run --engine flower`: Flower's simulation engine, in this process
# ---------------------------------------------------------------------------------------------


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record):  # the project pins flwr 1.41, where run_simulation works
        return "run_simulation" not in record.getMessage()


def backend_config(cfg: ExperimentConfig, device: torch.device) -> dict:
    import torch

    f = cfg.flower
    cpus = f.cpus_per_worker or max(1, (os.cpu_count() or 1) // f.workers)
    cuda = device.type == "cuda"
    gpus = f.gpus_per_worker if f.gpus_per_worker is not None else (1.0 / f.workers if cuda else 0.0)
    init_args = {
        "num_cpus": cpus * f.workers,
        "num_gpus": torch.cuda.device_count() if cuda else 0,
        "object_store_memory": f.ray_object_store_mb * 2**20,
        "include_dashboard": False,
    }
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus}, "init_args": init_args}


def run_simulation(cfg: ExperimentConfig, echo=print, resume: str | Path | None = None) -> Path:
    """Run the experiment on Flower's simulation engine (Ray actors as ClientApps), or continue
    the run in the folder `resume`; returns the run folder, with the same files as the
    in-process runtime's."""
    from flwr.simulation import run_simulation as flower_simulation

    from flexlora.experiment import Experiment

    exp = Experiment(cfg, echo, engine="flower-simulation", resume=resume)
    # Flower's files stay inside the run folder; no telemetry, no update check, no installs.
    flower_env = {
        "FLWR_HOME": str(exp.run_dir / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    saved_env = {k: os.environ.get(k) for k in flower_env}
    for k, v in flower_env.items():
        os.environ.setdefault(k, v)
    done: dict[str, Path] = {}
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        done["run_dir"] = serve(exp, grid, min_nodes=len(exp.dataset.clients))

    flwr_logger = logging.getLogger("flwr")
    level, deprecation = flwr_logger.level, _DropRunSimulationDeprecation()
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(deprecation)
    try:
        flower_simulation(
            server_app=app,
            client_app=client_app,
            num_supernodes=len(exp.dataset.clients),
            backend_config=backend_config(cfg, exp.device),
        )
    finally:
        exp.close()
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(deprecation)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "run_dir" not in done:
        raise RuntimeError("the Flower simulation stopped before the run finished; see the log above")
    return done["run_dir"]
