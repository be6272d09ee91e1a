"""`flexlora bench eval`: examples per second of evaluation, the two-prefill path
(eval.kv_cache=false) against the cached path (eval.kv_cache=true), on the same model, clients
and examples in one process, with how far their results agree."""

from __future__ import annotations

import time
from pathlib import Path

from flexlora.bench.common import sync
from flexlora.config import ConfigError, ExperimentConfig, load_config
from flexlora.data.sources import load_federated_dataset
from flexlora.reporting import write_json


def _timed(model, tokenizer, work, cfg: ExperimentConfig, kv_cache: bool):
    from flexlora.evaluation import score_examples

    device = next(model.parameters()).device
    sync(device)
    started = time.perf_counter()
    scored = score_examples(
        model,
        tokenizer,
        work,
        cfg.data.template,
        cfg.data.cutoff_len,
        cfg.eval.max_new_tokens,
        cfg.eval.batch_size,
        kv_cache=kv_cache,
        desc=f"kv_cache={kv_cache}",
        decode_batch_size=cfg.eval.decode_batch_size,
    )
    sync(device)
    return scored, time.perf_counter() - started


def run_eval_benchmark(cfg: ExperimentConfig, num_clients: int, repeat: int = 1, echo=print, adapter: str | None = None) -> dict:
    """Times both paths on the same examples, alternating, `repeat` times each; reports the
    fastest of each (the machine's other load only ever adds time). `adapter`: a PEFT adapter
    folder merged into the model first (a trained model: its greedy answers often match the
    references, which the cached path takes as a free draft)."""
    # The model code is imported here, not at module level: the command line stays light.
    from flexlora.evaluation import rouge_l
    from flexlora.experiment import check_template, resolve_device
    from flexlora.models import load_model

    dataset = load_federated_dataset(cfg.data, cfg.seed)
    chosen = [c for c in dataset.heldout + dataset.clients if c.test][:num_clients]
    if not chosen:
        raise ConfigError("bench eval: the data source has no client with test examples")
    work = [(c, ex) for c in chosen for ex in c.test[: cfg.eval.max_examples_per_client]]
    model, tokenizer = load_model(cfg.model, resolve_device(cfg.device), seed=cfg.seed)
    check_template(cfg, tokenizer)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    _timed(model, tokenizer, work[:2], cfg, False)  # warm-up, both paths
    _timed(model, tokenizer, work[:2], cfg, True)
    old_times, new_times = [], []
    for _ in range(max(repeat, 1)):
        old, t = _timed(model, tokenizer, work, cfg, False)
        old_times.append(t)
        new, t = _timed(model, tokenizer, work, cfg, True)
        new_times.append(t)
    old_s, new_s = min(old_times), min(new_times)
    n = len(work)
    rel = [abs(a[0] - b[0]) / max(abs(a[0]), 1e-6) for a, b in zip(old, new)]
    result = {
        "model": cfg.model,
        "adapter": adapter,
        "device": str(next(model.parameters()).device),
        "clients": len(chosen),
        "examples": n,
        "batch_size": cfg.eval.batch_size,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "cutoff_len": cfg.data.cutoff_len,
        "decode_batch_size": cfg.eval.decode_batch_size or 4 * cfg.eval.batch_size,
        "uncached_times_s": old_times,
        "cached_times_s": new_times,
        "uncached_s": old_s,
        "cached_s": new_s,
        "uncached_examples_per_s": n / old_s,
        "cached_examples_per_s": n / new_s,
        "speedup": old_s / new_s,
        "identical_generations": sum(a[3] == b[3] for a, b in zip(old, new)),
        "identical_teacher_forced": sum(a[2] == b[2] for a, b in zip(old, new)),
        "same_answer_tokens": sum(a[1] == b[1] for a, b in zip(old, new)),
        "max_rel_loss_diff": max(rel),
        "rougeL_generated": {
            "uncached": sum(rouge_l(a[3], ex.output) for a, (_, ex) in zip(old, work)) / n,
            "cached": sum(rouge_l(b[3], ex.output) for b, (_, ex) in zip(new, work)) / n,
        },
    }
    echo(
        f"{n} examples of {len(chosen)} clients, {cfg.model} on {result['device']}, batch {cfg.eval.batch_size} "
        f"(cached decoding: {result['decode_batch_size']} rows), best of {len(old_times)}, "
        f"max_new_tokens {cfg.eval.max_new_tokens}, cutoff_len {cfg.data.cutoff_len}"
    )
    echo(f"  eval.kv_cache=false (two prefills): {old_s:7.1f} s  {n / old_s:6.3f} examples/s")
    echo(f"  eval.kv_cache=true  (cached):       {new_s:7.1f} s  {n / new_s:6.3f} examples/s  ({old_s / new_s:.2f}x)")
    echo(
        f"  agreement: generations {result['identical_generations']}/{n} identical, teacher-forced answers "
        f"{result['identical_teacher_forced']}/{n}, answer tokens {result['same_answer_tokens']}/{n}, "
        f"max relative loss difference {result['max_rel_loss_diff']:.1e}; rougeL_generated "
        f"{result['rougeL_generated']['uncached']:.4f} vs {result['rougeL_generated']['cached']:.4f}"
    )
    return result


# ---------------------------------------------------------------- the command


HELP = "evaluation examples/s: the two-prefill path (eval.kv_cache=false) vs the cached path, same examples, one process"


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (model, data.*, eval.*)")
    parser.add_argument("--clients", type=int, default=8, help="clients to evaluate: held-out ones first (default 8)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each path N times, alternating; report the fastest (default 1)"
    )
    parser.add_argument("--adapter", help="a PEFT adapter folder to merge first (e.g. runs/.../adapter): a trained model")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.max_examples_per_client=4")


def run_command(args) -> None:
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {args.adapter} is not a PEFT adapter folder (no adapter_config.json)")
    result = run_eval_benchmark(load_config(args.config, args.overrides), args.clients, args.repeat, adapter=args.adapter)
    if args.json:
        write_json(Path(args.json), result)
        print(f"results: {args.json}")
