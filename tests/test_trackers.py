"""output.trackers: TensorBoard, MLflow and W&B get what metrics.jsonl gets (read back with each
library's own reader), the config and the summary; a missing package stops the run before any
work; a tracker failing mid-run is reported once and the run finishes with metrics.jsonl whole."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from flexlora import trackers as trackers_module
from flexlora.cli import main
from flexlora.config import load_config
from flexlora.extras import MissingDependency
from flexlora.trackers import flat_params, round_scalars

INSTALLED = [name for name in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(name)]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_round_record_becomes_named_scalars():
    record = {
        "round": 3,
        "clients": {"c1": {"max_rank": 8, "train_loss_last": 1.5, "train_time_s": 2.0, "rank_type": "T2"}},
        "weights": {"c1": 0.25, "c2": 0.75},
        "valid_updates": 2,
        "rejected": {"c3": "non-finite"},
        "failures": {"c4": "timeout", "c5": "dropout"},
        "eval": {"rougeL_generated": 0.4, "rougeL_teacher_forced": 0.5, "eval_loss": 2.0, "num_examples": 7,
                 "per_category": {"plural": {"n": 2, "rougeL_generated": 0.1, "eval_loss": 3.0}}},
        "time": {"total_s": 9.0, "server_share": 0.1},
        "spectrum": {"kinds": {"q_proj": {"bands": ["[0,4)", "[4,∞)"], "share": [0.9, 0.1], "effective_rank_mean": 2.5}}},
        "truncation": {"q_proj": {"4": {"err": 0.3}}},
    }  # fmt: skip
    assert round_scalars(record) == {
        "eval/rougeL_generated": 0.4,
        "eval/rougeL_teacher_forced": 0.5,
        "eval/eval_loss": 2.0,
        "eval/num_examples": 7.0,
        "eval_category/plural/rougeL_generated": 0.1,
        "eval_category/plural/eval_loss": 3.0,
        "clients/c1/rank": 8.0,
        "clients/c1/train_loss": 1.5,
        "clients/c1/train_time_s": 2.0,
        "weights/c1": 0.25,
        "weights/c2": 0.75,
        "valid_updates": 2.0,
        "rejected": 1.0,
        "failures": 2.0,
        "time/total_s": 9.0,
        "time/server_share": 0.1,
        "spectrum/q_proj/effective_rank_mean": 2.5,
        "spectrum/q_proj/share_0-4": 0.9,
        "spectrum/q_proj/share_4-inf": 0.1,
        "truncation/q_proj/r4": 0.3,
    }
    assert flat_params({"train": {"lr": 0.001, "steps": None}, "method": "flexlora", "method_args": {}}) == {
        "train.lr": "0.001",
        "train.steps": "null",
        "method": "flexlora",
        "method_args": "{}",
    }


def test_an_unknown_tracker_and_a_missing_package_are_one_line_each(monkeypatch, tmp_path, tiny_overrides, capsys):
    with pytest.raises(Exception, match=r"output.trackers\[0\]: must be tensorboard, mlflow or wandb, got 'comet'"):
        load_config(None, ["output.trackers=[comet]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(
        MissingDependency, match=r"^output.trackers=wandb needs the package wandb: pip install 'flexlora\[wandb\]'$"
    ):
        load_config(None, ["output.trackers=[wandb]"])
    assert main(["run", *tiny_overrides, "output.trackers=[wandb]"]) == 2  # before any work: no run folder
    assert "pip install 'flexlora[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One tiny run with every installed tracker (W&B offline, in the run folder)."""
    if not INSTALLED:
        pytest.skip("no tracker installed: pip install 'flexlora[tensorboard,mlflow,wandb]'")
    from conftest import tiny_run

    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_SILENT", "true")
        assert main(["run", *tiny_run(tmp), f"output.trackers=[{','.join(INSTALLED)}]"]) == 0
    run_dir = tmp / "runs" / "test"
    return run_dir, _records(run_dir), json.loads((run_dir / "summary.json").read_text())


def _needs(name):
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed: pip install 'flexlora[{name}]'")


def test_tensorboard_event_files_hold_each_rounds_scores(tracked_run):
    _needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, records, summary = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for name in ("eval/rougeL_generated", "eval/eval_loss", "time/total_s", "weights/" + next(iter(records[1]["weights"]))):
        logged = {e.step: e.value for e in events.Scalars(name)}
        expected = {r["round"]: v for r in records if (v := round_scalars(r).get(name)) is not None}
        assert logged == pytest.approx(expected, rel=1e-6), name  # TensorBoard keeps float32
    assert [e.step for e in events.Scalars("eval/eval_loss")] == [0, 1, 2]
    assert events.Scalars("summary/final_eval_loss")[0].value == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"method": "flexlora"' in config_text


def test_mlflow_run_holds_the_config_and_each_rounds_metrics(tracked_run):
    _needs("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, records, summary = tracked_run
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")  # the default store, beside the run folders
    (run,) = client.search_runs([client.get_experiment_by_name("flexlora").experiment_id])
    assert run.info.run_name == "test" and run.info.status == "FINISHED"
    config = load_config(run_dir / "config.yaml").to_dict()
    assert run.data.params == flat_params(config)
    for name in ("eval/rougeL_generated", "eval/eval_loss", "valid_updates", "time/total_s"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert logged == {r["round"]: v for r in records if (v := round_scalars(r).get(name)) is not None}, name
    assert run.data.metrics["summary/final"] == summary["final"]
    assert "summary.json" in [f.path for f in client.list_artifacts(run.info.run_id)]


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte header (":W&B", magic,
    version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type:
    1 full, 2 first, 3 middle, 4 last), a block's tail under 7 bytes being padding."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_config_and_each_rounds_metrics(tracked_run):
    _needs("wandb")
    run_dir, records, summary = tracked_run
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, final = {}, {}, {}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = items
        elif kind in ("run", "config"):  # the config passed to wandb.init is in the run record
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "summary":
            final.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    assert sorted(history) == [r["round"] for r in records]
    for r in records:
        scalars = round_scalars(r)
        assert {k: history[r["round"]][k] for k in scalars} == scalars
    assert {k: config[k] for k in ("train", "lora", "method")} == {
        k: v for k, v in load_config(run_dir / "config.yaml").to_dict().items() if k in ("train", "lora", "method")
    }
    assert final["summary/final"] == summary["final"]


class _Recorder:
    """A stand-in tracker that records what it gets; `fail_at` makes log() fail at that round."""

    calls: list = []
    fail_at: int | None = None
    module = "tensorboard"

    def start(self, config, run_dir, output):
        self.calls.append(("start", config["method"]))

    def log(self, scalars, step):
        if step == self.fail_at:
            raise OSError(28, "No space left on device")
        self.calls.append(("log", step, scalars["eval/eval_loss"]))

    def finish(self, summary, step):
        self.calls.append(("finish", summary["final"]))

    def close(self):
        self.calls.append(("close",))


def test_a_tracker_failing_mid_run_is_reported_once_and_the_run_finishes(monkeypatch, tmp_path, tiny_overrides, capsys):
    broken = type("Broken", (_Recorder,), {"calls": [], "fail_at": 1})
    healthy = type("Healthy", (_Recorder,), {"calls": []})
    monkeypatch.setattr(trackers_module, "CLASSES", {"tensorboard": broken, "mlflow": healthy, "wandb": healthy})
    monkeypatch.setattr(trackers_module, "require", lambda *a: None)
    monkeypatch.setattr("flexlora.extras.require", lambda *a: None)  # config.validate's check
    assert main(["run", *tiny_overrides, "output.trackers=[tensorboard,mlflow]"]) == 0
    run_dir = tmp_path / "runs" / "test"
    records, summary = _records(run_dir), json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]  # metrics.jsonl whole
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning: tracker" in line]
    assert warnings == [
        "flexlora: warning: tracker tensorboard failed (round 1): [Errno 28] No space left on device; "
        "it is off for the rest of this run"
    ]
    assert broken.calls == [("start", "flexlora"), ("log", 0, records[0]["eval"]["eval_loss"])]  # nothing after
    assert healthy.calls == [
        ("start", "flexlora"),
        *[("log", r["round"], r["eval"]["eval_loss"]) for r in records],
        ("finish", summary["final"]),
    ]  # close() after finish() ends nothing twice
