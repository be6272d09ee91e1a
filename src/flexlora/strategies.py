"""Flower strategies on the Message API for any ServerApp whose ClientApps train LoRA with PEFT.

``HeteroRankStrategy(method, lora_alpha=...)`` is a Flower ``Strategy`` (a ``FedAvg`` whose
arrays are per node) driven by ``flexlora.Aggregator``, the same engine as ``flexlora run``.
``FlexLoRA``, ``HetLoRA``, ``FedIT``, ``FedExLoRA`` and ``FLoRIST`` fix the method; any other
registered method that a PEFT adapter can carry goes through ``HeteroRankStrategy`` by name.

    strategy = FlexLoRA(lora_alpha=16, fraction_evaluate=0.0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(get_peft_model_state_dict(model)),
                            num_rounds=3)
    strategy.aggregator.global_adapter()   # (state dict, {module: rank}); also result.arrays
    strategy.aggregator.base_offset()      # FedEx-LoRA, FLoRIST: {module: (out, in) tensor}

What a ClientApp exchanges (docs/flower.md, "Use a flexlora strategy in your own ServerApp"):
- it receives, per node, ``content["arrays"]``: an adapter state dict at that node's rank, keyed
  as ``get_peft_model_state_dict`` writes them (load it with ``set_peft_model_state_dict``);
  ``content["config"]``: ``server-round``, ``lora-rank`` (the rank sent), ``lora-alpha``,
  ``method-options`` (JSON, when the method asks something of the client, e.g. HetLoRA's rank
  regularizer) and the ServerApp's train config; and, for methods that change the base weights
  (FedEx-LoRA, FLoRIST), ``content["base-offset"]``: ``{module: tensor}`` to add to each LoRA
  module's base weight (``model.get_submodule(module).get_base_layer().weight``), the sum of
  every round so far, so it goes onto the original base weights.
- it replies with one ArrayRecord (its trained adapter, as PEFT writes it) and a MetricRecord
  with ``num-examples``; optionally ``lora-rank`` (the rank it wants next; else the rank of
  what it sent) and ``lora-alpha`` (else the strategy's).

A node's rank before its first reply: ``ranks`` (a mapping or callable node id -> rank), else
the node is asked with a ``query.lora_rank`` Message (a ClientApp answers it with
``@app.query("lora_rank")``, replying ``lora-rank`` in a MetricRecord or ConfigRecord), else
it gets the ranks of ``initial_arrays``. ``initial_arrays`` declares the modules and their
shapes; its values are not sent: every round-1 node starts from the method's shared initial
adapter at its own rank (seeded A rows, nested across ranks; B = 0), as in ``flexlora run``.

A reply that the Aggregator refuses (a missing key, a tensor that is not a LoRA factor, a rank
the method cannot take, a NaN, a bad ``num-examples``) is logged in one line and dropped; the
round goes on with the others.

This module imports Flower; ``import flexlora`` does not import it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import torch

try:  # an extra (flexlora[flower]), not a core dependency: say which one when it is missing
    import flwr  # noqa: F401
except ModuleNotFoundError:
    from flexlora.extras import missing

    raise missing("flwr", "flexlora.strategies") from None

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flexlora.api import Aggregator, ranks_of

RANK_QUERY = f"{MessageType.QUERY}.lora_rank"  # answered by a ClientApp's @app.query("lora_rank")
Rank = int | dict[str, int]  # one rank for every module, or {module: rank}


class HeteroRankStrategy(FedAvg):
    """A registered flexlora method as a Flower strategy: every node gets its own Message with
    the adapter at its own rank (``Aggregator.client_adapter``), replies are folded into the
    Aggregator one at a time, and the round's global adapter is what ``aggregate_train``
    returns (``Result.arrays`` after ``start``).

    - ``method``, ``method_args``: a registered method's name and its arguments (as in a run
      config's ``method_args``). ``lora_alpha``: the federation's LoRA alpha. ``max_rank``:
      the largest rank a node will ask for (FlexLoRA then keeps only that much of ΔW).
    - ``ranks``: nodes' ranks before their first reply (mapping or callable node id -> int or
      {module: rank}; None where unknown). ``query_ranks``: ask the others with ``query.lora_rank``
      (``rank_query_timeout`` seconds). ``rank_key``: the metric/config key of a rank, both ways.
    - ``offset_key``: the record key of the base offset in a Message. ``dtype``: of the arrays sent.
    - Every other keyword is ``FedAvg``'s (fraction_train, fraction_evaluate, min_train_nodes, ...,
      weighted_by_key="num-examples", arrayrecord_key="arrays", configrecord_key="config").
    """

    def __init__(
        self,
        method: str,
        *,
        lora_alpha: float,
        method_args: Mapping | None = None,
        max_rank: int | None = None,
        ranks: Mapping[int, Rank] | Callable[[int], Rank | None] | int | None = None,
        query_ranks: bool = True,
        rank_query_timeout: float = 300.0,
        rank_key: str = "lora-rank",
        offset_key: str = "base-offset",
        dtype: torch.dtype = torch.float32,
        **fedavg_args,
    ) -> None:
        if lora_alpha is None:
            raise ValueError("lora_alpha is required: the LoRA alpha every node trains with (PEFT's LoraConfig.lora_alpha)")
        super().__init__(**fedavg_args)
        self.method_name, self.method_args = method, dict(method_args or {})
        self.lora_alpha, self.max_rank = lora_alpha, max_rank
        # Made now so that a bad method, argument or alpha fails here; made again with the
        # modules of initial_arrays when round 1 is configured.
        self.aggregator = self._new_aggregator(None)
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = lambda _node, rank=ranks: rank  # noqa: E731 (one rank for every node)
        self._ranks_given = ranks.get if isinstance(ranks, Mapping) else ranks
        self.query_ranks, self.rank_query_timeout = query_ranks, rank_query_timeout
        self.rank_key, self.offset_key, self.dtype = rank_key, offset_key, dtype
        self.node_ranks: dict[int, Rank] = {}  # the rank each node gets next
        self.initial_ranks: Rank | None = None  # of initial_arrays: for nodes that declare none

    def _new_aggregator(self, template: Mapping[str, torch.Tensor] | None) -> Aggregator:
        return Aggregator(
            self.method_name, lora_alpha=self.lora_alpha, max_rank=self.max_rank, template=template, **self.method_args
        )

    def summary(self) -> None:
        log(INFO, "\t├──> flexlora method: %s %s (lora_alpha %g)", self.method_name, self.method_args or "", self.lora_alpha)
        super().summary()

    # -- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One Message per sampled node: its adapter at its rank, the config, the base offset."""
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        return self._messages(server_round, nodes, arrays, config, grid, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each reply into the Aggregator (a refused one is logged and dropped); the new global
        adapter as an ArrayRecord, and FedAvg's weighted average of the replies' metrics."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        taken = []
        for reply in valid:
            node = reply.metadata.src_node_id
            try:
                state_dict, metrics = self._read_reply(reply)
                alpha = metrics.get("lora-alpha")
                self.aggregator.add(
                    state_dict,
                    num_examples=_count(metrics.get(self.weighted_by_key), self.weighted_by_key),
                    lora_alpha=float(alpha) if alpha is not None else None,
                    client_id=f"node {node}",
                )
                declared = _rank(metrics.get(self.rank_key), self.rank_key)
            except ValueError as e:
                log(WARNING, "aggregate_train: reply from node %d dropped: %s", node, e)
                continue
            self.node_ranks[node] = declared if declared is not None else _compact(ranks_of(state_dict))
            taken.append(reply.content)
        if not taken:
            log(WARNING, "aggregate_train: no usable reply in round %d; the global adapter is unchanged", server_round)
            return None, None
        self.aggregator.aggregate()
        adapter, ranks = self.aggregator.global_adapter()
        log(
            INFO,
            "aggregate_train: %s over %d node(s); global ranks %s",
            self.method_name,
            len(taken),
            sorted(set(ranks.values())),
        )
        metrics = self.train_metrics_aggr_fn(taken, self.weighted_by_key)
        for declaration in (self.rank_key, "lora-alpha"):  # not metrics: their average means nothing
            if declaration in metrics:
                del metrics[declaration]
        return ArrayRecord(self._wire(adapter)), metrics

    # -- evaluation: each node evaluates the global model at its own rank -------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        return self._messages(server_round, nodes, arrays, config, grid, MessageType.EVALUATE)

    # -- internals ------------------------------------------------------------------------------

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        nodes, everyone = sample_nodes(grid, self.min_available_nodes, size)
        log(INFO, "configure: sampled %d nodes (out of %d)", len(nodes), len(everyone))
        return nodes

    def _messages(self, server_round, nodes, arrays, config, grid, message_type) -> list[Message]:
        if not self.aggregator.shapes:
            template = arrays.to_torch_state_dict()
            if not template:
                raise ValueError(
                    "initial_arrays must hold the clients' LoRA factors: ArrayRecord(get_peft_model_state_dict(model))"
                )
            self.aggregator = self._new_aggregator(template)
            self.initial_ranks = _compact(ranks_of(template))
        ranks = self._ranks_for(nodes, grid)
        offset = self.aggregator.base_offset()
        offset_record = ArrayRecord(self._wire(offset)) if offset else None
        options = self.aggregator.client_options(server_round)
        messages = []
        for node in nodes:
            rank = ranks.get(node)
            if rank is None:
                continue
            try:
                adapter = self.aggregator.client_adapter(rank)
            except ValueError as e:
                log(WARNING, "configure: node %d not sent: %s", node, e)
                continue
            node_config = ConfigRecord(dict(config))
            node_config["server-round"] = server_round
            node_config["lora-alpha"] = float(self.lora_alpha)
            if isinstance(rank, int):
                node_config[self.rank_key] = rank
            if options:
                node_config["method-options"] = json.dumps(options)
            content = RecordDict({self.arrayrecord_key: ArrayRecord(self._wire(adapter)), self.configrecord_key: node_config})
            if offset_record is not None:
                content[self.offset_key] = offset_record  # one record, shared by every node's Message
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def _ranks_for(self, nodes: list[int], grid: Grid) -> dict[int, Rank]:
        """The rank each node gets: known from its last reply, given by ``ranks``, answered to the
        rank query, else the ranks of initial_arrays. For a homogeneous method (FedIT), every
        node gets the federation's rank: the global adapter's, or the round's smallest."""
        for node in nodes:
            if node not in self.node_ranks and self._ranks_given is not None:
                given = self._ranks_given(node)
                if given is not None:
                    self.node_ranks[node] = given
        unknown = [node for node in nodes if node not in self.node_ranks]
        if unknown and self.query_ranks:
            self.node_ranks.update(self._query(unknown, grid))
        ranks = {node: self.node_ranks.get(node, self.initial_ranks) for node in nodes}
        for node, rank in ranks.items():
            if rank is None:
                log(WARNING, "configure: node %d has no known rank (no reply yet, no answer to %s): not sent", node, RANK_QUERY)
        if not self.aggregator.method.homogeneous:
            return ranks
        _, held = self.aggregator.global_adapter()
        wanted = {node: _per_module(rank, self.aggregator.shapes) for node, rank in ranks.items() if rank is not None}
        if held:  # after round 1: the global adapter's rank
            fixed = held
        elif wanted:  # round 1: the smallest rank of the round's nodes
            fixed = {m: min(r[m] for r in wanted.values()) for m in self.aggregator.shapes}
        else:
            return {}
        out = {}
        for node, rank in wanted.items():
            if any(rank[m] < fixed[m] for m in fixed):
                log(
                    WARNING,
                    "configure: node %d declares ranks below %s's federation rank %s: not sent",
                    node,
                    self.method_name,
                    fixed,
                )
                continue
            out[node] = _compact(fixed)
        return out

    def _query(self, nodes: list[int], grid: Grid) -> dict[int, Rank]:
        """Ask these nodes their rank (one ``query.lora_rank`` Message each)."""
        asked = [
            Message(
                RecordDict({self.configrecord_key: ConfigRecord({"key": self.rank_key})}), message_type=RANK_QUERY, dst_node_id=n
            )
            for n in nodes
        ]
        found = {}
        for reply in grid.send_and_receive(asked, timeout=self.rank_query_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(INFO, "configure: node %d did not answer %s (%s)", node, RANK_QUERY, reply.error.reason)
                continue
            records = [*reply.content.metric_records.values(), *reply.content.config_records.values()]
            try:
                rank = next((_rank(r[self.rank_key], self.rank_key) for r in records if self.rank_key in r), None)
            except ValueError as e:
                log(WARNING, "configure: node %d answered %s with a bad rank: %s", node, RANK_QUERY, e)
                continue
            if rank is not None:
                found[node] = rank
        return found

    def _read_reply(self, reply: Message) -> tuple[dict[str, torch.Tensor], Mapping]:
        content = reply.content
        arrays = content.array_records.get(self.arrayrecord_key)
        if arrays is None and len(content.array_records) == 1:
            arrays = next(iter(content.array_records.values()))
        if arrays is None:
            raise ValueError(f"the reply holds no ArrayRecord {self.arrayrecord_key!r} (found {sorted(content.array_records)})")
        metrics = next(iter(content.metric_records.values()), None)
        if metrics is None:
            raise ValueError(f"the reply holds no MetricRecord (with {self.weighted_by_key!r})")
        return arrays.to_torch_state_dict(), metrics

    def _wire(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: t.detach().to(device="cpu", dtype=self.dtype).contiguous() for key, t in tensors.items()}


def _count(value, key: str) -> int:
    """A reply's number of examples: a positive whole number (Flower's metrics may carry floats)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"metric {key!r} must be a positive whole number, got {value!r}")
    return value


def _rank(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key!r} must be a positive integer, got {value!r}")
    return value


def _compact(ranks: dict[str, int]) -> Rank:
    """One int when every module has the same rank (then sent as ``lora-rank``), else the dict."""
    return next(iter(ranks.values())) if len(set(ranks.values())) == 1 else ranks


def _per_module(rank: Rank, shapes: Mapping) -> dict[str, int]:
    return dict(rank) if isinstance(rank, Mapping) else dict.fromkeys(shapes, rank)


class _Named(HeteroRankStrategy):
    method: str

    def __init__(self, *, lora_alpha: float, method_args: Mapping | None = None, **kwargs) -> None:
        super().__init__(self.method, lora_alpha=lora_alpha, method_args=method_args, **kwargs)


class FlexLoRA(_Named):
    """FlexLoRA (Bai et al., NeurIPS 2024): ΔW = Σ p_k (α/r_k) B_k A_k; each node gets the best
    rank-r_k approximation of ΔW (one truncated SVD per module)."""

    method = "flexlora"


class HetLoRA(_Named):
    """HetLoRA (Cho et al.): zero-padded weighted averages; a node takes the first r_k rows/columns.
    ``method_args={"padding": "replication"}``: replication padding (Byun & Lee, NAACL 2025)."""

    method = "hetlora"


class FedIT(_Named):
    """FedIT: FedAvg of A and of B at one rank, the federation's smallest declared rank (sent
    to every node as ``lora-rank``)."""

    method = "fedit"


class FedExLoRA(_Named):
    """FedEx-LoRA (ACL 2025): FedIT's (padded) averages for the nodes, the exact residual of
    Σ p_k (α/r_k) B_k A_k sent as the base offset."""

    method = "fedex"


class FLoRIST(_Named):
    """FLoRIST (MLSys 2026): an SVD of the stacked factors cut at an energy threshold, merged
    into the base offset; every node restarts from the shared fresh adapter each round."""

    method = "florist"


STRATEGIES: dict[str, type[_Named]] = {cls.method: cls for cls in (FlexLoRA, HetLoRA, FedIT, FedExLoRA, FLoRIST)}
