"""A federated round, independent of transport: sample, configure, aggregate, evaluate, log.

An engine (in-process, Flower) only moves ClientTasks out and ClientUpdates back; it never
knows which method runs. The server calls the method's hooks (flexlora.methods.base.Method),
every one of them, and knows no method by name. A round's results are checked and folded one
at a time by round_aggregation.RoundAggregation.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch

from flexlora.config import ExperimentConfig
from flexlora.errors import ConfigError
from flexlora.faults import fault_point
from flexlora.methods import METHODS, FedProx, compose_method
from flexlora.methods.base import GlobalState
from flexlora.methods.helpers import capped_weights, clear_fresh_rows
from flexlora.privacy.accountant import privacy_record
from flexlora.privacy.dp import ClientLevelDP
from flexlora.protocol import ClientFailure, ClientTask, ClientUpdate, ServerSnapshot, flatten, unflatten
from flexlora.resources import RankType, client_rank_types, module_ranks, paper_rank_types
from flexlora.round_aggregation import RoundAggregation, RoundOutcome
from flexlora.spectrum import rank_edges, spectrum_record
from flexlora.validation import validate_round

logger = logging.getLogger(__name__)


class Runtime(Protocol):
    """Moves tasks to clients and their results back. `tasks` is lazy: a task is built when the
    runtime takes it, so a runtime that takes the next task only when it can run it, and yields
    each result as it comes (a generator), keeps the server's memory independent of the round's
    size. A runtime that returns a list works too (every task is then built first)."""

    def train(self, tasks: Iterable[ClientTask]) -> Iterable[ClientUpdate | ClientFailure]: ...


Evaluator = Callable[[GlobalState | None, int], dict]  # (global state, round) -> metrics
Checkpointer = Callable[["FederatedServer", list[dict]], None]  # (server, history so far)


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
        self.privacy = ClientLevelDP.from_config(cfg)  # client-level DP (flexlora.privacy), or None
        if self.privacy is not None and self.method.privacy_space is None:
            raise ConfigError(
                f"privacy: method {self.method.name} cannot run under client-level DP: {self.method.privacy_refusal}"
            )
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

    def sample_size(self) -> int:
        """k, the clients sampled each round (at most every client)."""
        fed = self.cfg.federation
        k = math.ceil(fed.fraction * len(self.client_ids)) if fed.fraction else fed.clients_per_round
        return min(k, len(self.client_ids))

    def sample(self, round_: int) -> list[str]:
        """k clients, uniformly without replacement, independently each round (fixed-size, not
        Poisson: what the privacy accountant is told, flexlora.privacy.accountant)."""
        rng = random.Random(f"sample-{self.cfg.seed}-{round_}")
        return sorted(rng.sample(self.client_ids, self.sample_size()))

    def privacy_record(self, rounds: int, outcome: RoundOutcome | None = None) -> dict | None:
        """Client-level DP after `rounds` rounds: (ε, δ) and what they were computed from, and
        the round's update norms and clipped clients (`outcome`); None when privacy is off."""
        if self.privacy is None:
            return None
        record = privacy_record(self.privacy, len(self.client_ids), self.sample_size(), rounds, self.cfg.privacy.delta)
        return {**record, **(outcome.privacy or {})} if outcome is not None else record

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
            if self.privacy is not None:  # client-side clipping asks each client to clip (privacy.clipping)
                options.update(self.privacy.client_option(self.method.privacy_space))
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
                "every client gets the same weight 1/%d",
                round_,
                cap,
                len(sizes),
                math.ceil(1 / cap),
                len(sizes),
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
        offset = self.base_offset()
        known = self.method.global_singular_values(self.state) if offset is None else None
        if known is not None:  # the aggregation's own SVD: nothing to compute (issue 32)
            factors, ranks = {}, {}
        else:
            factors, ranks = self.method.global_factors(self.state, self.cfg.lora.alpha)
        record = spectrum_record(factors, ranks, offset, self.cfg.lora.alpha, self.rank_edges, known)
        if record is not None:
            record["seconds"] = time.perf_counter() - started
        return record

    def run_round(self, round_: int, runtime: Runtime) -> RoundOutcome:
        """One round, streamed: sample, hand the runtime the lazy tasks, take each result as it
        comes (validated, folded into the aggregate, dropped), then finish the aggregate. A
        runtime with `secure_mean` hands back only the clients' weighted mean (secure
        aggregation, flexlora.privacy.secagg)."""
        if hasattr(runtime, "secure_mean"):
            from flexlora.privacy.secagg import secure_round

            return secure_round(self, round_, runtime)
        aggregation = RoundAggregation(self, round_)
        for result in runtime.train(aggregation.issue(self.tasks(round_, self.sample(round_)))):
            aggregation.receive(result)
        return aggregation.finish()

    def complete_round(self, round_: int, tasks: list[ClientTask], results: list) -> RoundOutcome:
        """run_round for results already in hand (e.g. a Flower Strategy's replies): the same
        checks and aggregate; the outcome also lists the valid updates."""
        aggregation = RoundAggregation(self, round_, keep_updates=True)
        for _task in aggregation.issue(iter(tasks)):
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
        started, clock_started = time.perf_counter(), time.time()
        outcome = server.run_round(round_, runtime)
        round_s = time.perf_counter() - started
        spectrum = server.spectrum()  # its seconds are in the record, and in time.other_s
        clock_ended = time.time()
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
                **({"privacy": server.privacy_record(round_, outcome)} if server.privacy is not None else {}),
                # Wall-clock time (Unix seconds) of the round's start and of its end before the
                # evaluation: what tells other processes' CPU time during a round (bench deployment).
                "clock": {"started": clock_started, "round_ended": clock_ended},
            }
        )
    return history
