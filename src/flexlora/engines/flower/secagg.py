"""Secure aggregation on Flower (`flower.secure_aggregation=true`): Flower's own SecAgg+, its
SecAggPlusWorkflow on the server and its secaggplus_mod on the ClientApp, under our ServerApp.

SecAgg+ in Flower 1.41 is built on the legacy Fit path: the workflow asks a legacy Strategy
for (ClientProxy, FitIns) pairs, runs its four stages over the Grid (setup, share keys,
collect masked vectors, unmask; each one `grid.send_and_receive`) and hands the strategy's
`aggregate_fit` the unmasked weighted mean Σ w_k x_k / Σ w_k, x_k a client's FitRes parameters
and w_k its num_examples. So, with nothing of the protocol written here:

- server: `SecureFlowerRuntime.secure_mean` runs one SecAggPlusWorkflow a round on a
  LegacyContext whose strategy (`RoundStrategy`) hands out the round's FitIns and keeps what
  aggregate_fit receives. A FitIns carries the client's task as the codec encodes it (its arrays
  as Parameters, their names and the JSON records in the config), the client's weight and the
  round's SecureSpec (flexlora.privacy.secagg).
- client: `secure_aggregation_mod` hands SecAgg+ messages to Flower's secaggplus_mod (every other
  message passes untouched). In the collect stage the mod calls the ClientApp, which trains as
  always; `secure_reply` turns the update into a FitRes whose parameters are the spec's summands
  and whose num_examples is the weight the server assigned. The mod clips, quantises and masks
  them, uploads the masked integers and empties the FitRes arrays.

`Observed` passes every message through and counts, per node, what the ServerApp receives:
Flower's message bytes both ways, the arrays in replies (none: it never holds an update) and
how the masked vectors are spread (uniformly, as masks make them; an unmasked upload would lie
in the quantisation range 0..q).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from flexlora.engines.flower.codec import decode_update, encode_task, message_bytes
from flexlora.privacy.secagg import SecureResult, SecureSpec, summands, workflow_arguments

log = logging.getLogger(__name__)

# FitIns config keys of a secure task (beside SecAgg+'s own record).
SPEC, WEIGHT, RECORDS, ARRAYS = "flexlora.spec", "flexlora.weight", "flexlora.records", "flexlora.arrays"
CLIP_AT = "flexlora.clip_at"  # c · max w / w_k: where SecAgg+ clips this client's entries x_k
METRICS = "flexlora.metrics"  # FitRes metrics: the client's training metrics as JSON (never its update)


# ---------------------------------------------------------------- client side


class _Failed(Exception):
    """The ClientApp answered SecAgg+'s collect stage with an error reply."""

    def __init__(self, reply: Message):
        self.reply = reply


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """The ClientApp's train mod: SecAgg+'s messages go through Flower's secaggplus_mod, every
    other message (a run without secure aggregation) straight to the ClientApp. A client that
    fails to train answers with its error (secaggplus_mod would read the content of the error
    reply and fail without the reason): the server counts it a dropout, SecAgg+ unmasks without it."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train(message: Message, context: Context) -> Message:
        reply = call_next(message, context)
        if reply.has_error():
            raise _Failed(reply)
        return reply

    try:
        return secaggplus_mod(msg, ctxt, train)
    except _Failed as failed:
        return failed.reply


def is_secure(content: RecordDict) -> bool:
    """A train message of a secure round (a FitIns from SecureFlowerRuntime)."""
    return "fitins.config" in content.config_records and SPEC in content.config_records["fitins.config"]


def task_fitins(task, cfg, weight: float, spec: SecureSpec, clip_at: float) -> FitIns:
    """A client's task as the FitIns SecAgg+ sends in its collect stage: the codec's records,
    arrays as Parameters (.npy bytes, no pickle), the rest JSON in the config, with the
    client's weight, the round's spec and where SecAgg+ will clip its entries."""
    content = encode_task(task, cfg)
    names, arrays = [], []
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            names.append([record_name, key])
            arrays.append(array.numpy())
    records = {name: dict(record) for name, record in content.config_records.items()}
    config = {
        RECORDS: json.dumps(records),
        ARRAYS: json.dumps(names),
        SPEC: spec.to_json(),
        WEIGHT: float(weight),
        CLIP_AT: float(clip_at),
    }
    return FitIns(ndarrays_to_parameters(arrays), config)


def task_content(fitins: FitIns) -> RecordDict:
    """The inverse of task_fitins: the task's records as the codec wrote them."""
    content = RecordDict({name: ConfigRecord(values) for name, values in json.loads(fitins.config[RECORDS]).items()})
    grouped: dict[str, dict[str, Array]] = defaultdict(dict)
    arrays = parameters_to_ndarrays(fitins.parameters)
    names = json.loads(fitins.config[ARRAYS])
    if len(names) != len(arrays):
        raise ValueError(f"a secure task names {len(names)} arrays and carries {len(arrays)}")
    for (record_name, key), array in zip(names, arrays):
        grouped[record_name][key] = Array(array)
    for record_name, record in grouped.items():
        content[record_name] = ArrayRecord(record)
    return content


def secure_reply(content: RecordDict, train: Callable[[RecordDict], RecordDict]) -> RecordDict:
    """A secure round's train message -> the FitRes secaggplus_mod masks: `train` (the
    ClientApp's usual path, task records in, update records out) runs on the task, and the update
    becomes the spec's summands, weighted by SecAgg+ with the weight the server assigned."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    spec = SecureSpec.from_json(str(fitins.config[SPEC]))
    update = decode_update(train(task_content(fitins)))
    if update.deltas:
        raise ValueError("secure aggregation sums LoRA factors; this update carries sparse deltas")
    factors = {m: (A.double().numpy(), B.double().numpy()) for m, (A, B) in update.factors.items()}
    uploads = summands(factors, update.lora_alpha, spec)
    # Counted here, where the update is: SecAgg+ clips silently, the server cannot see it.
    clipped = sum(int((np.abs(u) > float(fitins.config[CLIP_AT])).sum()) for u in uploads)
    metrics = {METRICS: json.dumps({"client_id": update.client_id, **update.metrics, "secagg_clipped_entries": clipped})}
    fitres = FitRes(Status(Code.OK, "secure aggregation"), ndarrays_to_parameters(uploads), float(fitins.config[WEIGHT]), metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


# ---------------------------------------------------------------- server side


class RoundStrategy(LegacyStrategy):
    """The legacy Strategy SecAggPlusWorkflow drives for one round: it hands out the round's
    FitIns and keeps what aggregate_fit receives (every FitRes's parameters are then the mean)."""

    def __init__(self, fitins: list[tuple[GridClientProxy, FitIns]]):
        self.fitins = fitins
        self.results: list[tuple[GridClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.fitins

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class Observed:
    """The Grid as SecAggPlusWorkflow sees it: messages pass unchanged; counted per node are
    Flower's bytes both ways (message_bytes), the arrays in its replies, the masked vector's share
    of entries inside the unmasked range 0..q, and the stage it last failed or left unanswered."""

    def __init__(self, grid, quantization_range: int):
        self.grid, self.q = grid, quantization_range
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)
        self.arrays: dict[int, int] = defaultdict(int)
        self.masked: dict[int, dict] = {}
        self.problem: dict[int, str] = {}

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        waiting = {}
        for m in messages:  # measured before sending: from then on the Message is Flower's
            node = m.metadata.dst_node_id
            self.down[node] += message_bytes(m)
            waiting[node] = str(m.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            node = r.metadata.src_node_id
            stage = waiting.pop(node, "?")
            if r.has_error():
                self.problem[node] = f"secure aggregation, stage {stage}: {r.error.reason}"
                continue
            self.up[node] += message_bytes(r)
            self.arrays[node] += sum(len(record) for record in r.content.array_records.values())
            masked = r.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS)
            if masked:
                entries = [bytes_to_ndarray(b) for b in masked][1:]  # the first is the masked weight
                inside = sum(int((e <= self.q).sum()) for e in entries)
                total = sum(e.size for e in entries)
                self.masked[node] = {"masked_entries": total, "share_in_unmasked_range": inside / max(total, 1)}
        for node, stage in waiting.items():
            self.problem[node] = f"secure aggregation, stage {stage}: no reply within {timeout} s"
        return replies

    def received(self, node: int) -> dict:
        """What the ServerApp received from a node: bytes both ways, arrays, its masked vector."""
        return {
            "bytes_down": self.down[node],
            "bytes_up": self.up[node],
            "arrays_received": self.arrays[node],
            **self.masked.get(node, {}),
        }


class SecureFlowerRuntime:
    """A SecureRuntime (flexlora.privacy.secagg) on a Flower Grid: each round one run of Flower's
    SecAggPlusWorkflow; nodes maps client ids to Flower node ids. Each of its four stages waits at
    most `timeout_s` for replies; a node that fails or stays silent before its masked upload is a
    dropout (SecAgg+ removes its masks from the others' shares)."""

    def __init__(self, server, nodes: dict[str, int], grid, timeout_s: float):
        self.server, self.nodes, self.grid, self.timeout_s = server, dict(nodes), grid, timeout_s
        self.arguments = workflow_arguments(server.cfg)

    def secure_mean(self, tasks, weights: dict[str, float], spec: SecureSpec) -> SecureResult:
        cfg = self.server.cfg
        unknown = [t.client_id for t in tasks if t.client_id not in self.nodes]
        if unknown:
            raise ValueError(f"no Flower node holds client {unknown[0]}")
        client_of = {self.nodes[t.client_id]: t.client_id for t in tasks}
        top, c = max(weights.values()), self.arguments["clipping_range"]
        strategy = RoundStrategy(
            [
                (
                    GridClientProxy(self.nodes[t.client_id], self.grid, 0),
                    task_fitins(t, cfg, weights[t.client_id], spec, c * top / weights[t.client_id]),
                )
                for t in tasks
            ]
        )
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=strategy
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(tasks[0].round)})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # unused: each client has its own task
        observed = Observed(self.grid, self.arguments["quantization_range"])
        workflow = SecAggPlusWorkflow(**self.arguments, max_weight=top, timeout=self.timeout_s)
        workflow(observed, context)
        results = strategy.results
        if results is None:
            reason = (
                "secure aggregation halted: too few clients answered to remove the masks (flower.secagg_reconstruction_threshold)"
            )
            return SecureResult(None, failures={cid: observed.problem.get(node, reason) for node, cid in client_of.items()})
        mean = parameters_to_ndarrays(results[0][1].parameters)
        metrics = {}
        for proxy, fitres in results:
            cid = client_of[proxy.node_id]
            metrics[cid] = {**json.loads(str(fitres.metrics[METRICS])), **observed.received(proxy.node_id)}
            if metrics[cid].pop("client_id") != cid:
                log.warning("node %s answered for another client than %s", proxy.node_id, cid)
        failures = {
            cid: observed.problem.get(node, "secure aggregation: no masked upload")
            for node, cid in client_of.items()
            if cid not in metrics
        }
        return SecureResult(mean, metrics, failures)
