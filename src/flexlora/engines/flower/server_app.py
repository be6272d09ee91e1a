"""The server side on Flower: `FederatedStrategy` (a Flower Strategy around the project's
FederatedServer, one Message per node with that client's own task), `FlowerRuntime` (the same two
halves for `run_rounds`), node discovery, and the ServerApp (`server_app`) of a deployment."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from flexlora.engines.flower.codec import NODE, TASK, decode_update, encode_task, message_objects, payload_bytes

if TYPE_CHECKING:
    from flexlora.config import ExperimentConfig
    from flexlora.protocol import ClientFailure, ClientTask, ClientUpdate
    from flexlora.server import FederatedServer

log = logging.getLogger(__name__)

# Seconds between pulls for replies where the grid has no pull_interval of its own (the
# deployment's): a pull that finds nothing is one small request, and a reply waits at most this
# long to be seen. The Grid API has no blocking pull to wait on instead.
POLL_S = 0.2
# The deployment bench's baseline (`flexlora bench deployment`, engine previous+workers), never a
# user setting: set in a ServerApp's environment, it sends tasks in the previous per-array layout,
# one push_messages call per task, and polls every PREVIOUS_POLL_S; nodes answer in kind.
PREVIOUS_TRANSPORT_ENV = "FLEXLORA_BENCH_PREVIOUS_TRANSPORT"
PREVIOUS_POLL_S = 1.0


def previous_transport() -> bool:
    return os.environ.get(PREVIOUS_TRANSPORT_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Sent:
    """What is kept of a task once its Message is pushed: who it is for, what it moved down
    (Flower objects and bytes, see codec.message_objects) and when it was pushed (the task and
    the Message themselves are dropped)."""

    client_id: str
    node_id: int  # the Flower node the Message went to
    bytes_down: int
    payload_bytes_down: int
    objects_down: int = 0
    pushed_at: float = 0.0  # time.time() just before the push

    @classmethod
    def of(cls, client_id: str, message: Message) -> Sent:
        objects, size = message_objects(message)
        return cls(client_id, message.metadata.dst_node_id, size, payload_bytes(message.content), objects, time.time())


def reply_result(sent: Sent, reply: Message | None, timeout_s: float) -> ClientUpdate | ClientFailure:
    """One task's outcome from its reply (None: no reply came within `timeout_s`): the decoded
    ClientUpdate, its metrics with the bytes moved both ways, or a ClientFailure with the reason.
    The one per-reply step of both FederatedStrategy.collect and FlowerRuntime.train."""
    from flexlora.protocol import ClientFailure

    if reply is None:
        return ClientFailure(sent.client_id, f"no reply within {timeout_s:g} s")
    if reply.has_error():  # the node's (or Flower's, e.g. an expired message) error reply
        return ClientFailure(sent.client_id, reply.error.reason)
    if reply.metadata.src_node_id != sent.node_id:
        return ClientFailure(
            sent.client_id, f"bad reply: from node {reply.metadata.src_node_id}, the task went to node {sent.node_id}"
        )
    try:
        update = decode_update(reply.content)
        if update.client_id != sent.client_id:
            raise ValueError(f"reply from client {update.client_id} to a task for {sent.client_id}")
    except (KeyError, ValueError, TypeError) as e:
        return ClientFailure(sent.client_id, f"bad reply: {type(e).__name__}: {e}")
    # Counted from the reply's structure: Flower already hashed every object it pulled, and
    # hashing them again here (to count bytes) cost about 0.3 s per 158 MB reply.
    objects_up, bytes_up = message_objects(reply)
    update.metrics.update(
        bytes_down=sent.bytes_down,
        bytes_up=bytes_up,
        payload_bytes_down=sent.payload_bytes_down,
        payload_bytes_up=payload_bytes(reply.content),
        objects_down=sent.objects_down,
        objects_up=objects_up,
    )
    if sent.pushed_at and "received_at" in update.metrics:  # the node's clock: exact on one machine
        update.metrics["transport_down_s"] = update.metrics["received_at"] - sent.pushed_at
    if "replied_at" in update.metrics:
        update.metrics["transport_up_s"] = time.time() - update.metrics["replied_at"]
    return update


class FederatedStrategy(Strategy):
    """A Flower Strategy that sends every sampled client its own task (factors at its own ranks)
    and hands the replies to the project's FederatedServer, whatever its aggregation method."""

    def __init__(self, server: FederatedServer, nodes: dict[str, int], timeout_s: float = 3600.0, packed: bool = True):
        self.server = server
        self.nodes = dict(nodes)  # client id -> Flower node id
        self.timeout_s = timeout_s
        self.packed = packed  # False: the previous per-array layout (the deployment bench's baseline)
        self._pending: dict[int, tuple[list[ClientTask], list[Sent]]] = {}
        self.last_results: list[ClientUpdate | ClientFailure] = []

    # The two halves shared with FlowerRuntime.
    def task_message(self, task: ClientTask) -> Message:
        """The task encoded as a Message to the node that holds its client."""
        if task.client_id not in self.nodes:
            raise ValueError(f"no Flower node holds client {task.client_id}")
        content = encode_task(task, self.server.cfg, packed=self.packed)
        return Message(content, dst_node_id=self.nodes[task.client_id], message_type=MessageType.TRAIN, group_id=str(task.round))

    def task_messages(self, tasks: list[ClientTask]) -> list[Message]:
        unknown = [t.client_id for t in tasks if t.client_id not in self.nodes]
        if unknown:
            raise ValueError(f"no Flower node holds client {unknown[0]}")
        return [self.task_message(t) for t in tasks]

    def collect(self, sent: list[Sent], replies) -> list[ClientUpdate | ClientFailure]:
        """Replies (all of a round's, matched by node) -> one ClientUpdate or ClientFailure per
        task sent, in task order, each update's metrics with the bytes moved (see reply_result)."""
        by_node = {r.metadata.src_node_id: r for r in replies}
        return [reply_result(s, by_node.get(s.node_id), self.timeout_s) for s in sent]

    # Flower's Strategy interface.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # The global state lives in the FederatedServer; `arrays` (Flower's shared model) is unused.
        tasks = self.server.configure(server_round, self.server.sample(server_round))
        messages = self.task_messages(tasks)
        # Measured now: once returned, the Messages are Flower's (see FlowerRuntime.push).
        self._pending[server_round] = (tasks, [Sent.of(t.client_id, m) for t, m in zip(tasks, messages)])
        return messages

    def aggregate_train(self, server_round: int, replies):
        tasks, sent = self._pending.pop(server_round)
        self.last_results = self.collect(sent, list(replies))
        # The server validates each update against its task, leaves rejected ones out and
        # aggregates (or keeps the previous state), exactly as for the in-process runtime.
        outcome = self.server.complete_round(server_round, tasks, self.last_results)
        if outcome.kept_previous_state:
            return None, None
        state = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in (self.server.state or {}).items()})
        losses = [m["train_loss_last"] for m in outcome.metrics.values() if "train_loss_last" in m]
        metrics = MetricRecord({"clients": outcome.valid_updates, "train_loss_last": float(np.mean(losses)) if losses else 0.0})
        return state, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return []  # evaluation is centralised: the ServerApp scores the global adapter on held-out clients

    def aggregate_evaluate(self, server_round: int, replies):
        return None

    def summary(self) -> None:
        log.info("FederatedStrategy: method %s, %d nodes", self.server.cfg.method, len(self.nodes))


class FlowerRuntime:
    """A `server.Runtime` over a Flower Grid that streams the round: at most `max_in_flight`
    tasks are pushed and unanswered at a time, a task is taken from the server's lazy iterator
    (and so built) and encoded only when a slot is free, and each reply is decoded and yielded
    as soon as it is pulled. Kept per task in flight: its Message id and a `Sent` (client id,
    node, what it moved down); the task and its Message are dropped once pushed.

    Every task that has a free slot goes in one `push_messages` call: a round that fits in
    `max_in_flight` is one call (Flower then registers every Message before it uploads their
    objects, so every node starts pulling at once, and objects the Messages share are stored
    and uploaded once); the slots freed by the replies of one pull are refilled in one call too.

    `flower.round_timeout_s` is measured per round, from the first task taken: a task still
    unanswered then is a ClientFailure ("no reply within N s"), and so is every task the round
    had no time left to send. Replies are yielded in the order they arrive, not in task order."""

    def __init__(self, strategy: FederatedStrategy, grid: Grid, max_in_flight: int | None = None, poll_s: float | None = None):
        self.strategy = strategy
        self.grid = grid
        self.max_in_flight = max_in_flight or strategy.server.cfg.flower.max_in_flight
        # The in-memory grid's own pull_interval (0.1 s); the deployment's grid has none: POLL_S.
        default = POLL_S if strategy.packed else PREVIOUS_POLL_S
        self.poll_s = poll_s if poll_s is not None else float(getattr(grid, "pull_interval", default))
        self.push_calls = 0  # push_messages calls so far (tests and the bench read it)

    def push(self, tasks: list[ClientTask]) -> list[tuple[str | None, Sent]]:
        """Encode the tasks and push them (one push_messages call, or one per task for the
        previous transport): per task, its Message id (None if Flower did not take it) and what
        is kept of it."""
        messages = [self.strategy.task_message(task) for task in tasks]
        # Measured before the push: once pushed a Message is Flower's (the simulation engine
        # pickles it for a Ray actor while this thread goes on; anything added to it then races).
        sent = [Sent.of(task.client_id, message) for task, message in zip(tasks, messages)]
        batches = [messages] if self.strategy.packed else [[m] for m in messages]
        del messages
        ids: list = []
        for batch in batches:
            self.push_calls += 1
            got = list(self.grid.push_messages(batch))
            ids += got + [None] * (len(batch) - len(got))
        return [(str(mid) if mid else None, s) for mid, s in zip(ids, sent)]

    def train(self, tasks: Iterable[ClientTask]) -> Iterator[ClientUpdate | ClientFailure]:
        from flexlora.protocol import ClientFailure

        timeout_s = self.strategy.timeout_s
        tasks = iter(tasks)
        deadline = time.monotonic() + timeout_s
        in_flight: dict[str, Sent] = {}  # Message id -> what is kept of its task
        exhausted = False

        def fill() -> list[ClientFailure]:
            """Take tasks until max_in_flight would be in flight (or none is left, or time is
            up) and push them together; again for the slots of any task Flower refused."""
            nonlocal exhausted
            refused = []
            while True:
                batch = []
                while not exhausted and len(in_flight) + len(batch) < self.max_in_flight and time.monotonic() < deadline:
                    task = next(tasks, None)
                    if task is None:
                        exhausted = True
                        break
                    batch.append(task)
                if not batch:
                    return refused
                pushed = self.push(batch)
                del batch  # their factors and Messages are not needed past the push
                for message_id, sent in pushed:
                    if message_id is None:
                        refused.append(
                            ClientFailure(sent.client_id, "Flower did not take the task (push_messages returned no message id)")
                        )
                    else:
                        in_flight[message_id] = sent

        yield from fill()
        while in_flight:
            matched = []
            for reply in self.grid.pull_messages(list(in_flight)):
                sent = in_flight.pop(reply.metadata.reply_to_message_id, None)
                if sent is None:
                    log.warning(
                        "ignored a Flower reply to unknown message %r (from node %s)",
                        reply.metadata.reply_to_message_id,
                        reply.metadata.src_node_id,
                    )
                    continue
                matched.append((sent, reply))
            got = bool(matched)
            refused = fill() if got else []  # the freed slots' next tasks train while these are folded
            while matched:
                sent, reply = matched.pop(0)
                result = reply_result(sent, reply, timeout_s)
                del reply
                yield result
                del result
            yield from refused
            if not in_flight:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not got:
                time.sleep(min(self.poll_s, remaining))
        for sent in in_flight.values():
            yield reply_result(sent, None, timeout_s)
        in_flight.clear()
        if not exhausted:
            for task in tasks:  # the round's time was up before these could be sent
                cid = task.client_id
                del task
                yield ClientFailure(cid, f"no reply within {timeout_s:g} s (not sent: the round's flower.round_timeout_s was up)")


def wait_for_nodes(grid: Grid, count: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of {count} Flower nodes connected within {wait_s:.0f} s (flower.min_nodes, flower.node_wait_s)"
            )
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
        echo(
            f"flexlora: warning: {len(silent)} node(s) did not answer within {cfg.flower.round_timeout_s:.0f} s and are left out: {silent}"
        )
    if not found:
        raise RuntimeError("no Flower node answered with a usable client")
    return found


def serve(exp, grid: Grid, min_nodes: int | None = None) -> Path:
    """The ServerApp's work: discover the nodes' clients, build the server, run every round
    through Flower, write the run folder (the same files as the in-process runtime)."""
    from flexlora.config import ConfigError
    from flexlora.resources import declared_rank_type, paper_rank_types

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
    nodes = {cid: found[cid]["node_id"] for cid in client_ids}
    if cfg.flower.secure_aggregation:  # Flower's SecAgg+: the server receives only the clients' weighted mean
        from flexlora.engines.flower.secagg import SecureFlowerRuntime

        exp.run(SecureFlowerRuntime(server, nodes, grid, cfg.flower.round_timeout_s))
    else:
        strategy = FederatedStrategy(server, nodes, cfg.flower.round_timeout_s, packed=not previous_transport())
        exp.run(FlowerRuntime(strategy, grid))
    return exp.finish()


def config_from_run_config(run_config) -> tuple[ExperimentConfig, Path | None]:
    """(experiment config, run folder to resume or None) of a deployment run, from its run
    config: `config-file` (a YAML path on the SuperLink's machine, may be empty), `overrides`
    (key=value words, shell-quoted where needed) and `resume` (a run folder to continue from
    its last checkpoint; its config.yaml is then the config file)."""
    from flexlora.config import ConfigError, load_config  # the schema: only where a config is read

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
