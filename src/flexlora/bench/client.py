"""`flexlora bench client`: memory and speed of one client's local training, per precision option.

Every (model, option, implementation) is measured in a fresh child process, so that its peak
resident memory is its own (in one process the peak never goes down):

- ours: `flexlora.client.train_client` (the library's client: adapter attached to the shared
  model at the client's ranks, trained, factors sent back as float32, adapter removed);
- peft: a bare PEFT training loop on the same model, batch, ranks and optimizer
  (`get_peft_model`, AdamW, loss.backward, clip, step), the reference for tokens/s.

Each child loads the model with the option, runs `warmup` steps (not timed), then `steps`
timed steps on batches of `batch` sequences of exactly `seq` tokens (every token a target).
Reported: tokens/s of the median timed step (the client's last step includes sending the
factors back and removing the adapter; the mean over the steps is in the JSON); peak RSS of the child (`ru_maxrss`: loading included);
the resident memory when training starts, and its peak during the timed steps (sampled every
millisecond); on CUDA the allocator's peak (`torch.cuda.max_memory_allocated`) over the timed
steps. Options are `<dtype>[+ckpt]` with dtype float32 | bfloat16 | float16 | nf4 (4-bit NF4
base, bfloat16 compute), +ckpt for gradient checkpointing.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time

from flexlora.bench.common import PeakRSS, child_env, comma_list, goal, median, report, rss_mb, with_count
from flexlora.errors import ConfigError

DEFAULT_OPTIONS = ("float32", "bfloat16", "bfloat16+ckpt", "nf4", "nf4+ckpt")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
IMPLS = ("ours", "peft")


def parse_option(option: str) -> dict:
    """'bfloat16+ckpt' -> {dtype: bfloat16, quantization: None, gradient_checkpointing: True}."""
    base, *flags = option.split("+")
    if base not in (*DTYPE_NAMES, "nf4") or any(f != "ckpt" for f in flags):
        raise ValueError(f"unknown option {option!r}: expected <float32|bfloat16|float16|nf4>[+ckpt]")
    return {
        "dtype": "bfloat16" if base == "nf4" else base,
        "quantization": "nf4" if base == "nf4" else None,
        "gradient_checkpointing": "ckpt" in flags,
    }


# ---------------------------------------------------------------- the child process


def _examples(tokenizer, n: int, seq: int, seed: int):
    """n training examples whose prompt + answer tokenize to more than seq tokens."""
    from flexlora.data.types import Example

    rng = random.Random(seed)
    words = ["alpha", "river", "stone", "seven", "cloud", "table", "green", "music", "paper", "light"]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(seq * 2))
        out.append(Example(instruction=f"Repeat the words ({i}).", input=text, output=text))
    return out


def _config(spec: dict):
    from flexlora.config import DataConfig, ExperimentConfig, LoraSettings, TrainConfig

    return ExperimentConfig(
        model=spec["model"],
        model_dtype=spec["dtype"],
        quantization=spec["quantization"],
        device=spec["device"],
        lora=LoraSettings(alpha=16.0, dropout=0.05),
        train=TrainConfig(steps=spec["steps"], batch_size=spec["batch"], gradient_checkpointing=spec["gradient_checkpointing"]),
        data=DataConfig(cutoff_len=spec["seq"], train_on_inputs=True),
    )


def _peft_loop(model, features, cfg, target_modules, rank, steps, seed, device, pad_id, stats):
    """The reference: a bare PEFT training loop (same LoRA config, optimizer, clipping)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flexlora.client import autocast_dtype
    from flexlora.data.prompts import collate

    torch.manual_seed(seed)
    net = get_peft_model(
        model,
        LoraConfig(
            r=rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=target_modules, task_type="CAUSAL_LM"
        ),
    )
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    amp = autocast_dtype(cfg, device)
    net.train()
    batch = cfg.train.batch_size
    inputs = [
        {k: v.to(device) for k, v in collate(features[i : i + batch], pad_id).items()} for i in range(0, len(features), batch)
    ]
    losses = []
    for step in range(steps):
        stats.setdefault("step_marks", []).append(time.perf_counter())
        x = inputs[step % len(inputs)]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = net(**x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    stats["loss_first"], stats["loss_last"] = losses[0], losses[-1]
    return net


def worker(spec: dict) -> dict:
    """Measure one (model, option, impl) in this process; returns the row's numbers."""
    import torch

    from flexlora import lora
    from flexlora.client import ClientTask, train_client
    from flexlora.data.prompts import tokenize_for_training
    from flexlora.data.types import ClientData
    from flexlora.experiment import load_base, resolve_device
    from flexlora.models import default_target_modules

    rss_start = rss_mb()
    cfg = _config(spec)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    model, tokenizer = load_base(cfg, device)
    load_s = time.perf_counter() - started
    rss_loaded = rss_mb()
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    ranks = {name: min(spec["rank"], *shape) for name, shape in shapes.items()}
    n = spec["batch"] * max(spec["steps"], spec["warmup"], 1)
    examples = _examples(tokenizer, n, spec["seq"], spec["seed"])
    data = ClientData(client_id="bench", category="bench", train=examples)
    features = [tokenize_for_training(ex, tokenizer, cfg.data.template, cfg.data.cutoff_len, True) for ex in examples]
    lengths = {len(f["input_ids"]) for f in features}
    stats: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    import flexlora.client as client_module

    real_fault_point = client_module.fault_point

    def mark(*args):  # called by the client at the start of every optimizer step
        stats.setdefault("step_marks", []).append(time.perf_counter())
        return real_fault_point(*args)

    client_module.fault_point = mark

    def run(steps: int, measure: bool):
        cfg.train.steps = steps
        stats["step_marks"] = []
        if spec["impl"] == "ours":
            task = ClientTask("bench", 1, "bench", ranks, None, spec["seed"])
            update = train_client(model, tokenizer, data, task, cfg, targets)
            if measure:
                stats["loss_first"], stats["loss_last"] = update.metrics["train_loss_first"], update.metrics["train_loss_last"]
                stats["gradient_checkpointing"] = update.metrics["gradient_checkpointing"]
                stats["factor_dtypes"] = sorted({str(a.dtype) for a, _ in update.factors.values()})
        else:
            net = _peft_loop(
                model, features, cfg, targets, spec["rank"], steps, spec["seed"], device, tokenizer.pad_token_id, stats
            )
            net.unload()

    if spec["warmup"]:
        run(spec["warmup"], measure=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_start = torch.cuda.memory_allocated(device)
    rss_train_start = rss_mb()
    with PeakRSS() as sampler:
        t0 = time.perf_counter()
        run(spec["steps"], measure=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    marks = stats.pop("step_marks") + [t0 + elapsed]
    step_times = sorted(b - a for a, b in zip(marks, marks[1:]))
    median_step = median(step_times)
    tokens = spec["steps"] * spec["batch"] * max(lengths)
    out = {
        **{k: spec[k] for k in ("model", "option", "impl", "batch", "seq", "steps", "rank")},
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"),
        "seq_tokens": sorted(lengths),
        "load_s": load_s,
        "step_s": elapsed / spec["steps"],
        # the median step (robust to other jobs' bursts on a shared machine); the mean below
        "tokens_per_s": spec["batch"] * max(lengths) / median_step,
        "tokens_per_s_mean": tokens / elapsed,
        "step_times_s": step_times,
        "load_avg_1min": os.getloadavg()[0],
        "rss_start_mb": rss_start,
        "rss_loaded_mb": rss_loaded,
        "rss_train_start_mb": rss_train_start,
        "train_peak_rss_mb": sampler.peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_weight_dtype": str(next(p for n_, p in model.named_parameters() if "layers.0.mlp" in n_).dtype),
        **stats,
    }
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_peak_above_start_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_start) / 2**20
    return out


# ---------------------------------------------------------------- the parent


def run_child(spec: dict, timeout_s: float) -> dict:
    env = child_env()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flexlora.bench.client", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return {**spec, "error": lines[-1][:200] if lines else f"exit code {proc.returncode}"}


def run_benchmark(
    models=("smollm2-135m-instruct", "random-llama-1b"),
    options=DEFAULT_OPTIONS,
    *,
    steps: int = 3,
    warmup: int = 1,
    batch: int = 4,
    seq: int = 128,
    rank: int = 8,
    device: str = "auto",
    reference: str = "all",
    seed: int = 0,
    timeout_s: float = 1800,
    echo=print,
) -> list[dict]:
    """One row per (model, option, impl); `reference`: all | none | a comma-separated list of
    options that also get a bare-PEFT row."""
    for option in options:
        parse_option(option)
    if min(steps, batch, seq, rank) < 1 or warmup < 0:
        raise ValueError("steps, batch, seq and rank must be >= 1 and warmup >= 0")
    ref = set(options) if reference == "all" else set() if reference == "none" else {o.strip() for o in reference.split(",")}
    rows = []
    for model in models:
        for option in options:
            for impl in IMPLS:
                if impl == "peft" and option not in ref:
                    continue
                spec = {
                    "model": model,
                    "option": option,
                    "impl": impl,
                    "steps": steps,
                    "warmup": warmup,
                    "batch": batch,
                    "seq": seq,
                    "rank": rank,
                    "device": device,
                    "seed": seed,
                    **parse_option(option),
                }
                t0 = time.perf_counter()
                row = run_child(spec, timeout_s)
                rows.append(row)
                if "error" in row:
                    echo(f"{model} {option} {impl}: FAILED: {row['error']}")
                else:
                    echo(
                        f"{model} {option} {impl}: {row['tokens_per_s']:.0f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB"
                        + (f", CUDA peak {row['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in row else "")
                        + f" (load avg {row['load_avg_1min']:.1f}; {time.perf_counter() - t0:.0f} s)"
                    )
    return rows


def _find(rows, model, option, impl):
    return next(
        (r for r in rows if r["model"] == model and r["option"] == option and r["impl"] == impl and "error" not in r), None
    )


def _peak(row) -> float:
    return row["cuda_peak_mb"] if "cuda_peak_mb" in row else row["peak_rss_mb"]


def format_table(rows: list[dict]) -> str:
    cuda = any("cuda_peak_mb" in r for r in rows)
    peak_name = "CUDA peak (MB)" if cuda else "peak RSS (MB)"
    lines = [
        f"| model | option | client | tokens/s | {peak_name} | peak / float32's | RSS at train start (MB) | train peak RSS (MB) | ours / bare PEFT tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        impl = "flexlora" if r["impl"] == "ours" else "bare PEFT loop"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['option']} | {impl} | failed: {r['error']} | | | | | |")
            continue
        base = _find(rows, r["model"], "float32", r["impl"])
        ratio = f"{_peak(r) / _peak(base):.2f}" if base else ""
        ref = _find(rows, r["model"], r["option"], "peft")
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if r["impl"] == "ours" and ref else ""
        lines.append(
            f"| {r['model']} | {r['option']} | {impl} | {r['tokens_per_s']:.0f} | {_peak(r):.0f} | {ratio} | "
            f"{r['rss_train_start_mb']:.0f} | {r['train_peak_rss_mb']:.0f} | {speed} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked on the measured rows."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        base, lean = _find(rows, model, "float32", "ours"), _find(rows, model, "bfloat16+ckpt", "ours")
        if base and lean:
            q = _peak(lean) / _peak(base)
            out.append(goal(q <= 0.5, f"{model}: bfloat16+ckpt peak memory <= 0.5 x float32's at the same batch", f"{q:.2f}"))
        for r in rows:
            if r["model"] != model or r["impl"] != "ours" or "error" in r:
                continue
            ref = _find(rows, model, r["option"], "peft")
            if ref:
                q = r["tokens_per_s"] / ref["tokens_per_s"]
                out.append(goal(q >= 0.9, f"{model} {r['option']}: tokens/s within 10% of a bare PEFT loop", f"{q:.2f}"))
    return with_count(out)


def write_json(rows: list[dict], path) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)


# ---------------------------------------------------------------- the command


HELP = (
    "one client's local training per precision option (float32, bfloat16, nf4, +ckpt): peak memory and tokens/s, "
    "each in a fresh process, next to a bare PEFT training loop"
)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--models",
        default="smollm2-135m-instruct,random-llama-1b",
        help="comma-separated model sources (random-llama-1b: TinyLlama-1.1B shapes, random weights)",
    )
    parser.add_argument(
        "--options",
        default="float32,bfloat16,bfloat16+ckpt,nf4,nf4+ckpt",
        help="comma-separated <float32|bfloat16|float16|nf4>[+ckpt]",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on every default target module (default 8)")
    parser.add_argument(
        "--reference", default="all", help="options that also get a bare PEFT row: all (default), none, or a comma-separated list"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process (default 1800)")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def run_command(args) -> None:
    try:
        rows = run_benchmark(
            comma_list(args.models),
            comma_list(args.options),
            steps=args.steps,
            warmup=args.warmup,
            batch=args.batch,
            seq=args.seq,
            rank=args.rank,
            device=args.device,
            reference=args.reference,
            seed=args.seed,
            timeout_s=args.timeout,
        )
    except ValueError as e:
        raise ConfigError(f"bench client: {e}") from None
    report(__name__, rows, args.json)


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    result = worker(json.loads(sys.argv[1]))
    print(json.dumps(result), flush=True)
