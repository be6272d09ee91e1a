"""One experiment end to end on the in-process runtime: model, data, server, rounds, outputs."""

from __future__ import annotations

import json
import random
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

from flexlora import lora
from flexlora.config import ConfigError, ExperimentConfig
from flexlora.data.sources import load_federated_dataset
from flexlora.evaluation import METRIC, evaluate
from flexlora.models import default_device, default_target_modules, load_model
from flexlora.reporting import plot_metric, write_json
from flexlora.runtime.local import LocalRuntime
from flexlora.server import FederatedServer, run_rounds


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but no CUDA GPU is available")
    return torch.device(name)


def profile_label(cfg: ExperimentConfig) -> str:
    p = cfg.resources.profile
    return p if isinstance(p, str) else "explicit"


def prepare_run_dir(cfg: ExperimentConfig) -> Path:
    name = cfg.output.name or f"{cfg.method}-{profile_label(cfg)}-seed{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output.dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.output.overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass output.overwrite=true to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_experiment(cfg: ExperimentConfig, echo=print) -> Path:
    """Run the configured experiment; returns the run folder."""
    device = resolve_device(cfg.device)
    dataset = load_federated_dataset(cfg.data, cfg.seed)  # bad data fails before any run folder exists
    run_dir = prepare_run_dir(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_model(cfg.model, device, seed=cfg.seed)
    target_modules = cfg.lora.target_modules or default_target_modules(model)
    shapes = lora.module_shapes(model, target_modules)
    server = FederatedServer(cfg, [c.client_id for c in dataset.clients], shapes)
    write_json(
        run_dir / "clients.json",
        {
            cid: {"rank_type": server.client_types[cid], "max_rank": max(server.client_ranks[cid].values())}
            for cid in server.client_ids
        },
    )
    runtime = LocalRuntime(model, tokenizer, dataset.clients, cfg, target_modules)
    echo(
        f"flexlora: {cfg.method} on {cfg.model} ({device}), {len(dataset.clients)} training clients "
        f"({profile_label(cfg)} ranks), {len(dataset.heldout)} held-out clients, {cfg.federation.rounds} rounds"
    )

    def evaluate_global(state, round_):
        factors, ranks = (None, None) if state is None else server.global_adapter()
        offset = None if state is None else server.base_offset()
        with lora.base_weights(model, offset):  # FLoRA, SLoRA's sparse stage: base + offset
            return evaluate(
                model, tokenizer, dataset.heldout,
                factors=factors, ranks=ranks, alpha=cfg.lora.alpha, target_modules=target_modules,
                template=cfg.data.template, cutoff_len=cfg.data.cutoff_len,
                max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                max_examples_per_client=cfg.eval.max_examples_per_client, desc=f"eval round {round_}",
            )

    history = []

    def log(record):
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        ev = record["eval"]
        if ev is None:
            echo(f"round {record['round']}: trained {len(record['clients'])} clients in {record['time']['total_s']:.0f} s")
            return
        label = "zero-shot" if record["round"] == 0 else f"round {record['round']}/{cfg.federation.rounds}"
        echo(
            f"{label}: held-out {METRIC} {ev[METRIC]:.4f} (teacher-forced {ev['rougeL_teacher_forced']:.4f}), "
            f"eval loss {ev['eval_loss']:.3f}" + (f", {record['time']['total_s']:.0f} s" if record["round"] else "")
        )

    run_rounds(server, runtime, evaluate_global, log)

    adapter_dir = merged_dir = None
    if server.state is not None:
        # Default export rank: what the largest client receives (the full-rank ΔW can be as
        # large as the base model itself).
        export_rank = cfg.eval.export_rank or max(max(r.values()) for r in server.client_ranks.values())
        factors, ranks = server.global_adapter(export_rank)
        offset = server.base_offset()
        if offset:  # a LoRA adapter cannot hold a dense change of the base: export merged weights
            merged_dir = lora.save_merged(model, tokenizer, run_dir / "merged", offset, factors, ranks, cfg.lora.alpha)
        elif factors:
            adapter_dir = lora.save_adapter(model, factors, ranks, cfg.lora.alpha, target_modules, run_dir / "adapter")
    evaluated = [r for r in history if r["eval"] is not None]
    summary = {
        "metric": METRIC,
        "metric_description": "Rouge-L F1 of greedy generations on held-out (unseen-task) clients, weighted by test-set size",
        "method": cfg.method,
        "profile": profile_label(cfg),
        "model": cfg.model,
        "seed": cfg.seed,
        "zero_shot": evaluated[0]["eval"][METRIC],
        "final": evaluated[-1]["eval"][METRIC],
        "best": max(r["eval"][METRIC] for r in evaluated),
        "zero_shot_teacher_forced": evaluated[0]["eval"]["rougeL_teacher_forced"],
        "final_teacher_forced": evaluated[-1]["eval"]["rougeL_teacher_forced"],
        "zero_shot_eval_loss": evaluated[0]["eval"]["eval_loss"],
        "final_eval_loss": evaluated[-1]["eval"]["eval_loss"],
        "per_round": {r["round"]: r["eval"][METRIC] for r in evaluated},
        "adapter": str(adapter_dir) if adapter_dir else None,
        "merged_model": str(merged_dir) if merged_dir else None,
        "wall_time_s": time.perf_counter() - started,
    }
    write_json(run_dir / "summary.json", summary)
    plot_metric(
        {cfg.method: [(r["round"], r["eval"][METRIC]) for r in evaluated]},
        run_dir / "metric.png",
        title=f"{cfg.method}, {profile_label(cfg)} ranks: held-out clients",
    )
    echo(
        f"held-out {METRIC}: zero-shot {summary['zero_shot']:.4f} -> final {summary['final']:.4f} "
        f"({summary['wall_time_s']:.0f} s)"
    )
    echo(f"run folder: {run_dir}")
    return run_dir
