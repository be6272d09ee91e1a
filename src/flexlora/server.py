"""A federated round, independent of transport: sample, configure, aggregate, evaluate, log.

An engine (in-process, Flower) only moves ClientTasks out and ClientUpdates back; it never
knows which method runs. The server calls the method's hooks (flexlora.methods.base.Method),
every one of them, and knows no method by name.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch

from flexlora.config import ExperimentConfig
from flexlora.errors import ConfigError
from flexlora.faults import fault_point
from flexlora.methods import METHODS, FedProx, compose_method
from flexlora.methods.base import GlobalState, capped_weights, clear_fresh_rows
from flexlora.protocol import ClientFailure, ClientTask, ClientUpdate, ServerSnapshot, flatten, unflatten
from flexlora.spectrum import rank_edges, spectrum_record
from flexlora.resources import RankType, client_rank_types, module_ranks, paper_rank_types
from flexlora.methods.server_opt import starting_point
from flexlora.methods.svd import one_cpu_thread
from flexlora.validation import NormScreen, check_result, update_norm, validate_round

logger = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What a round's results did to the server (see FederatedServer.run_round)."""

    metrics: dict[str, dict]  # client id -> metrics of each valid update, aggregated unless kept_previous_state
    failures: dict[str, str]  # client id -> why it sent nothing (exception, timeout, dropout)
    rejected: dict[str, str]  # client id -> why its update was left out
    kept_previous_state: bool  # fewer valid updates than federation.min_updates
    aggregation_s: float = 0.0
    validation_s: float = 0.0
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # client id -> p_k used
    # The valid updates themselves, only where the caller held them anyway (complete_round);
    # a streamed round (run_round) drops each update once it is folded.
    updates: list[ClientUpdate] = dataclasses.field(default_factory=list)
    configure_s: float = 0.0  # building the round's tasks

    @property
    def valid_updates(self) -> int:
        return len(self.metrics)


class Runtime(Protocol):
    """Moves tasks to clients and their results back. `tasks` is lazy: a task is built when the
    runtime takes it, so a runtime that takes the next task only when it can run it, and yields
    each result as it comes (a generator), keeps the server's memory independent of the round's
    size. A runtime that returns a list works too (every task is then built first)."""

    def train(self, tasks: Iterable[ClientTask]) -> Iterable[ClientUpdate | ClientFailure]: ...


Evaluator = Callable[[GlobalState | None, int], dict]  # (global state, round) -> metrics
Checkpointer = Callable[["FederatedServer", list[dict]], None]  # (server, history so far)


class RoundAggregation:
    """One round's results, taken one at a time: each is checked against its task, folded into
    the method's accumulator (Method.accumulator) and dropped.

    Held at any moment, besides the accumulator: the tasks handed out and not answered yet, the
    updates the norm rule's warm-up holds (validation.NORM_WARMUP) and, with
    federation.max_weight_share, the ⌈1/share⌉ largest updates by n_k. Those are the only
    clients whose weight can differ from λ·n_k with one λ for the whole round (at most ⌊1/share⌋
    clients sit at the cap), so every other update is folded at once with raw weight n_k, and
    the held ones at the end with p_j / λ: the accumulator's normalised weights are then exactly
    the capped p_k. With a server optimizer, the clients' starting factors are folded beside the
    updates (the step's x, see methods/server_opt.py)."""

    def __init__(self, server: FederatedServer, round_: int, keep_updates: bool = False):
        self.server, self.round = server, round_
        fed = server.cfg.federation
        self.tasks: dict[str, ClientTask] = {}  # issued and not answered yet
        self.seen: set[str] = set()
        self.screen = NormScreen(fed.max_norm_ratio)
        self.accumulator = server.method.accumulator(server.state)
        with_start = server.server_step is not None and server.state is not None
        self.start = server.method.accumulator(server.state) if with_start else None
        self.cap_slots = math.ceil(1 / fed.max_weight_share) if fed.max_weight_share is not None else 0
        self.cap_held: list[ClientUpdate] = []
        self.sizes: dict[str, int] = {}  # n_k of every valid update, in arrival order
        self.first_released: str | None = None  # the first update folded with raw weight n_k under a cap (gives λ)
        self.metrics: dict[str, dict] = {}
        self.module_ranks: dict[str, dict[str, int]] = {}
        self.failures: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        self.kept: list[ClientUpdate] | None = [] if keep_updates else None
        self.configure_s = self.validation_s = self.aggregation_s = 0.0

    def issue(self, tasks: Iterator[ClientTask]) -> Iterator[ClientTask]:
        """The tasks, remembered until answered (and timed: building them is server work)."""
        while True:
            started = time.perf_counter()
            task = next(tasks, None)
            self.configure_s += time.perf_counter() - started
            if task is None:
                return
            self.tasks[task.client_id] = task
            yield task

    def receive(self, result: ClientUpdate | ClientFailure) -> None:
        if isinstance(result, ClientFailure):
            self.failures[result.client_id] = result.reason
            self.tasks.pop(result.client_id, None)  # it will not be answered: its factors can go
            return
        started = time.perf_counter()
        server, fed = self.server, self.server.cfg.federation
        with one_cpu_thread():  # many small checks and reductions: no thread barriers
            problem = check_result(result, self.tasks, self.seen, server.shapes, server.cfg.lora.alpha,
                                   exact_rank=server.method.homogeneous, declared_sizes=server.declared_sizes)
        if isinstance(result, ClientUpdate) and result.client_id in self.seen:
            self.tasks.pop(result.client_id, None)  # answered: its factors can go
        if problem is not None:
            self.reject(*problem)
            decided = []
        else:
            norm = update_norm(result) if fed.max_norm_ratio is not None else None
            decided = self.screen.offer(result.client_id, norm, result)
        self.validation_s += time.perf_counter() - started
        for update, reason in decided:
            self.decide(update, reason)

    def reject(self, key: str, reason: str) -> None:
        logger.warning("round %d: rejected the update of client %s: %s", self.round, key, reason)
        self.rejected[key] = reason

    def decide(self, update: ClientUpdate, reason: str | None) -> None:
        if reason is not None:
            self.reject(update.client_id, reason)
            return
        cid = update.client_id
        self.sizes[cid] = update.num_examples
        self.metrics[cid] = update.metrics
        self.module_ranks[cid] = {m: A.shape[0] for m, (A, _) in update.factors.items()}
        if self.kept is not None:
            self.kept.append(update)
        if not self.cap_slots:
            self.fold(update, update.num_examples)
            return
        self.cap_held.append(update)
        if len(self.cap_held) > self.cap_slots:  # the smallest of them can no longer reach the cap
            smallest = min(range(len(self.cap_held)), key=lambda i: self.cap_held[i].num_examples)
            released = self.cap_held.pop(smallest)
            self.first_released = self.first_released or released.client_id
            self.fold(released, released.num_examples)

    def fold(self, update: ClientUpdate, weight: float) -> None:
        started = time.perf_counter()
        self.accumulator.add(update, weight)
        if self.start is not None:
            self.start.add(starting_point(self.server.method, update, self.server.state), weight)
        self.aggregation_s += time.perf_counter() - started

    def finish(self) -> RoundOutcome:
        """Judge what the norm rule still holds, fold the held updates with their weights and
        make the new global state (or keep the previous one: fewer than federation.min_updates)."""
        server, fed = self.server, self.server.cfg.federation
        started = time.perf_counter()
        decided = self.screen.flush()
        self.validation_s += time.perf_counter() - started
        for update, reason in decided:
            self.decide(update, reason)
        server.round = self.round
        kept_previous = len(self.sizes) < fed.min_updates
        weights: dict[str, float] = {}
        if kept_previous:
            logger.warning(
                "round %d: %d valid update(s), fewer than federation.min_updates=%d; keeping the previous global state",
                self.round, len(self.sizes), fed.min_updates,
            )
            server.last_truncation = None
        else:
            weights = dict(zip(self.sizes, server.weights(list(self.sizes.values()), self.round)))
            first = self.first_released
            scale = weights[first] / self.sizes[first] if first is not None else 0.0  # λ
            for update in self.cap_held:
                p = weights[update.client_id]
                self.fold(update, p / scale if scale > 0 else p)
            self.cap_held = []
            started = time.perf_counter()
            state = self.accumulator.result()
            if server.server_step is not None:
                state = server.server_step(server.method, self.start.result() if self.start is not None else None, state)
            server.state = state
            self.aggregation_s += time.perf_counter() - started
            server.after_aggregation(self.module_ranks)
        return RoundOutcome(
            self.metrics, self.failures, self.rejected, kept_previous, self.aggregation_s, self.validation_s,
            weights, self.kept or [], configure_s=self.configure_s,
        )


class FederatedServer:
    """Holds the global state and decides, each round, who trains at which rank from what."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        client_ids: list[str],
        shapes: dict[str, tuple[int, int]],
        declared_types: dict[str, RankType] | None = None,
        declared_sizes: dict[str, int] | None = None,
    ):
        """`declared_types`: rank types that clients state themselves (a Flower node's config);
        every other client gets one drawn from the resource profile. `declared_sizes`: the most
        examples each client may claim in a reply (declared once, before round 1; a checkpoint
        keeps the sizes first declared); a reply claiming more is rejected."""
        self.cfg = cfg
        self.declared_sizes = dict(declared_sizes or {})
        self.client_ids = list(client_ids)
        self.shapes = shapes
        composition = compose_method(cfg.method, **method_arguments(cfg))
        self.method = composition.method
        self.server_step = composition.server_step  # a server optimizer after aggregation, or None
        self.fedprox_mu = composition.fedprox_mu  # FedProx's μ, asked of every client (0: off)
        r = cfg.resources
        try:  # a clients list or file that does not fit these clients (the config check cannot know them)
            self.client_types, self.rank_types = client_rank_types(
                self.client_ids, r.profile, cfg.seed, paper_rank_types(r.t1, r.t2, r.t3_attention, r.t3_mlp, r.t4)
            )
        except ValueError as e:
            raise ConfigError(f"resources.profile: {e}") from None
        for cid, rank_type in (declared_types or {}).items():
            self.rank_types.setdefault(rank_type.name, rank_type)
            self.client_types[cid] = rank_type.name
        self.client_ranks = {cid: module_ranks(self.rank_types[t], shapes) for cid, t in self.client_types.items()}
        if self.method.homogeneous:
            # Homogeneous baselines: every client is cut down to the federation's smallest
            # rank per module (the "bucket effect" FlexLoRA avoids).
            floor = {m: min(ranks[m] for ranks in self.client_ranks.values()) for m in shapes}
            self.client_ranks = {cid: dict(floor) for cid in self.client_ids}
        self.bound_ranks()
        self.state: GlobalState | None = self.method.init_state(shapes)
        self.round = 0
        self.last_truncation: dict | None = None  # see after_aggregation()
        # The rank bands of the spectrum record: the ranks as assigned (pruning does not move them).
        self.rank_edges = rank_edges(self.client_ranks)

    def max_rank(self) -> int:
        """The largest rank the global model is used at: eval.export_rank, or the largest rank
        of any client (what Experiment.export_rank evaluates and exports at)."""
        largest = max((max(r.values(), default=0) for r in self.client_ranks.values()), default=0)
        return self.cfg.eval.export_rank or largest

    def bound_ranks(self) -> None:
        """Tell the method the most it will be asked of each module: the larger of the largest
        client rank and eval.export_rank, at most min(m, n) (ranks only shrink later: pruning)."""
        if self.server_step is not None:
            return  # a server optimizer steps the method's whole (dense) parameters
        largest = max((max(r.values(), default=0) for r in self.client_ranks.values()), default=0)
        bound = max(self.cfg.eval.export_rank or 0, largest)
        self.method.bound_ranks({module: min(bound, m, n) for module, (m, n) in self.shapes.items()})

    def sample(self, round_: int) -> list[str]:
        fed = self.cfg.federation
        k = math.ceil(fed.fraction * len(self.client_ids)) if fed.fraction else fed.clients_per_round
        rng = random.Random(f"sample-{self.cfg.seed}-{round_}")
        return sorted(rng.sample(self.client_ids, min(k, len(self.client_ids))))

    def configure(self, round_: int, client_ids: list[str]) -> list[ClientTask]:
        """Every task of the round at once (see tasks() for the lazy form the rounds use)."""
        return list(self.tasks(round_, client_ids))

    def tasks(self, round_: int, client_ids: list[str]) -> Iterator[ClientTask]:
        """The round's tasks, each built (with its factors) only when it is taken."""
        fed = self.cfg.federation
        offset = self.base_offset()  # one object shared by the round's tasks
        for cid in client_ids:
            ranks = self.client_ranks[cid]
            rank_type = self.client_types[cid]
            # The method's client-side settings, then the composed and the reliability ones (all plain JSON).
            options = dict(self.method.client_options(self.state, round_, rank_type))
            if self.fedprox_mu > 0:
                options[FedProx.option] = self.fedprox_mu
            if fed.client_timeout_s is not None:
                options["timeout_s"] = fed.client_timeout_s
            # Fault injection, seeded per (run, round, client) so a resumed run drops the same clients.
            if fed.dropout_rate > 0 and random.Random(f"dropout-{self.cfg.seed}-{round_}-{cid}").random() < fed.dropout_rate:
                options["inject_failure"] = True
            yield ClientTask(
                client_id=cid,
                round=round_,
                rank_type=rank_type,
                module_ranks=ranks,
                factors=self.method.client_factors(self.state, ranks, self.cfg.lora.alpha),
                seed=hash_seed(self.cfg.seed, round_, cid),
                options=options,
                base_offset=offset,
            )
        clear_fresh_rows()  # the round's shared seeded rows are handed out

    def validate(self, results: list[ClientUpdate], tasks: list[ClientTask]) -> tuple[list[ClientUpdate], dict[str, str]]:
        """(valid updates, {client_id: reason}) — see flexlora.validation."""
        return validate_round(
            results,
            tasks,
            self.shapes,
            self.cfg.lora.alpha,
            max_norm_ratio=self.cfg.federation.max_norm_ratio,
            exact_rank=self.method.homogeneous,
            declared_sizes=self.declared_sizes,
        )

    def weights(self, sizes: list[int], round_: int) -> list[float]:
        """The aggregation weight p_k of each valid update: n_k / Σ n_j, no share above
        federation.max_weight_share. Every method aggregates with these."""
        cap = self.cfg.federation.max_weight_share
        weights, feasible = capped_weights(sizes, cap)
        if not feasible:
            logger.warning(
                "round %d: federation.max_weight_share=%g cannot hold with %d update(s) (it needs at least %d); "
                "every client gets the same weight 1/%d", round_, cap, len(sizes), math.ceil(1 / cap), len(sizes),
            )
        return weights

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        """Aggregate a list of valid updates as a round would (weights: ClientUpdate.weight if
        set, else n_k; no server step), with the same bookkeeping (after_aggregation)."""
        accumulator = self.method.accumulator(self.state)
        for u in updates:
            accumulator.add(u, u.weight if u.weight is not None else u.num_examples)
        self.state = accumulator.result()
        self.after_aggregation({u.client_id: {m: A.shape[0] for m, (A, _) in u.factors.items()} for u in updates})

    def after_aggregation(self, module_ranks: dict[str, dict[str, int]]) -> None:
        """Bookkeeping on a new global state, from the ranks each aggregated client sent:
        the truncation report, and pruned ranks kept from now on (methods that prune)."""
        ranks: dict[str, set[int]] = {}
        for sent in module_ranks.values():
            for module, r in sent.items():
                ranks.setdefault(module, set()).add(r)
        self.last_truncation = self.method.truncation(self.state, ranks)
        if self.method.prunes_ranks:
            for cid, sent in module_ranks.items():
                own = self.client_ranks[cid]
                for module, r in sent.items():
                    own[module] = min(own[module], r)

    def base_offset(self) -> dict | None:
        """The global model's change of the base weights (module -> (out, in)), if the method has one."""
        return self.method.base_offset(self.state) if self.state is not None else None

    def spectrum(self) -> dict | None:
        """The global ΔW's energy per rank band and effective rank per module kind (see
        flexlora.spectrum), with the seconds it took; None when eval.spectrum is off or the
        global model has no ΔW yet."""
        if not self.cfg.eval.spectrum or self.state is None:
            return None
        started = time.perf_counter()
        factors, ranks = self.method.global_factors(self.state, self.cfg.lora.alpha)
        record = spectrum_record(factors, ranks, self.base_offset(), self.cfg.lora.alpha, self.rank_edges)
        if record is not None:
            record["seconds"] = time.perf_counter() - started
        return record

    def run_round(self, round_: int, runtime: Runtime) -> RoundOutcome:
        """One round, streamed: sample, hand the runtime the lazy tasks, take each result as it
        comes (validated, folded into the aggregate, dropped), then finish the aggregate."""
        aggregation = RoundAggregation(self, round_)
        for result in runtime.train(aggregation.issue(self.tasks(round_, self.sample(round_)))):
            aggregation.receive(result)
        return aggregation.finish()

    def complete_round(self, round_: int, tasks: list[ClientTask], results: list) -> RoundOutcome:
        """run_round for results already in hand (e.g. a Flower Strategy's replies): the same
        checks and aggregate; the outcome also lists the valid updates."""
        aggregation = RoundAggregation(self, round_, keep_updates=True)
        for task in aggregation.issue(iter(tasks)):
            pass
        for result in results:
            aggregation.receive(result)
        return aggregation.finish()

    # Checkpointing: everything a resumed run needs that the config and seed cannot rebuild.
    # A method with state outside `self.state` returns it from `extra_state()` (see Method).

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(flat tensors, JSON-ready metadata) of the server: protocol.flatten of its snapshot."""
        return flatten(self.snapshot())

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.restore(unflatten(tensors, meta))

    def snapshot(self) -> ServerSnapshot:
        extra = self.method.extra_state()
        return ServerSnapshot(
            round=self.round,
            method=self.method.name,
            client_types=self.client_types,
            client_ranks=self.client_ranks,
            declared_sizes=self.declared_sizes,
            state=self.state,
            method_tensors=extra[0] if extra is not None else None,
            method_meta=extra[1] if extra is not None else None,
            server_opt=self.server_step.moments if self.server_step is not None else None,
        )

    def restore(self, snapshot: ServerSnapshot) -> None:
        if not isinstance(snapshot, ServerSnapshot):
            raise ValueError(f"a server checkpoint holds a ServerSnapshot, not a {type(snapshot).__name__}")
        if snapshot.method != self.method.name:
            raise ValueError(f"checkpoint is of method {snapshot.method!r}, this run uses {self.method.name!r}")
        if set(snapshot.client_types) != set(self.client_ids):
            raise ValueError("checkpoint was written for a different set of clients")
        self.round = snapshot.round
        self.state = snapshot.state
        self.client_types = dict(snapshot.client_types)
        self.client_ranks = {cid: dict(ranks) for cid, ranks in snapshot.client_ranks.items()}
        self.bound_ranks()
        # Sizes are declared once: a client re-declaring on resume cannot raise its bound.
        for cid, n in snapshot.declared_sizes.items():
            self.declared_sizes[cid] = min(n, self.declared_sizes.get(cid, n))
        if snapshot.method_tensors is not None or snapshot.method_meta is not None:
            self.method.load_extra_state(snapshot.method_tensors or {}, snapshot.method_meta)
        if self.server_step is not None:
            self.server_step.moments = dict(snapshot.server_opt or {})

    def global_adapter(self, rank: int | None = None):
        """(factors, ranks) of the global model, optionally truncated to `rank`; (None, None) when
        the global model has no adapter (everything is in the method's base offset)."""
        factors, ranks = self.method.global_factors(self.state, self.cfg.lora.alpha)
        if not factors:
            return None, None
        if rank is not None:
            capped = {m: min(rank, r) for m, r in ranks.items()}
            factors = self.method.client_factors(self.state, capped, self.cfg.lora.alpha)
            ranks = capped
        return factors, ranks


def method_arguments(cfg: ExperimentConfig) -> dict:
    """cfg.method_args, with the run's seed as the method's `seed` unless it is given there."""
    args = dict(cfg.method_args)
    if "seed" not in args and "seed" in inspect.signature(METHODS[cfg.method]).parameters:
        args["seed"] = cfg.seed
    return args


def hash_seed(*parts) -> int:
    """A stable 31-bit seed from parts (Python's hash() of str is salted per process)."""
    return random.Random("-".join(map(str, parts))).getrandbits(31)


def round_times(outcome: RoundOutcome, round_s: float, evaluation_s: float, total_s: float) -> dict:
    """A round's time breakdown. `round_s`: the streamed round (training, interleaved with the
    server's work on each task and result); server_s: the server's own work, building tasks +
    validation + aggregation + checkpoint (the checkpoint is added by add_checkpoint_time when
    it is written); server_share: server_s / total_s."""
    server_s = outcome.configure_s + outcome.validation_s + outcome.aggregation_s
    train_s = round_s - server_s
    return {
        "client_training_s": train_s,
        "configure_s": outcome.configure_s,
        "validation_s": outcome.validation_s,
        "aggregation_s": outcome.aggregation_s,
        "checkpoint_s": 0.0,
        "evaluation_s": evaluation_s,
        "other_s": total_s - round_s - evaluation_s,
        "server_s": server_s,
        "server_share": server_s / total_s if total_s > 0 else 0.0,
        "total_s": total_s,
    }


def add_checkpoint_time(record: dict, seconds: float) -> None:
    """Count a round's checkpoint write (before the record itself is written) in its time."""
    t = record.get("time")
    if not t or "server_s" not in t:  # round 0: no server step
        return
    t["checkpoint_s"] += seconds
    t["server_s"] += seconds
    t["total_s"] += seconds
    t["server_share"] = t["server_s"] / t["total_s"] if t["total_s"] > 0 else 0.0


def run_rounds(
    server: FederatedServer,
    runtime: Runtime,
    evaluate: Evaluator,
    log: Callable[[dict], None],
    checkpoint: Checkpointer | None = None,
    history: list[dict] | None = None,
) -> list[dict]:
    """The federated loop from `server.round + 1`; returns every round's record (round 0 =
    zero-shot). `history` holds the records of a resumed run. Each record is checkpointed
    (with the server state) before it is passed to `log`, so a crash never loses a logged round."""
    cfg = server.cfg
    history = [] if history is None else history

    def finish(record: dict) -> None:
        history.append(record)
        if checkpoint is not None:
            checkpoint(server, history)
            fault_point("checkpoint", record["round"])
        log(record)

    if server.round == 0 and not history:
        fault_point("evaluation", 0)
        finish({"round": 0, "eval": evaluate(None, 0), "time": {}})
    for round_ in range(server.round + 1, cfg.federation.rounds + 1):
        started = time.perf_counter()
        outcome = server.run_round(round_, runtime)
        round_s = time.perf_counter() - started
        spectrum = server.spectrum()  # its seconds are in the record, and in time.other_s
        t = time.perf_counter()
        is_eval_round = round_ % cfg.eval.every == 0 or round_ == cfg.federation.rounds
        if is_eval_round:
            fault_point("evaluation", round_)
        metrics = evaluate(server.state, round_) if is_eval_round else None
        eval_time = time.perf_counter() - t
        total = time.perf_counter() - started
        finish(
            {
                "round": round_,
                "clients": outcome.metrics,
                "failures": outcome.failures,
                "rejected": outcome.rejected,
                "valid_updates": outcome.valid_updates,
                "weights": outcome.weights,  # the p_k each aggregated update had
                "kept_previous_state": outcome.kept_previous_state,
                "eval": metrics,
                "truncation": None if outcome.kept_previous_state else server.last_truncation,
                "spectrum": spectrum,
                "time": round_times(outcome, round_s, eval_time, total),
            }
        )
    return history
