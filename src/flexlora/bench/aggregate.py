"""`flexlora bench aggregate`: FlexLoRA's server step against the reference procedure.

In one process and on the same random client factors, per LLaMA-shaped module:

- reference: what the released FlexLoRA code does: materialise each client's p_k s_k B_k A_k,
  sum them, full ``torch.linalg.svd`` of the sum;
- ours: ``FlexLoRA(svd_mode=mode, max_global_rank=max_k r_k).aggregate`` (the server never
  hands out more than the largest client rank), for each requested mode;
- floor (dense modes): the one product B̃ Ã of the stacked factors alone, which any method
  that needs the dense ΔW must pay.

Every procedure is timed `repeat` times, the repeats interleaved (reference, then each mode, in
turn), so that all of them see the same machine load; reported per case and mode: the median
wall time (and the range over the repeats), its ratio to the reference's median, peak memory
(the largest over the repeats) above what
was allocated before the step (CUDA: the allocator's peak; CPU: resident memory sampled every
millisecond, so a spike shorter than that can be missed), and for every rank r a client of
the case has, the quality ‖ΔW − Ŵ_r‖_F / ‖ΔW − W*_r‖_F with Ŵ_r what a client of rank r
receives and W*_r the optimal rank-r truncation (‖ΔW − W*_r‖_F = (Σ_{i>r} σ_i²)^½ from the
reference's singular values); 1.0 is perfect. The errors are accumulated in float64; ΔW
itself is float32, so ratios are meaningful to about 1e-6.

Cases (rank types drawn like a run does, from the paper's profiles and the seed):
(a) 10 clients from heavy-tail-light (Σ r_k < min(m, n): the factored regime);
(b) 80 clients from heavy-tail-strong (Σ r_k ≈ 14,000 > min(m, n): the dense regime).
"""

from __future__ import annotations

import ctypes
import json
import logging
import platform
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from flexlora.bench.common import goal, interleaved, median, report, with_count
from flexlora.errors import ConfigError
from flexlora.resources import assign_rank_types, paper_rank_types

if TYPE_CHECKING:  # torch and the methods are imported where they run: the command line stays light
    import torch

    from flexlora.methods.base import ClientUpdate

# (m, n) per module kind; attention modules use q_proj's ranks, MLP ones down_proj's.
SIZES = {
    "quick": {"q_proj": (512, 512), "down_proj": (512, 1376)},
    "1.3b": {"q_proj": (2048, 2048), "down_proj": (2048, 5504)},
    "8b": {"q_proj": (4096, 4096), "down_proj": (4096, 14336)},
}
CASES = {"a": ("heavy-tail-light", 10), "b": ("heavy-tail-strong", 80)}
MODES = ("auto", "factored", "dense", "randomized")
ALPHA = 16.0


@dataclass
class Row:
    size: str
    case: str
    module: str
    shape: tuple[int, int]
    clients: int
    total_rank: int
    max_rank: int
    mode: str  # "reference", or the FlexLoRA mode as run ("auto->dense")
    time_s: float  # median over the repeats
    peak_mb: float  # largest over the repeats
    times: list[float] = field(default_factory=list)  # every repeat, in order
    quality: dict[int, float] = field(default_factory=dict)
    speedup: float | None = None  # reference median time / this median time
    floor_s: float | None = None  # the one dense product alone (median)
    note: str = ""


# ---------------------------------------------------------------- inputs


def client_updates(case: str, module: str, shape: tuple[int, int], seed: int, device: torch.device) -> list[ClientUpdate]:
    """Random float32 factors for the case's clients (types drawn from its profile and seed)."""
    import torch

    from flexlora.methods.base import ClientUpdate

    profile, count = CASES[case]
    ids = [f"client{i:03d}" for i in range(count)]
    types = assign_rank_types(ids, profile, seed)
    rank_types = paper_rank_types()
    m, n = shape
    gen = torch.Generator().manual_seed(seed * 1009 + len(module))
    out = []
    for cid in ids:
        r = min(rank_types[types[cid]].rank_for(module), m, n)
        A = (torch.rand(r, n, generator=gen) * 2 - 1) / n**0.5  # PEFT-like A
        B = torch.randn(m, r, generator=gen) * 0.01  # a trained B
        num_examples = int(torch.randint(50, 500, (1,), generator=gen))
        out.append(ClientUpdate(cid, num_examples, ALPHA, {module: (A.to(device), B.to(device))}))
    return out


# ---------------------------------------------------------------- the two procedures


def reference_aggregate(updates: list[ClientUpdate], module: str):
    """The released code's procedure: one dense product per client, summed, full SVD."""
    import torch

    total = sum(u.num_examples for u in updates)
    dense = None
    for u in updates:
        A, B = u.factors[module]
        term = (u.num_examples / total) * u.scale(module) * (B @ A)
        dense = term if dense is None else dense + term
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return dense, U, S, Vh


# ---------------------------------------------------------------- measurement


def limit_malloc_caching() -> None:
    """Let freed blocks of >= 1 MiB go back to the OS (glibc), so that resident memory tracks
    live tensors and the CPU peak is measurable. No effect elsewhere."""
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


@contextmanager
def gram_routes():
    """Collects which Gram route the dense kernel took ("float32 Gram certified", ...)."""
    routes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            routes.append(record.getMessage().split(": ", 1)[-1])

    logger = logging.getLogger("flexlora.methods.svd")
    handler, level, propagate = Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # collected here, not printed
    try:
        yield routes
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def slice_quality(dense: torch.Tensor, S_ref: torch.Tensor, approx_factors, ranks: list[int]) -> dict[int, float]:
    """{r: ‖ΔW − Ŵ_r‖_F / (Σ_{i>r} σ_i²)^½} with Ŵ_r = (α/r) B A from approx_factors(r)."""
    tail = S_ref.double().pow(2).flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i>=r} σ_i² (0-based)
    out = {}
    for r in ranks:
        A, B = approx_factors(r)
        err2 = 0.0
        for j in range(0, dense.shape[1], 4096):  # float64 accumulation, one block at a time
            block = dense[:, j : j + 4096] - (ALPHA / r) * (B @ A[:, j : j + 4096])
            err2 += float(block.double().pow(2).sum())
        optimal = float(tail[r]) if r < len(tail) else 0.0
        out[r] = (err2 / optimal) ** 0.5 if optimal > 0 else float("nan")
    return out


# ---------------------------------------------------------------- the benchmark


def run_case(size: str, case: str, module: str, shape, modes, *, seed, device, repeat, oversample, niter, echo) -> list[Row]:
    from flexlora.methods.flexlora import FlexLoRA
    from flexlora.methods.helpers import data_weights, stack_factors

    updates = client_updates(case, module, shape, seed, device)
    ranks = sorted({u.rank(module) for u in updates})
    R, max_rank = sum(u.rank(module) for u in updates), max(ranks)
    common = dict(size=size, case=case, module=module, shape=tuple(shape), clients=len(updates), total_rank=R, max_rank=max_rank)
    echo(f"  {size} case {case} {module} {shape[0]}x{shape[1]}: {len(updates)} clients, ranks {ranks}, sum {R}")

    # The modes to run (label -> FlexLoRA), in order; "auto" first resolves to a kernel.
    methods: dict[str, FlexLoRA] = {}
    seen = set()
    for mode in modes:
        resolved = mode if mode != "auto" else ("factored" if R < min(shape) else "dense")
        if resolved in seen:
            continue
        if mode == "factored" and R >= min(shape):
            echo(f"    factored: skipped (sum of ranks {R} >= min(m, n) = {min(shape)})")
            continue
        seen.add(resolved)
        label = f"auto->{resolved}" if mode == "auto" else mode
        methods[label] = FlexLoRA(
            svd_mode=mode, max_global_rank=max_rank, oversample=oversample, niter=niter, seed=seed, device=device
        )
    needs_floor = any(label.split("->")[-1] in ("dense", "randomized") for label in methods)

    procedures = {"reference": lambda: reference_aggregate(updates, module)}
    for label, method in methods.items():
        procedures[label] = lambda method=method: method.aggregate(updates, None)
    if needs_floor:
        B_stack, A_stack = stack_factors(updates, module, data_weights(updates))
        procedures["floor"] = lambda: B_stack @ A_stack
    with gram_routes() as routes:
        results = interleaved(repeat, device, procedures)
    floor = None
    if needs_floor:
        del B_stack, A_stack
        floor = median(results.pop("floor")[1])
    del procedures

    (dense, U, S, Vh), ref_times, peak_ref = results.pop("reference")
    t_ref = median(ref_times)
    ref_row = Row(**common, mode="reference", time_s=t_ref, peak_mb=peak_ref, times=ref_times, speedup=1.0)
    ref_row.quality = slice_quality(dense, S, lambda r, U=U, S=S, Vh=Vh: (Vh[:r], U[:, :r] * S[:r] / (ALPHA / r)), ranks)
    del U, Vh
    echo(f"    reference: {t_ref:.3f} s (median of {repeat}: {_spread(ref_times)}), peak {peak_ref:.0f} MB")
    rows = [ref_row]
    for label, method in methods.items():
        state, times, peak = results[label]
        t = median(times)
        row = Row(**common, mode=label, time_s=t, peak_mb=peak, times=times, speedup=t_ref / t)
        row.quality = slice_quality(
            dense, S, lambda r, method=method, state=state: method.client_factors(state, {module: r}, ALPHA)[module], ranks
        )
        if label.split("->")[-1] in ("dense", "randomized"):
            row.floor_s = floor
        if label == "randomized":
            row.note = f"q = k + {oversample}, {niter} power iterations"
        elif label.endswith("dense") and routes:
            row.note = routes[-1]
        rows.append(row)
        del state
        worst = max(abs(q - 1) for q in row.quality.values())
        echo(
            f"    {row.mode}: {t:.3f} s (median of {repeat}: {_spread(times)}; {t_ref / t:.1f}x faster), peak {peak:.0f} MB, worst slice {1 + worst:.7f} of optimal"
        )
    return rows


def _spread(times: list[float]) -> str:
    return f"{min(times):.3f}-{max(times):.3f} s" if len(times) > 1 else f"{times[0]:.3f} s"


def run_benchmark(
    sizes=("1.3b", "8b"),
    cases=("a", "b"),
    modes=("auto", "dense", "randomized"),
    *,
    seed: int = 0,
    device: str | None = None,
    repeat: int = 3,
    oversample: int = 64,
    niter: int = 2,
    echo=print,
) -> list[Row]:
    """Rows per size, case, module and mode; every time is the median of `repeat` interleaved
    runs (see run_case)."""
    for s in sizes:
        if s not in SIZES:
            raise ValueError(f"unknown size {s!r}; choose from: {', '.join(SIZES)}")
    for c in cases:
        if c not in CASES:
            raise ValueError(f"unknown case {c!r}; choose from: {', '.join(CASES)}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available")
    limit_malloc_caching()
    echo(
        f"device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f", {torch.get_num_threads()} threads")
    )
    rows = []
    for size in sizes:
        for case in cases:
            for module, shape in SIZES[size].items():
                rows += run_case(
                    size,
                    case,
                    module,
                    shape,
                    modes,
                    seed=seed,
                    device=dev,
                    repeat=repeat,
                    oversample=oversample,
                    niter=niter,
                    echo=echo,
                )
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows (times: median over the repeats, then the range)."""
    lines = [
        "| size | case | module (m×n) | clients, Σr | mode | time (s), median [range] | × faster than reference (medians) | peak (MB) | ‖ΔW−Ŵ_r‖/‖ΔW−W*_r‖ per client rank r | time / floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        quality = ", ".join(f"r={k}: {v:.7f}" for k, v in r.quality.items())
        floor = f"{r.time_s / r.floor_s:.2f} (floor {r.floor_s:.2f} s)" if r.floor_s else ""
        mode = r.mode + (f" ({r.note})" if r.note else "")
        spread = f" [{min(r.times):.3f}–{max(r.times):.3f}]" if len(r.times) > 1 else ""
        lines.append(
            f"| {r.size} | {r.case} | {r.module} {r.shape[0]}×{r.shape[1]} | {r.clients}, {r.total_rank} | {mode} | "
            f"{r.time_s:.3f}{spread} | {r.speedup:.1f} | {r.peak_mb:.0f} | {quality} | {floor} |"
        )
    return "\n".join(lines)


SPEED_GOALS = {"a": 30.0, "b": 2.5}  # × faster than the reference, for the mode `auto` picks
EXACT_GOAL = 1e-5  # exact modes: every slice within this of optimal
RANDOMIZED_GOAL = 1.01


def goals(rows: list[Row]) -> list[str]:
    """The issue's goals, checked on the measured rows (median times), one PASS/FAIL line
    each, and a last line counting them. Quick-size rows are not checked."""
    out = []
    for r in rows:
        if r.mode == "reference" or r.size == "quick":
            continue
        worst = max(abs(q - 1) for q in r.quality.values())
        label = f"{r.size} case {r.case} {r.module} {r.shape[0]}×{r.shape[1]} {r.mode}"
        if r.mode == "randomized":
            out.append(goal(worst <= RANDOMIZED_GOAL - 1, f"{label}: quality <= {RANDOMIZED_GOAL:g}", f"{1 + worst:.5f}"))
            continue
        out.append(goal(worst <= EXACT_GOAL, f"{label}: within {EXACT_GOAL:g} of optimal", f"{worst:.1e}"))
        if r.mode.startswith("auto"):
            target = SPEED_GOALS[r.case]
            out.append(
                goal(
                    r.speedup >= target,
                    f"{label}: >= {target:g}x faster than the reference",
                    f"{r.speedup:.1f}x, medians of {len(r.times)}: {r.time_s * r.speedup:.3f} s / {r.time_s:.3f} s",
                )
            )
    return with_count(out)


def write_json(rows: list[Row], path) -> None:
    with open(path, "w") as f:
        json.dump([{**asdict(r), "quality": {str(k): v for k, v in r.quality.items()}} for r in rows], f, indent=2)


# ---------------------------------------------------------------- the command


HELP = "FlexLoRA's server step vs the reference procedure (per-client products + full SVD) on random client factors"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--sizes",
        default="1.3b,8b",
        help="comma-separated: quick (512x512, 512x1376), 1.3b (2048x2048, 2048x5504), 8b (4096x4096, 4096x14336)",
    )
    parser.add_argument(
        "--cases", default="a,b", help="a: 10 clients from heavy-tail-light; b: 80 clients from heavy-tail-strong"
    )
    parser.add_argument("--modes", default="auto,dense,randomized", help="FlexLoRA svd modes: auto, factored, dense, randomized")
    parser.add_argument("--quick", action="store_true", help="small shapes only, one repeat unless --repeat (seconds)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="time every procedure N times, interleaved; report medians (default 3; --quick: 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--oversample", type=int, default=64, help="randomized mode: extra subspace columns")
    parser.add_argument("--niter", type=int, default=2, help="randomized mode: power iterations")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def run_command(args) -> None:
    sizes = ["quick"] if args.quick else args.sizes.split(",")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    try:
        rows = run_benchmark(
            sizes,
            args.cases.split(","),
            args.modes.split(","),
            seed=args.seed,
            device=args.device,
            repeat=repeat,
            oversample=args.oversample,
            niter=args.niter,
        )
    except ValueError as e:
        raise ConfigError(f"bench aggregate: {e}") from None
    report(__name__, rows, args.json)
