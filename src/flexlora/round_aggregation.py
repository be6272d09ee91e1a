"""One round's results, taken one at a time (``RoundAggregation``): each is checked against its
task, screened by the norm rule, folded into the method's accumulator with its weight (n_k, or
what federation.max_weight_share makes of it) and dropped; ``finish`` makes the new global
state, or keeps the previous one. What the round did is a ``RoundOutcome``. Under client-level DP
(flexlora.privacy) each update is clipped before it is folded, with privacy.weighting's weight,
and the round's noise joins the sum before ``finish`` makes the state.
FederatedServer.run_round (server.py) drives it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexlora.methods.server_opt import starting_point
from flexlora.methods.threads import one_cpu_thread
from flexlora.protocol import ClientFailure, ClientTask, ClientUpdate
from flexlora.validation import NormScreen, check_result, update_norm

if TYPE_CHECKING:
    from flexlora.server import FederatedServer

logger = logging.getLogger("flexlora.server")  # its warnings read as the server's, as before


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
    # Client-level DP (privacy.enabled): each aggregated update's change norm before clipping
    # (client id -> norm; empty without clipping) and the clients clipped.
    privacy: dict | None = None

    @property
    def valid_updates(self) -> int:
        return len(self.metrics)


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
        # Client-level DP (flexlora.privacy): its weights replace n_k and max_weight_share, and
        # its clipping replaces the norm rule, whose verdict on one update depends on the others'.
        self.privacy = server.privacy
        self.screening = fed.max_norm_ratio is not None and (self.privacy is None or self.privacy.clipping_norm is None)
        self.screen = NormScreen(fed.max_norm_ratio if self.screening else None)
        self.dp_weights: dict[str, float] = {}
        self.dp_norms: dict[str, float] = {}
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
        server = self.server
        with one_cpu_thread():  # many small checks and reductions: no thread barriers
            problem = check_result(
                result,
                self.tasks,
                self.seen,
                server.shapes,
                server.cfg.lora.alpha,
                exact_rank=server.method.homogeneous,
                declared_sizes=server.declared_sizes,
            )
        if isinstance(result, ClientUpdate) and result.client_id in self.seen:
            self.tasks.pop(result.client_id, None)  # answered: its factors can go
        if problem is not None:
            self.reject(*problem)
            decided = []
        else:
            norm = update_norm(result) if self.screening else None
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
        if self.privacy is not None:  # bounded weights, folded at once: no cap to wait for
            self.dp_weights[cid] = self.privacy.weight(update.num_examples)
            self.fold(update, self.dp_weights[cid])
            return
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
        if self.privacy is None:
            self.accumulator.add(update, weight)
        else:  # its change over the round clipped to C first (the same object when within C)
            clipped, norm = self.privacy.clip(self.server.method, update, self.server.state)
            self.accumulator.add(clipped, weight)
            if norm is not None:
                self.dp_norms[update.client_id] = norm
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
                self.round,
                len(self.sizes),
                fed.min_updates,
            )
            server.last_truncation = None
        elif self.privacy is not None:
            total = sum(self.dp_weights.values())
            weights = {cid: w / total for cid, w in self.dp_weights.items()}
        else:
            weights = dict(zip(self.sizes, server.weights(list(self.sizes.values()), self.round)))
            first = self.first_released
            scale = weights[first] / self.sizes[first] if first is not None else 0.0  # λ
            for update in self.cap_held:
                p = weights[update.client_id]
                self.fold(update, p / scale if scale > 0 else p)
            self.cap_held = []
        if not kept_previous:
            started = time.perf_counter()
            if self.privacy is not None:  # into the round's sum, before the method's post-processing
                self.privacy.add_noise(self.accumulator, self.round)
            state = self.accumulator.result()
            if server.server_step is not None:
                state = server.server_step(server.method, self.start.result() if self.start is not None else None, state)
            server.state = state
            self.aggregation_s += time.perf_counter() - started
            server.after_aggregation(self.module_ranks)
        return RoundOutcome(
            self.metrics,
            self.failures,
            self.rejected,
            kept_previous,
            self.aggregation_s,
            self.validation_s,
            weights,
            self.kept or [],
            configure_s=self.configure_s,
            privacy=None if self.privacy is None else self._privacy_outcome(),
        )

    def _privacy_outcome(self) -> dict:
        bound = self.privacy.clipping_norm
        clipped = sorted(cid for cid, norm in self.dp_norms.items() if bound is not None and norm > bound)
        return {"update_norms": dict(self.dp_norms), "clipped": clipped}
