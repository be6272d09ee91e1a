"""One experiment end to end: model, data, server, rounds, outputs; the engine (in-process or
Flower) only supplies the runtime that trains the clients."""

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
from flexlora.checkpoint import Checkpointer, open_checkpoint
from flexlora.config import ConfigError, ExperimentConfig
from flexlora.data.sources import load_federated_dataset
from flexlora.evaluation import evaluate
from flexlora.evaluation.adapters import check_adapter, keep_rank_line, read_adapter
from flexlora.metrics import EVAL_LOSS, METRIC, METRICS, TEACHER_FORCED
from flexlora.models import default_device, default_target_modules, load_model
from flexlora.reporting import WriteError, append_line, plot_metric, plot_spectrum, write_json, write_jsonl
from flexlora.resources import client_record
from flexlora.resources import profile_label as resource_profile_label
from flexlora.runlock import LOCK_NAME, RunLock
from flexlora.server import FederatedServer, run_rounds
from flexlora.spectrum import spectrum_line
from flexlora.trackers import Trackers


def load_base(cfg: ExperimentConfig, device: torch.device, source: str | None = None):
    """(model, tokenizer) of the run's base model with its memory options (model_dtype,
    quantization, train.gradient_checkpointing); `source` overrides cfg.model."""
    return load_model(
        source or cfg.model,
        device,
        seed=cfg.seed,
        dtype=cfg.model_dtype,
        quantization=cfg.quantization,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but no CUDA GPU is available")
    return torch.device(name)


def profile_label(cfg: ExperimentConfig) -> str:
    return resource_profile_label(cfg.resources.profile)


def _has_content(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """A new run's folder, not yet created: refused at once if it is taken (in use by another
    process, or holding a run without --overwrite), before the model loads or anything is written."""
    name = cfg.output.name or f"{cfg.method}-{profile_label(cfg)}-seed{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output.dir) / name
    RunLock(run_dir).check_free()  # in use by another process: say by whom, whatever the options
    if _has_content(run_dir) and not cfg.output.overwrite:
        raise _exists(run_dir)
    return run_dir


def _exists(run_dir: Path) -> ConfigError:
    return ConfigError(
        f"run folder {run_dir} already exists; pass --overwrite to replace it or --resume {run_dir} to continue it"
    )


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path) -> RunLock:
    """The run folder (from `new_run_dir`), empty, and its lock (held): a folder another process
    is using is refused whatever the options, before anything in it is written or removed."""
    lock = RunLock(run_dir).acquire()
    try:
        if _has_content(run_dir):
            if not cfg.output.overwrite:  # appeared since new_run_dir's check
                raise _exists(run_dir)
            for entry in run_dir.iterdir():  # everything but the lock file we hold
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def check_template(cfg: ExperimentConfig, tokenizer) -> None:
    """Before any training: a chat template the tokenizer lacks would fail every client."""
    if cfg.data.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.template: model {cfg.model} has no chat template; use data.template=alpaca")


def truncation_line(truncation: dict | None) -> str | None:
    """'k_proj r8 0.41, r200 0.00; ...': the mean approximation error ratio per client rank."""
    if not truncation:
        return None
    parts = []
    for kind, by_rank in truncation.items():
        parts.append(f"{kind} " + ", ".join(f"r{r} {v['err']:.2f}" for r, v in by_rank.items()))
    return "rank-r slice error ‖ΔW−Ŵ_r‖/‖ΔW‖: " + "; ".join(parts)


class Experiment:
    """One experiment's wiring, shared by every engine: model, data, server, evaluation of the
    global adapter on the held-out clients, the per-round log and the run folder. An engine only
    supplies the runtime that trains the sampled clients (and, in a Flower deployment, the list
    of clients, which are the connected nodes)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        echo=print,
        engine: str = "local",
        resume: str | Path | None = None,
        zero_shot: dict | None = None,
    ):
        """`resume`: continue the run in that folder from its last checkpoint. `zero_shot`: the
        base model's held-out metrics if already known (a comparison grid evaluates the base
        model once per seed)."""
        self.cfg = cfg
        self.echo = echo
        self.engine = engine
        self.zero_shot = zero_shot
        self.device = resolve_device(cfg.device)
        self.dataset = load_federated_dataset(cfg.data, cfg.seed)  # bad data fails before any run folder exists
        if not self.dataset.heldout:
            raise ConfigError(
                f"data: no held-out clients to evaluate on; choose them with data.heldout_ids, "
                f"data.heldout_fraction or data.heldout_categories (source {cfg.data.source})"
            )
        # One writer per run folder: the lock is held until close() (or this process ends). A
        # taken folder is refused before the model loads; a model, template or target modules that
        # cannot be used are refused before a new folder is created or an old one cleared.
        if resume is None:
            self.run_dir, self.lock, self.ckpt = new_run_dir(cfg), None, None
        else:
            self.run_dir = Path(resume)
            self.lock = RunLock(self.run_dir).acquire(create=False)
        try:
            if resume is not None:  # the checkpoint is None when the run was killed before its first
                self.ckpt = open_checkpoint(self.run_dir, cfg, warn=lambda m: echo(f"flexlora: warning: {m}"))
            self.started = time.perf_counter()
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            self.model, self.tokenizer = load_base(cfg, self.device)
            check_template(cfg, self.tokenizer)
            self.target_modules = cfg.lora.target_modules or default_target_modules(self.model)
            self.shapes = lora.module_shapes(self.model, self.target_modules)
            if resume is None:
                self.lock = prepare_run_dir(cfg, self.run_dir)
            self._start()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def close(self) -> None:
        """End the trackers finish() did not; release the run folder (its lock). The Experiment writes nothing more."""
        self.trackers.close()
        self.lock.release()

    def _start(self) -> None:
        cfg, echo = self.cfg, self.echo
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        dataset = self.dataset
        write_json(
            self.run_dir / "data.json",
            {
                "source": cfg.data.source,
                "path": cfg.data.path,
                "training_clients": len(dataset.clients),
                "heldout_clients": {c.client_id: c.category for c in dataset.heldout},
                "heldout_examples": sum(len(c.test[: cfg.eval.max_examples_per_client]) for c in dataset.heldout),
                "issues": dataset.issues,
            },
        )
        if dataset.issues:
            echo(f"data: {len(dataset.issues)} issue(s) while loading (see data.json), first: {dataset.issues[0]}")
        self.server: FederatedServer | None = None
        self.history: list[dict] = []
        self.trackers = Trackers(cfg.output, echo).start(cfg.to_dict(), self.run_dir)  # packages checked by config.validate

    def make_server(self, client_ids: list[str], declared_types=None, declared_sizes=None) -> FederatedServer:
        """`declared_sizes`: client id -> the most examples its replies may claim; default: the
        training-set size (data weight) of each client the server's own dataset holds."""
        cfg = self.cfg
        if declared_sizes is None:
            declared_sizes = {c.client_id: c.num_examples for c in self.dataset.clients}
        self.server = server = FederatedServer(cfg, client_ids, self.shapes, declared_types, declared_sizes)
        leaked = set(server.client_ids) & {c.client_id for c in self.dataset.heldout}
        if leaked:  # FederatedDataset refuses this already; a held-out client must never train
            raise RuntimeError(f"held-out clients in the training pool: {sorted(leaked)[:5]}")
        self.history = [] if self.ckpt is None else self.ckpt.restore(server)
        if self.ckpt is not None:
            self.echo(f"flexlora: resuming {self.run_dir} after round {self.ckpt.round} of {cfg.federation.rounds}")
        # metrics.jsonl always equals the checkpointed history: a round logged after the last
        # checkpoint (the process died before the next one) is run again, not logged twice.
        write_jsonl(self.run_dir / "metrics.jsonl", self.history)
        write_json(
            self.run_dir / "clients.json",
            {
                cid: client_record(
                    server.rank_types.get(server.client_types[cid]), server.client_types[cid], server.client_ranks[cid]
                )
                for cid in server.client_ids
            },
        )
        engine = "" if self.engine == "local" else f" through {self.engine}"
        self.echo(
            f"flexlora: {cfg.method} on {cfg.model} ({self.device}){engine}, {len(client_ids)} training clients "
            f"({profile_label(cfg)} ranks), {len(self.dataset.heldout)} held-out clients, {cfg.federation.rounds} rounds"
        )
        return server

    def evaluate(self, state, round_: int) -> dict:
        """Centralised evaluation of the global model (None: the base model) on held-out
        clients: its adapter at the export rank (what finish() saves), on the base weights plus
        the method's base offset if any."""
        cfg = self.cfg
        if state is None and self.zero_shot is not None:
            return self.zero_shot
        factors, ranks = (None, None) if state is None else self.server.global_adapter(self.server.max_rank())
        offset = None if state is None else self.server.base_offset()
        with lora.base_weights(self.model, offset):  # FLoRA, SLoRA's sparse stage: base + offset
            return evaluate(
                self.model,
                self.tokenizer,
                self.dataset.heldout,
                factors=factors,
                ranks=ranks,
                alpha=cfg.lora.alpha,
                target_modules=self.target_modules,
                template=cfg.data.template,
                cutoff_len=cfg.data.cutoff_len,
                max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                max_examples_per_client=cfg.eval.max_examples_per_client,
                desc=f"eval round {round_}",
                kv_cache=cfg.eval.kv_cache,
                decode_batch_size=cfg.eval.decode_batch_size,
            )

    def log(self, record: dict) -> None:
        cfg, echo = self.cfg, self.echo
        path = self.run_dir / "metrics.jsonl"
        try:
            append_line(path, json.dumps(record), record["round"])
        except OSError as e:
            committed = (
                f"the checkpoint of round {record['round']} committed"
                if cfg.output.checkpoint
                else "no checkpoint (output.checkpoint is off, so a resume starts over)"
            )
            raise WriteError(
                f"round {record['round']}: appending its line to {path} failed: {e.strerror or e} (errno {e.errno}); "
                f"the run stopped with {committed} and metrics.jsonl intact up to the round before; "
                f"free space or fix the folder, then continue with: flexlora run --resume {self.run_dir}"
            ) from None
        self.trackers.log(record)  # after metrics.jsonl has the line; a failing tracker only warns
        ev = record["eval"]
        t = record.get("time") or {}
        if "server_s" in t:
            echo(
                f"round {record['round']}: time {t['total_s']:.1f} s: clients {t['client_training_s']:.1f} s, "
                f"server {t['server_s']:.1f} s ({100 * t['server_share']:.1f}%: tasks {t.get('configure_s', 0.0):.1f}, validation {t['validation_s']:.1f}, "
                f"aggregation {t['aggregation_s']:.1f}, checkpoint {t['checkpoint_s']:.1f}), evaluation {t['evaluation_s']:.1f} s"
            )
        for line in (truncation_line(record.get("truncation")), spectrum_line(record.get("spectrum"))):
            if line:
                echo(f"round {record['round']}: {line}")
        if ev is None:
            echo(f"round {record['round']}: trained {len(record['clients'])} clients in {record['time']['total_s']:.0f} s")
            return
        label = "zero-shot" if record["round"] == 0 else f"round {record['round']}/{cfg.federation.rounds}"
        echo(
            f"{label}: held-out {METRIC} {ev[METRIC]:.4f} ({TEACHER_FORCED.label} {ev[TEACHER_FORCED.name]:.4f}), "
            f"{EVAL_LOSS.label} {ev[EVAL_LOSS.name]:.3f}" + (f", {record['time']['total_s']:.0f} s" if record["round"] else "")
        )

    def run(self, runtime) -> None:
        if self.ckpt is not None:
            self.ckpt.restore_rng()  # where the interrupted run stood, right before its next round
        checkpoint = Checkpointer(self.run_dir, self.cfg) if self.cfg.output.checkpoint else None
        self.history = run_rounds(self.server, runtime, self.evaluate, self.log, checkpoint, self.history)

    def finish(self) -> Path:
        """Export the global model (a PEFT adapter; merged full weights for a method whose global model changes the
        base weights), write summary.json and the plot; returns the run folder. A failed write is a one-line
        WriteError: every round is checkpointed, and resuming the finished run exports again."""
        try:
            return self._finish()
        except OSError as e:
            raise WriteError(
                f"exporting the results to {self.run_dir} failed: {e.strerror or e} (errno {e.errno}); every round is "
                f"checkpointed: free space or fix the folder, then export again with: flexlora run --resume {self.run_dir}"
            ) from None

    def _finish(self) -> Path:
        cfg, server, run_dir = self.cfg, self.server, self.run_dir
        adapter_dir = merged_dir = None
        if server.state is not None:
            factors, ranks = server.global_adapter(server.max_rank())  # the adapter every round was evaluated with
            offset = server.base_offset()
            if offset:  # a LoRA adapter cannot hold a dense change of the base: export merged weights
                merged_dir = lora.save_merged(
                    self.model, self.tokenizer, run_dir / "merged", offset, factors, ranks, cfg.lora.alpha
                )
            elif factors:
                adapter_dir = lora.save_adapter(
                    self.model, factors, ranks, cfg.lora.alpha, self.target_modules, run_dir / "adapter"
                )
        evaluated = [r for r in self.history if r["eval"] is not None]
        summary = {
            "metric": METRIC,
            "metric_description": METRICS[METRIC].description,
            "method": cfg.method,
            "engine": self.engine,
            "profile": profile_label(cfg),
            "model": cfg.model,
            "seed": cfg.seed,
            "evaluated": f"the exported global model (adapter at rank {server.max_rank()})",
            "zero_shot": evaluated[0]["eval"][METRIC],
            "final": evaluated[-1]["eval"][METRIC],
            "best": max(r["eval"][METRIC] for r in evaluated),
            **{
                key: value
                for m in METRICS.values()
                if m.name != METRIC
                for key, value in (
                    (f"zero_shot{m.summary_suffix}", evaluated[0]["eval"][m.name]),
                    (f"final{m.summary_suffix}", evaluated[-1]["eval"][m.name]),
                )
            },
            "per_round": {r["round"]: r["eval"][METRIC] for r in evaluated},
            "final_per_category": evaluated[-1]["eval"].get("per_category"),
            "truncation": {r["round"]: r["truncation"] for r in self.history if r.get("truncation")},
            "privacy": server.privacy_record(server.round),  # (ε, δ) after every round run; None: privacy off
            "adapter": str(adapter_dir) if adapter_dir else None,
            "merged_model": str(merged_dir) if merged_dir else None,
            "wall_time_s": time.perf_counter() - self.started,
        }
        write_json(run_dir / "summary.json", summary)
        self.trackers.finish(summary)
        plot_metric(
            {f"{cfg.method}, {profile_label(cfg)} ranks": [(r["round"], r["eval"][METRIC]) for r in evaluated]},
            run_dir / "metric.png",
            title=f"{cfg.method}, {profile_label(cfg)} ranks: held-out clients",
        )
        # The global ΔW's energy per rank band and effective rank over rounds (eval.spectrum).
        plot_spectrum(
            self.history,
            run_dir / "rank_energy.png",
            title=f"{cfg.method}, {profile_label(cfg)} ranks: spectrum of the global ΔW",
        )
        self.echo(
            f"held-out {METRIC}: zero-shot {summary['zero_shot']:.4f} -> final {summary['final']:.4f} "
            f"({summary['wall_time_s']:.0f} s)"
        )
        self.echo(f"run folder: {run_dir}")
        return run_dir


EVAL_CLIENTS = ("heldout", "training", "all")


def run_evaluation(
    cfg: ExperimentConfig,
    adapter: str | Path | None,
    clients: str = "heldout",
    echo=print,
    keep: int | None = None,
) -> dict:
    """Evaluate a saved PEFT adapter (or, with adapter=None, the base model) on the test sets
    of a data source's held-out clients, training clients, or all of them. `keep`: evaluate the
    adapter with every component beyond that rank cut (evaluation.keep_rank; the saved adapter
    is only read)."""
    check_adapter(keep, adapter)
    if clients not in EVAL_CLIENTS:
        raise ConfigError(f"--clients: must be one of {', '.join(EVAL_CLIENTS)}, got '{clients}'")
    device = resolve_device(cfg.device)
    dataset = load_federated_dataset(cfg.data, cfg.seed, for_training=False)  # evaluating needs no training clients
    chosen = {"heldout": dataset.heldout, "training": dataset.clients, "all": dataset.heldout + dataset.clients}[clients]
    if not any(c.test for c in chosen):
        hint = " (choose held-out clients with data.heldout_*)" if clients == "heldout" else ""
        raise ConfigError(f"data: the {clients} clients of {cfg.data.source} have no test examples{hint}")
    model, tokenizer = load_base(cfg, device)
    check_template(cfg, tokenizer)
    target_modules = cfg.lora.target_modules or default_target_modules(model)
    factors = ranks = None
    alpha = cfg.lora.alpha
    if adapter is not None:
        saved = read_adapter(model, adapter, keep)
        factors, ranks, alpha, target_modules = saved.applied()
        if keep is not None:
            echo(keep_rank_line(adapter, saved))
    metrics = evaluate(
        model,
        tokenizer,
        chosen,
        factors=factors,
        ranks=ranks,
        alpha=alpha,
        target_modules=target_modules,
        template=cfg.data.template,
        cutoff_len=cfg.data.cutoff_len,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        max_examples_per_client=cfg.eval.max_examples_per_client,
        desc="eval",
        kv_cache=cfg.eval.kv_cache,
        decode_batch_size=cfg.eval.decode_batch_size,
    )
    metrics["adapter"] = str(adapter) if adapter is not None else None
    if keep is not None:
        metrics["keep_rank"] = keep
        metrics["ranks_evaluated"] = {str(r): list(ranks.values()).count(r) for r in sorted(set(ranks.values()))}
    metrics["clients"] = clients
    what = f"adapter {adapter}" if adapter is not None else f"base model {cfg.model}"
    echo(
        f"{what} on {len([c for c in chosen if c.test])} {clients} clients of {cfg.data.source} "
        f"({metrics['num_examples']} examples): {METRIC} {metrics[METRIC]:.4f}, "
        f"{TEACHER_FORCED.name} {metrics[TEACHER_FORCED.name]:.4f}, {EVAL_LOSS.label} {metrics[EVAL_LOSS.name]:.3f}"
    )
    for category, m in metrics["per_category"].items():
        echo(
            f"  {category or '(none)'}: n={m['n']} {METRIC} {m[METRIC]:.4f}, {TEACHER_FORCED.label} {m[TEACHER_FORCED.name]:.4f}, "
            f"loss {m[EVAL_LOSS.name]:.3f}"
        )
    return metrics
