"""Checks on what clients send back, before anything reaches an aggregation method.

Pure functions on ``ClientUpdate``s and the ``ClientTask``s the server sent: no I/O, no model,
no transport, so every runtime (in-process, Flower) gets the same checks from the server.
A check returns a one-line reason (naming the module or field) or None when the update is fine.

What a valid update is, for every method:
- it comes from a client sampled this round, once;
- num_examples is a positive integer (it is an aggregation weight: a negative or zero one
  would flip or void the client's contribution), and not above the size the client declared
  once, before round 1 (``declared_sizes``: its training-set size in-process, its discovery
  reply on Flower), so that a client cannot buy the global model with a claimed size;
  lora_alpha is the server's;
- metrics are JSON (they go into metrics.jsonl);
- factors cover exactly the modules the server asked for, each a pair of 2-D floating-point
  tensors A (r, n), B (m, r) with (m, n) the module's weight shape and 1 <= r <= the rank the
  server assigned (a smaller rank is allowed: a method may let clients prune theirs; homogeneous
  methods need exactly the assigned rank), all values finite;
- its norm ||Σ s B A|| is not far above the others' (``max_norm_ratio``), see ``norm_outliers``.
What else a method's update must satisfy is the method's own rule, on the client hooks of the
task's options (``ClientHook.check_module``, in the method's module): a hook that sends
"deltas" checks each module's delta instead of (A, B); another may add a rule on (A, B), e.g.
that a frozen A comes back as it was sent.
"""

from __future__ import annotations

import json
import math
from statistics import median

import torch

from flexlora.methods import parse_client_options
from flexlora.methods.helpers import FLOAT_DTYPES, nonfinite
from flexlora.methods.helpers import update_norm as factor_norm
from flexlora.methods.threads import map_modules
from flexlora.protocol import ClientUpdate


def check_update(
    update: ClientUpdate,
    task,
    shapes: dict[str, tuple[int, int]],
    lora_alpha: float,
    *,
    exact_rank: bool = False,
) -> str | None:
    """The first problem with one update (vs the task it answers), or None if it is well-formed."""
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    alpha = update.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha != lora_alpha:
        return f"lora_alpha {alpha!r} differs from the server's {lora_alpha}"
    try:
        json.dumps(update.metrics, allow_nan=True)
    except (TypeError, ValueError) as e:
        return f"metrics are not JSON-serialisable ({e})"
    hooks = parse_client_options(getattr(task, "options", None) or {})
    payload = next((h for h in hooks if h.sends == "deltas"), None)  # checks the deltas it asked for
    as_deltas = payload is not None
    # Duck-typed: an update object may lack `deltas` (ClientUpdate has it).
    deltas = getattr(update, "deltas", None) or {}
    sent, other, kind = (deltas, update.factors, "deltas") if as_deltas else (update.factors, deltas, "factors")
    if not isinstance(sent, dict) or not sent:
        return f"empty update (no {kind})"
    if other:
        return f"sent {'factors' if as_deltas else 'deltas'} where the task asked for {kind}"
    expected = task.module_ranks
    missing = sorted(set(expected) - set(sent))
    if missing:
        return f"missing {len(missing)} module(s), e.g. {missing[0]}"
    extra = sorted(set(sent) - set(expected))
    if extra:
        return f"{len(extra)} unexpected module(s), e.g. {extra[0]}"
    for module in sorted(expected):
        if as_deltas:
            problem = payload.check_module(module, sent[module], task, shapes[module])
        else:
            problem = _check_factors(sent[module], shapes[module], expected[module], exact_rank)
            for hook in hooks:
                if problem is None:
                    problem = hook.check_module(module, sent[module], task, shapes[module])
        if problem:
            return f"module {module}: {problem}"
    return None


def check_declared_size(claimed: int, declared: int | None) -> str | None:
    """A reply may not claim more examples than its client declared (None: nothing declared)."""
    if declared is not None and claimed > declared:
        return f"num_examples {claimed} is above the {declared} this client declared"
    return None


def _check_factors(pair, shape: tuple[int, int], assigned_rank: int, exact_rank: bool) -> str | None:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return "factors must be a pair (A, B)"
    A, B = pair
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if t.dtype not in FLOAT_DTYPES:
            return f"{name} has dtype {t.dtype}, expected a floating-point dtype"
        if t.ndim != 2:
            return f"{name} must be 2-D, got shape {tuple(t.shape)}"
    m, n = shape
    r = A.shape[0]
    if r == 0 or A.numel() == 0 or B.numel() == 0:
        return f"empty factors A {tuple(A.shape)}, B {tuple(B.shape)}"
    if A.shape != (r, n) or B.shape != (m, r):
        return f"shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit weight ({m}, {n}) at rank {r}"
    if r > assigned_rank:
        return f"rank {r} above the assigned rank {assigned_rank}"
    if exact_rank and r != assigned_rank:
        return f"rank {r}, but this method needs exactly the assigned rank {assigned_rank}"
    for name, t in (("A", A), ("B", B)):
        problem = nonfinite(t)
        if problem:
            return f"{name} {problem}"
    return None


def update_norm(update: ClientUpdate) -> float:
    """Frobenius norm of the client's whole update, sqrt(Σ_modules ||s B A||²), computed from
    the r×r Gram matrices (||BA||² = Σ (BᵀB) ⊙ (AAᵀ)) so no (m, n) matrix is formed;
    deltas add the squares of their values."""
    total = sum(float(d.values.double().square().sum()) for d in (getattr(update, "deltas", None) or {}).values())

    def module_norm(module: str) -> float:  # float32 (2.6x faster than float64 here, relative error ~1e-8)
        return update.scale(module) ** 2 * factor_norm(*update.factors[module], squared=True, exact=False)

    # Modules side by side, each on one thread (small r×r products: see threads.map_modules).
    modules = list(update.factors)
    device = update.factors[modules[0]][0].device if modules else None
    total += sum(map_modules(module_norm, modules, device))
    return math.sqrt(total)


def norm_outliers(norms: dict[str, float], max_ratio: float | None) -> dict[str, str]:
    """Clients whose update norm exceeds max_ratio × the median of the *other* clients' norms.

    Leaving the client itself out keeps the bound meaningful with two clients (the plain
    median of two is their mean, which a single huge update drags up with it). Nothing is
    rejected with fewer than two clients or when the others' median is zero.
    """
    if max_ratio is None or len(norms) < 2:
        return {}
    out = {}
    for cid, norm in norms.items():
        ref = median(v for c, v in norms.items() if c != cid)
        if ref > 0 and norm > max_ratio * ref:
            out[cid] = (
                f"update norm {norm:.3g} is {norm / ref:.1f}x the median of the others ({ref:.3g}), above the bound {max_ratio:g}x"
            )
    return out


# The norm rule on updates that arrive one at a time: the first NORM_WARMUP are held and judged
# together (the all-at-once rule, so a round of up to NORM_WARMUP updates is judged exactly as
# before); every later one against the median of the norms of all the round's updates before
# it. So a server holds at most NORM_WARMUP updates for this rule, whatever the round's size.
NORM_WARMUP = 4


class NormScreen:
    """``norm_outliers`` for a stream of updates (see NORM_WARMUP). ``offer`` and ``flush``
    return the updates decided so far as (item, reason), reason None for an accepted one."""

    def __init__(self, max_ratio: float | None, warmup: int = NORM_WARMUP):
        self.max_ratio, self.warmup = max_ratio, warmup
        self.norms: list[float] = []  # every update offered so far
        self.held: list[tuple[str, float, object]] = []
        self.warm = max_ratio is None

    def offer(self, client_id: str, norm: float | None, item) -> list[tuple[object, str | None]]:
        if self.warm:
            decided = [(item, self._against_earlier(norm))]
        else:
            self.held.append((client_id, norm, item))
            decided = self.flush() if len(self.held) >= self.warmup else []
        if norm is not None:
            self.norms.append(norm)
        return decided

    def flush(self) -> list[tuple[object, str | None]]:
        """Judge the held updates together (at the end of the warm-up, or of the round)."""
        outliers = norm_outliers({cid: norm for cid, norm, _ in self.held}, self.max_ratio)
        decided = [(item, outliers.get(cid)) for cid, _, item in self.held]
        self.held, self.warm = [], True
        return decided

    def _against_earlier(self, norm: float | None) -> str | None:
        if self.max_ratio is None or not self.norms:
            return None
        ref = median(self.norms)
        if ref > 0 and norm > self.max_ratio * ref:
            return f"update norm {norm:.3g} is {norm / ref:.1f}x the median of the earlier ones ({ref:.3g}), above the bound {self.max_ratio:g}x"
        return None


def check_result(
    u,
    tasks: dict,
    seen: set[str],
    shapes: dict[str, tuple[int, int]],
    lora_alpha: float,
    *,
    exact_rank: bool = False,
    declared_sizes: dict[str, int] | None = None,
) -> tuple[str, str] | None:
    """(key, reason) when one received result is not a valid update of this round, else None
    (its client id is then added to `seen`). `tasks`: client id -> the task it answers."""
    cid = getattr(u, "client_id", None)
    if not isinstance(u, ClientUpdate):
        return str(cid), f"not a ClientUpdate: {type(u).__name__}"
    if cid in seen:
        return f"{cid}#duplicate", "second update from the same client this round"
    if cid not in tasks:
        return str(cid), "client was not sampled this round"
    seen.add(cid)
    reason = check_update(u, tasks[cid], shapes, lora_alpha, exact_rank=exact_rank)
    if reason is None and declared_sizes is not None:
        reason = check_declared_size(u.num_examples, declared_sizes.get(cid))
    return None if reason is None else (cid, reason)


def validate_round(
    results: list[ClientUpdate],
    tasks: list,
    shapes: dict[str, tuple[int, int]],
    lora_alpha: float,
    *,
    max_norm_ratio: float | None = None,
    exact_rank: bool = False,
    declared_sizes: dict[str, int] | None = None,
) -> tuple[list[ClientUpdate], dict[str, str]]:
    """(valid updates, {client_id: reason} of rejected ones) for one round, in the order received,
    judged as the server judges a stream of them (check_result, then NormScreen).
    `declared_sizes`: client id -> the most examples it may claim (see check_declared_size)."""
    by_id = {t.client_id: t for t in tasks}
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    screen = NormScreen(max_norm_ratio)
    decided = []
    for u in results:
        problem = check_result(u, by_id, seen, shapes, lora_alpha, exact_rank=exact_rank, declared_sizes=declared_sizes)
        if problem is not None:
            rejected[problem[0]] = problem[1]
            continue
        decided += screen.offer(u.client_id, update_norm(u) if max_norm_ratio is not None else None, u)
    decided += screen.flush()
    for u, reason in decided:
        if reason is not None:
            rejected[u.client_id] = reason
    return [u for u, reason in decided if reason is None], rejected
