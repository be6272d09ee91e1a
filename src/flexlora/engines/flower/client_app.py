"""The client side on Flower: which client a node holds (its own files in a deployment, partition i
of the run's dataset in simulation), its model, and the ClientApp (`client_app`): `query` says
which client a node holds and what it can afford; `train` runs `client.train_client` on the
node's data and replies with the update.

torch, transformers and PEFT are imported only where a model or tensor is needed: in a
deployment every Message starts a fresh ClientApp process, and a `query` needs none of them.
With node config `worker-socket`, `train` hands the task to the node's long-lived worker
(`flexlora node serve`, which keeps the base model loaded) and needs none of them either."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flexlora.data.records import Issues, read_records
from flexlora.data.types import ClientData, Example
from flexlora.engines.flower.codec import NODE, TASK, decode_task, encode_update, is_packed
from flexlora.engines.flower.secagg import is_secure, secure_aggregation_mod, secure_reply
from flexlora.engines.node.channel import WORKER_SOCKET_KEY, train_on_worker  # torch-free: the worker path

if TYPE_CHECKING:
    from flexlora.config import ExperimentConfig

# Node-config keys a deployment node may set (simulation sets partition-id/num-partitions).
RESOURCE_KEYS = ("lora-rank", "rank-type", "memory-budget-mb")  # and num-examples, data-path, client-id
CLIENT_ERROR = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION

log = logging.getLogger(__name__)


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
    # The project's one record reader (JSON list or JSONL; a syntax error is a one-line
    # DataError naming file and line); a node's records are then held to the fields it needs.
    rows = [record.data for record in read_records(path, Issues("error"))]
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

        key = ("dataset", json.dumps(cfg.data.model_dump(), sort_keys=True), cfg.seed)
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
    from flexlora.config import config_from_dict  # only here and in training: the worker path's ClientApp skips it

    try:
        cfg = config_from_dict(json.loads(message.content.config_records[TASK]["config"]), check=False)
        data = node_client(context.node_config, cfg)
        resources = {k: context.node_config[k] for k in RESOURCE_KEYS if k in context.node_config}
        info = {"client_id": data.client_id, "num_examples": data.num_examples, "resources": resources}
        return Message(RecordDict({NODE: ConfigRecord({"node": json.dumps(info)})}), reply_to=message)
    except Exception as e:  # a node's failure is a reply, not a crash of the federation
        return _error_reply(message, e)


@client_app.train(mods=[secure_aggregation_mod])  # SecAgg+'s messages (flower.secure_aggregation) through Flower's mod
def _client_train(message: Message, context: Context) -> Message:
    def train(content: RecordDict) -> RecordDict:
        socket_path = context.node_config.get(WORKER_SOCKET_KEY)
        if socket_path:  # the node's worker trains; this process imports neither torch nor transformers
            # Packed arrays go to the worker as Flower received them: no conversion either way.
            return train_on_worker(str(socket_path), content, context.node_config, raw=is_packed(content, TASK))
        return train_reply(content, context.node_config, lambda cfg: node_model(context.node_config, cfg))

    try:
        content = message.content
        return Message(secure_reply(content, train) if is_secure(content) else train(content), reply_to=message)
    except Exception as e:
        return _error_reply(message, e)


def train_reply(content: RecordDict, node_config, model_for) -> RecordDict:
    """A train Message's content -> the reply's content: decode the task, find the node's
    client, train it with `client.train_client` on the model `model_for(cfg)` gives
    ((model, tokenizer, target modules)), encode the update, in the layout the task came in
    (packed, or the deployment bench's per-array baseline). The one training path of the
    in-process ClientApp and of the node worker (flexlora.engines.node.worker).

    The update's metrics also say when the task was received and when the reply was made
    (time.time(), `received_at` / `replied_at`): the server turns them into each direction's
    transport time (exact where server and node share a clock, as in the loopback bench)."""
    from flexlora.client import train_client

    received_at = time.time()
    task, cfg = decode_task(content)
    data = node_client(node_config, cfg)
    if data.client_id != task.client_id:
        raise ValueError(f"a task for client {task.client_id} reached the node holding {data.client_id}")
    model, tokenizer, targets = model_for(cfg)
    update = train_client(model, tokenizer, data, task, cfg, targets)
    update.metrics.update(received_at=received_at, replied_at=time.time())
    return encode_update(update, cfg.flower.transport_dtype, packed=is_packed(content, TASK))
