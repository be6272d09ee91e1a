"""Experiment trackers (`output.trackers`): TensorBoard, MLflow and Weights & Biases, each fed
the run's config at the start, every round's record as metrics.jsonl gets it (flattened to
named scalars by `round_scalars`) and the summary at the end.

metrics.jsonl stays the record: a tracker that fails mid-run (a full disk, a dead MLflow
server) is reported once and switched off, never failing the federation. A tracker whose
package is missing stops the run before any work (config.validate, and again `Trackers(...)`),
with one line naming the extra to install. Each library is imported only when its tracker starts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flexlora.extras import require
from flexlora.metrics import METRICS

TRACKERS = ("tensorboard", "mlflow", "wandb")


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def _band(label: str) -> str:
    """'[4,16)' -> '4-16', '[16,∞)' -> '16-inf': a name every tracker accepts."""
    return label.strip("[)").replace(",", "-").replace("∞", "inf")


def round_scalars(record: dict) -> dict[str, float]:
    """One metrics.jsonl record as named scalars: the held-out scores (overall and per
    category), per-client ranks, aggregation weights and training losses, rejections and
    failures, the time breakdown, the rank-band energy of the global update, the rank-r
    slice error and, under client-level DP, ε and the clipped clients."""
    out: dict[str, float] = {}
    ev = record.get("eval") or {}
    for name in [*METRICS, "num_examples"]:
        if name in ev:
            out[f"eval/{name}"] = float(ev[name])
    for category, scores in (ev.get("per_category") or {}).items():
        for name in METRICS:
            if name in scores:
                out[f"eval_category/{category}/{name}"] = float(scores[name])
    for cid, client in (record.get("clients") or {}).items():
        for key, field in (("rank", "max_rank"), ("train_loss", "train_loss_last"), ("train_time_s", "train_time_s")):
            if _number(client.get(field)) is not None:
                out[f"clients/{cid}/{key}"] = _number(client[field])
    for cid, weight in (record.get("weights") or {}).items():
        out[f"weights/{cid}"] = float(weight)
    for key in ("valid_updates",):
        if key in record:
            out[key] = float(record[key])
    for key in ("rejected", "failures"):
        if key in record:
            out[key] = float(len(record[key] or ()))
    for key, value in (record.get("time") or {}).items():
        if _number(value) is not None:
            out[f"time/{key}"] = _number(value)
    spectrum = record.get("spectrum") or {}
    for level in ("kinds", "groups"):
        for name, s in (spectrum.get(level) or {}).items():
            out[f"spectrum/{name}/effective_rank_mean"] = float(s["effective_rank_mean"])
            for band, share in zip(s["bands"], s["share"]):
                out[f"spectrum/{name}/share_{_band(band)}"] = float(share)
    for kind, by_rank in (record.get("truncation") or {}).items():
        for rank, values in by_rank.items():
            out[f"truncation/{kind}/r{rank}"] = float(values["err"])
    privacy = record.get("privacy") or {}  # client-level DP: ε so far (None: infinite) and the clipped clients
    for key, value in (("epsilon", privacy.get("epsilon")), ("clipped", len(privacy.get("clipped") or ()))):
        if privacy and _number(value) is not None:
            out[f"privacy/{key}"] = _number(value)
    return out


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The config as dotted keys ("train.lr") -> text: the trackers' params/hyperparameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


def summary_scalars(summary: dict) -> dict[str, float]:
    return {f"summary/{k}": _number(v) for k, v in summary.items() if _number(v) is not None}


class TensorBoardTracker:
    """Event files in <run>/tensorboard: every scalar per round, the config and summary as text."""

    module = "tensorboard"  # its package's import name (a key of flexlora.extras.EXTRAS)

    def start(self, config: dict, run_dir: Path, output) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, summary: dict, step: int) -> None:
        for name, value in summary_scalars(summary).items():
            self.writer.add_scalar(name, value, step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```", step)
        self.close()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """An MLflow run: the config as params, every scalar per round (step = round), the summary's
    numbers as summary/* metrics and summary.json as an artifact. Tracking URI: output.mlflow_uri,
    else MLFLOW_TRACKING_URI, else a SQLite store <output.dir>/mlflow.db with artifacts in
    <output.dir>/mlartifacts (one store per folder of run folders: a study's runs sit together)."""

    module = "mlflow"  # its package's import name (a key of flexlora.extras.EXTRAS)

    def start(self, config: dict, run_dir: Path, output) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = output.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if uri is None:  # MLflow's own default store (SQLite; its file store is deprecated), beside the run folders
            store = Path(output.dir).resolve()
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "mlartifacts").as_uri()
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(output.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(output.experiment, artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        self.run_dir = run_dir
        params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, summary: dict, step: int) -> None:
        self.log(summary_scalars(summary), step)
        if (self.run_dir / "summary.json").is_file():
            self.client.log_artifact(self.run_id, str(self.run_dir / "summary.json"))
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:  # ended without a summary: the run stopped early
        self.client.set_terminated(self.run_id, "KILLED")


class WandbTracker:
    """A W&B run in <run>/wandb, offline unless output.wandb_mode (or WANDB_MODE) says online:
    the config as its config, every scalar per round, the summary's numbers in its summary."""

    module = "wandb"  # its package's import name (a key of flexlora.extras.EXTRAS)

    def start(self, config: dict, run_dir: Path, output) -> None:
        import wandb

        mode = output.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=output.experiment, name=run_dir.name, dir=str(run_dir), mode=mode, config=config, reinit="create_new"
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, summary: dict, step: int) -> None:
        self.run.summary.update(summary_scalars(summary))
        self.run.finish()

    def close(self) -> None:
        self.run.finish(exit_code=1)


CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


class Trackers:
    """The run's trackers behind one interface. Construction checks each tracker's package
    (MissingDependency, one line, before any work); start/log/finish/close never raise: a
    tracker that fails is reported once (`echo`) and switched off."""

    def __init__(self, output, echo=print):
        for name in output.trackers:
            require(CLASSES[name].module, f"output.trackers={name}")
        self.output, self.echo = output, echo
        self.active = {name: CLASSES[name]() for name in dict.fromkeys(output.trackers)}
        self.step = 0

    def _each(self, action: str, call) -> None:
        for name, tracker in list(self.active.items()):
            try:
                call(tracker)
            except Exception as e:  # a tracker never fails the run: metrics.jsonl is the record
                del self.active[name]
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                self.echo(f"flexlora: warning: tracker {name} failed ({action}): {reason}; it is off for the rest of this run")

    def start(self, config: dict, run_dir: Path) -> Trackers:
        self._each("start", lambda t: t.start(config, run_dir, self.output))
        return self

    def log(self, record: dict) -> None:
        if self.active:
            self.step, scalars = record["round"], round_scalars(record)
            self._each(f"round {record['round']}", lambda t: t.log(scalars, self.step))

    def finish(self, summary: dict) -> None:
        self._each("finish", lambda t: t.finish(summary, self.step))
        self.active = {}

    def close(self) -> None:
        """End whatever finish() did not (the run stopped early)."""
        self._each("close", lambda t: t.close())
        self.active = {}
