"""Secure aggregation (`flower.secure_aggregation=true`), the part that knows no transport.

Under Flower's SecAgg+ (flexlora.engines.flower.secagg runs it) the server receives only the
weighted mean Σ_k w_k x_k / Σ_k w_k of what the round's clients upload: each x_k leaves its
client quantised and masked, and the masks cancel only in the sum. So the server can run a
method only if the method's new state is a function of such a mean (Method.secure_summands,
from_secure_mean): FlexLoRA, FLoRA (x_k = s_k B_k A_k), FedEx-LoRA (that and the padded
factors), FedIT, HetLoRA with zero padding (A_k, s_k B_k padded) and FFA-LoRA (s_k B_k padded).

Here: which methods can run (`check_secure`), what a client uploads (`SecureSpec`: the same
arrays in the same order and shape from every client; `summands`), the error SecAgg+'s
quantisation adds to the mean (`quantization_bound`), and the server's round on the mean
(`secure_round`). numpy only at module level: a ClientApp computes its upload without torch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from flexlora.methods.base import Method
    from flexlora.protocol import ClientTask
    from flexlora.round_aggregation import RoundOutcome
    from flexlora.server import FederatedServer

logger = logging.getLogger("flexlora.server")

KINDS = ("A", "B", "dense")  # see Method.secure_summands


def check_secure(method: Method, server_step=None) -> tuple[str, ...]:
    """The kinds of array the method's clients upload under secure aggregation; a one-line
    ValueError naming why the method, or what composes with it, cannot run under it."""
    kinds = tuple(method.secure_summands())
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"method {method.name}: secure_summands must be some of {', '.join(KINDS)}, got {kinds!r}")
    if server_step is not None:
        raise ValueError("server_opt: a server optimizer needs each client's starting point, which secure aggregation hides")
    return kinds


def _share(value: float, key: str, at_least: int) -> int | float:
    """A SecAgg+ share setting as SecAggPlusWorkflow takes it: a fraction (<= 1) as a float, a
    count as an int (Flower reads an int as a count and a float as a fraction)."""
    if value <= 1:
        return float(value)
    if value != int(value) or value < at_least:
        raise ValueError(f"flower.secagg_{key}: a fraction (<= 1) or an integer >= {at_least}, got {value:g}")
    return int(value)


def workflow_arguments(cfg) -> dict:
    """SecAggPlusWorkflow's arguments from cfg.flower.secagg_*, checked (one-line ValueError naming
    the key): counts and fractions, M a power of 2 above q, and K q below M for K clients a round
    (each client's quantised entries reach q, so a larger sum would wrap around modulo M)."""
    f = cfg.flower
    shares = _share(f.secagg_num_shares, "num_shares", 3)
    threshold = _share(f.secagg_reconstruction_threshold, "reconstruction_threshold", 2)
    if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
        raise ValueError(f"flower.secagg_reconstruction_threshold: {threshold} must be below secagg_num_shares ({shares})")
    M, q = f.secagg_modulus_range, f.secagg_quantization_range
    if M & (M - 1) or M <= q:
        raise ValueError(f"flower.secagg_modulus_range: a power of 2 above secagg_quantization_range ({q}), got {M}")
    fed = cfg.federation
    K = fed.clients_per_round if fed.fraction is None else -(-fed.fraction * cfg.data.num_clients // 1)
    if K * q >= M:
        raise ValueError(
            f"flower.secagg_quantization_range: {K:g} clients a round x q = {K * q:g} must stay below secagg_modulus_range ({M}), "
            "or the masked sum wraps around"
        )
    return {
        "num_shares": shares,
        "reconstruction_threshold": threshold,
        "clipping_range": float(f.secagg_clipping_range),
        "quantization_range": int(q),
        "modulus_range": int(M),
    }


def check_config(cfg, method: Method, server_step=None) -> None:
    """The checks of flower.secure_aggregation=true (one-line ValueError): the Flower engine, a
    method whose state comes from a weighted mean, no differential privacy (not wired into the
    secure round), two clients a round at least, and the protocol's settings (workflow_arguments)."""
    if cfg.engine != "flower":
        raise ValueError("flower.secure_aggregation: needs engine=flower (Flower's simulation engine or a deployment)")
    try:
        check_secure(method, server_step)
    except ValueError as e:
        raise ValueError(f"flower.secure_aggregation: {e}") from None
    if getattr(cfg, "privacy", None) is not None and cfg.privacy.enabled:
        raise ValueError(
            "flower.secure_aggregation: not with privacy.enabled yet: differential privacy clips and noises "
            "the updates the server folds, and under SecAgg+ it folds none"
        )
    if cfg.federation.fraction is None and cfg.federation.clients_per_round < 2:
        raise ValueError("flower.secure_aggregation: needs federation.clients_per_round >= 2 (one client's sum is its update)")
    workflow_arguments(cfg)


@dataclass(frozen=True)
class SecureSpec:
    """What every client of a secure round uploads, the same for all (SecAgg+ sums arrays
    position by position): per module (sorted), per kind, one float64 array."""

    kinds: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]  # module -> (m, n), its weight's (out, in)
    ranks: dict[str, int]  # module -> R, the round's largest assigned rank: what A and B are padded to

    @classmethod
    def of_round(cls, kinds: tuple[str, ...], shapes: dict, module_ranks: list[dict[str, int]]) -> SecureSpec:
        ranks = {module: max(r[module] for r in module_ranks) for module in shapes}
        return cls(tuple(kinds), {m: (int(a), int(b)) for m, (a, b) in shapes.items()}, ranks)

    def entries(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, shape) of each uploaded array, in upload order."""
        out = []
        for module in sorted(self.shapes):
            (m, n), R = self.shapes[module], self.ranks[module]
            out += [(f"{module}.{kind}", {"A": (R, n), "B": (m, R), "dense": (m, n)}[kind]) for kind in self.kinds]
        return out

    def to_json(self) -> str:
        return json.dumps({"kinds": list(self.kinds), "shapes": self.shapes, "ranks": self.ranks})

    @classmethod
    def from_json(cls, text: str) -> SecureSpec:
        try:
            d = json.loads(text)
            kinds = tuple(d["kinds"])
            if not kinds or any(k not in KINDS for k in kinds):
                raise ValueError(f"kinds {kinds!r}")
            shapes = {str(m): (int(s[0]), int(s[1])) for m, s in d["shapes"].items()}
            return cls(kinds, shapes, {str(m): int(d["ranks"][m]) for m in shapes})
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"malformed secure-aggregation spec: {e}") from None


def summands(factors: dict[str, tuple[np.ndarray, np.ndarray]], lora_alpha: float, spec: SecureSpec) -> list[np.ndarray]:
    """What a client uploads, in spec.entries() order, float64: per module A_k zero-padded to R
    rows, s_k B_k zero-padded to R columns, s_k B_k A_k (s_k = α / r_k). One-line ValueError
    for a module missing or extra, a shape or rank that does not fit the spec, or a value that
    is not finite (the masked quantisation would turn it into garbage, silently)."""
    if set(factors) != set(spec.shapes):
        odd = sorted(set(factors) ^ set(spec.shapes))[0]
        raise ValueError(f"secure aggregation: module {odd} is {'missing' if odd in spec.shapes else 'not in the round'}")
    out = []
    for module in sorted(spec.shapes):
        A, B = (np.asarray(t, dtype=np.float64) for t in factors[module])
        (m, n), R = spec.shapes[module], spec.ranks[module]
        r = A.shape[0]
        if A.shape != (r, n) or B.shape != (m, r) or not 1 <= r <= R:
            raise ValueError(
                f"secure aggregation: module {module}: A {A.shape} and B {B.shape} do not fit (r, {n}) and ({m}, r) with 1 <= r <= {R}"
            )
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise ValueError(f"secure aggregation: module {module}: the update is not finite")
        scaled_B = B * (lora_alpha / r)
        for kind in spec.kinds:
            if kind == "dense":
                out.append(scaled_B @ A)
            else:
                padded = np.zeros((R, n) if kind == "A" else (m, R))
                if kind == "A":
                    padded[:r] = A
                else:
                    padded[:, :r] = scaled_B
                out.append(padded)
    return out


def mean_tensors(arrays: list[np.ndarray], spec: SecureSpec) -> dict[str, torch.Tensor]:
    """The mean secure aggregation returned (arrays in spec order) as named float32 tensors."""
    import torch

    entries = spec.entries()
    if len(arrays) != len(entries):
        raise ValueError(f"secure aggregation returned {len(arrays)} arrays, the round's spec has {len(entries)}")
    out = {}
    for (name, shape), array in zip(entries, arrays):
        if tuple(array.shape) != shape:
            raise ValueError(f"secure aggregation returned {name} of shape {tuple(array.shape)}, expected {shape}")
        out[name] = torch.from_numpy(np.asarray(array, dtype=np.float32))
    return out


def quantization_bound(weights: list[float], clipping_range: float, quantization_range: int, max_abs: float = 0.0) -> float:
    """The most by which one entry of SecAgg+'s mean differs from the exact weighted mean
    Σ w_k x_k / Σ w_k, for entries that stay in the clipping range, following Flower 1.41
    (secaggplus_mod, SecAggPlusWorkflow.unmask_stage). With c = clipping_range and
    q = quantization_range: client k sends its weight as the integer q_k = round(q w_k / max_j w_j),
    i.e. d_k = q_k / q; it quantises y_k = d_k x_k, clipped to [−c, c], to a grid of step 2c/q by
    stochastic rounding (an error below one step); the server sums and divides by Σ d_k. So

        |error| < (K · 2c/q + 2 · max|x| · Σ_k |d_k − w_k / max w|) / Σ_k d_k,

    the second term from rounding the weights (zero when they are equal: then the bound is 2c/q).
    `max_abs`: the largest |x_k| of the entries in question."""
    q, top = quantization_range, max(weights)
    ratios = [w / top for w in weights]
    d = [round(r * q) / q for r in ratios]
    rounding = sum(abs(dk - rk) for dk, rk in zip(d, ratios))
    return (len(weights) * 2 * clipping_range / q + 2 * max_abs * rounding) / sum(d)


# ---------------------------------------------------------------- the server's round


@dataclass
class SecureResult:
    """What a secure round's transport hands back: the weighted mean (arrays in spec order;
    None when the protocol did not complete), each contributing client's metrics (its
    training's, never its update) and why the others contributed nothing."""

    mean: list[np.ndarray] | None
    metrics: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


class SecureRuntime(Protocol):
    """A runtime that returns the clients' weighted mean instead of their updates."""

    def secure_mean(self, tasks: list[ClientTask], weights: dict[str, float], spec: SecureSpec) -> SecureResult: ...


def secure_round(server: FederatedServer, round_: int, runtime: SecureRuntime) -> RoundOutcome:
    """FederatedServer.run_round under secure aggregation: the round's tasks, each client's
    weight fixed before the round (its declared size, capped by federation.max_weight_share, over
    the sampled clients) and sent with its task, the weighted mean from the runtime, the
    method's state from it. Nothing validates single updates: the server never sees one."""
    from flexlora.round_aggregation import RoundOutcome

    started = time.perf_counter()
    cfg = server.cfg
    kinds = check_secure(server.method, server.server_step)
    tasks = server.configure(round_, server.sample(round_))
    ids = [t.client_id for t in tasks]
    undeclared = [cid for cid in ids if cid not in server.declared_sizes]
    if undeclared:
        raise ValueError(
            f"secure aggregation: client {undeclared[0]} declared no size; its weight must be fixed before the round"
        )
    weights = dict(zip(ids, server.weights([server.declared_sizes[cid] for cid in ids], round_)))
    ranks_of = {t.client_id: dict(t.module_ranks) for t in tasks}
    spec = SecureSpec.of_round(kinds, server.shapes, list(ranks_of.values()))
    configure_s = time.perf_counter() - started
    if len(tasks) < 2:  # SecAgg+ needs two clients at least: one client's "sum" is its update
        result = SecureResult(None, failures={cid: "secure aggregation needs at least 2 clients in a round" for cid in ids})
    else:
        result = runtime.secure_mean(tasks, weights, spec)
    del tasks  # their factors are not needed past the round's first stage
    contributors = list(result.metrics)
    server.round = round_
    kept = result.mean is None or len(contributors) < cfg.federation.min_updates
    aggregation_s, used = 0.0, {}
    if kept:
        logger.warning(
            "round %d: secure aggregation gave no mean of at least federation.min_updates=%d clients (%d contributed); "
            "keeping the previous global state",
            round_,
            cfg.federation.min_updates,
            len(contributors),
        )
        server.last_truncation = None
    else:
        t = time.perf_counter()
        ranks = {module: [ranks_of[cid][module] for cid in contributors] for module in spec.shapes}
        mean = mean_tensors(result.mean, spec)
        server.state = server.method.from_secure_mean(mean, server.state, cfg.lora.alpha, ranks)
        aggregation_s = time.perf_counter() - t
        server.after_aggregation({cid: ranks_of[cid] for cid in contributors})
        total = sum(weights[cid] for cid in contributors)
        used = {cid: weights[cid] / total for cid in contributors}
        clipped = sum(m.get("secagg_clipped_entries", 0) for m in result.metrics.values())
        if clipped:
            logger.warning(
                "round %d: %d entries of the clients' uploads were clipped to flower.secagg_clipping_range=%g "
                "(the mean is biased; raise it, at the cost of a coarser quantisation)",
                round_,
                clipped,
                cfg.flower.secagg_clipping_range,
            )
    return RoundOutcome(result.metrics, result.failures, {}, kept, aggregation_s, 0.0, used, configure_s=configure_s)
