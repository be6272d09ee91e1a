"""Server checkpoints: written atomically after every round, read back by `flexlora run --resume`.

A checkpoint is a folder (``RUN_DIR/checkpoint``) with
- ``state-RRRRRR.safetensors``: the server's tensors (global state per module, method extras)
  and the torch RNG states;
- ``checkpoint.json``: round, client rank assignment, Python/NumPy RNG states, method metadata,
  the run's config, every round's metrics so far, and the name and size of the tensor file.

Both files are written to a temporary name, fsync'ed and renamed; the JSON is renamed last and
is the commit point: a crash at any moment leaves either the previous checkpoint or the new
one, never a mix. Tensor files of older rounds are deleted only after the commit. No pickle:
tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexlora.config import ConfigError, ExperimentConfig
from flexlora.faults import fault_point
from flexlora.reporting import atomic_path

FORMAT = 1
INDEX = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back; the message names the file."""


@dataclass
class Checkpoint:
    round: int
    tensors: dict[str, torch.Tensor]
    meta: dict  # FederatedServer.state_dict()'s metadata
    history: list[dict]
    config: dict
    rng: dict

    def restore(self, server) -> list[dict]:
        """Put the server back where it was; returns the rounds' records so far."""
        server.load_state_dict(self.tensors, self.meta)
        return self.history

    def restore_rng(self) -> None:
        restore_rng(self.rng["tensors"], self.rng["meta"])


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and not sharing storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) of every global random generator the run may draw from."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda")), key=lambda k: int(k[8:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(folder: str | Path, server, history: list[dict], config: dict) -> Path:
    """Write the server's state after `server.round`; returns the index file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = server.state_dict()
    rng_tensors, rng_meta = rng_state()
    name = f"state-{server.round:06d}.safetensors"

    with atomic_path(folder / name, suffix=".tmp") as tmp:
        save_file(_safe_tensors({**tensors, **rng_tensors}), tmp, metadata={"format": str(FORMAT), "round": str(server.round)})
    fault_point("checkpoint_write", server.round)

    index = {
        "format": FORMAT,
        "round": server.round,
        "tensors": name,
        "tensors_bytes": (folder / name).stat().st_size,
        "server": meta,
        "rng": rng_meta,
        "config": config,
        "history": history,
    }
    with atomic_path(folder / INDEX, suffix=".tmp") as tmp, open(tmp, "w") as f:  # the rename is the commit point
        json.dump(index, f)
    _fsync_dir(folder)
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / INDEX


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The last committed checkpoint in `folder`, or None if there is none yet."""
    folder = Path(folder)
    index_path = folder / INDEX
    if not index_path.is_file():
        return None
    for leftover in folder.glob(".*.tmp"):  # a write a crash interrupted; never committed
        leftover.unlink(missing_ok=True)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint index {index_path} is unreadable: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint index {index_path}: unknown format {index.get('format') if isinstance(index, dict) else index!r}")
    tensor_path = folder / index["tensors"]
    if not tensor_path.is_file() or tensor_path.stat().st_size != index["tensors_bytes"]:
        raise CheckpointError(f"checkpoint tensors {tensor_path} are missing or truncated")
    try:
        tensors = load_file(tensor_path)
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise CheckpointError(f"checkpoint tensors {tensor_path} are unreadable: {e}") from None
    rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    return Checkpoint(
        round=index["round"],
        tensors={k: v for k, v in tensors.items() if not k.startswith("rng/")},
        meta=index["server"],
        history=index["history"],
        config=index["config"],
        rng={"tensors": rng_tensors, "meta": index["rng"]},
    )


# --- a run folder's checkpoints ----------------------------------------------------------

SUBDIR = "checkpoint"
# What may differ between a run and its resumption; everything else must match the checkpoint.
# The engine and its settings too: the checkpoint is the server's state, whatever moved the
# clients' updates (a run started in-process may continue on Flower and back).
RESUME_MAY_CHANGE = ("federation.rounds", "device", "output.", "engine", "flower.")


class Checkpointer:
    """`run_rounds`' checkpoint callback for a run folder: RUN_DIR/checkpoint after every round."""

    def __init__(self, run_dir: str | Path, cfg: ExperimentConfig):
        self.folder = Path(run_dir) / SUBDIR
        self.config = cfg.to_dict()

    def __call__(self, server, history: list[dict]) -> None:
        save_checkpoint(self.folder, server, history, self.config)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "method_args":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict, cfg: ExperimentConfig, round_: int) -> None:
    """ConfigError unless `cfg` continues the run whose checkpoint recorded the config `saved`."""
    now = _flatten(cfg.to_dict())
    for key, value in _flatten(saved).items():
        if not key.startswith(RESUME_MAY_CHANGE) and now.get(key) != value:
            raise ConfigError(f"--resume: {key} is {now.get(key)!r} but the checkpoint was written with {value!r}")
    if cfg.federation.rounds < round_:
        raise ConfigError(f"--resume: federation.rounds={cfg.federation.rounds} but the checkpoint is already at round {round_}")


def open_checkpoint(run_dir: str | Path, cfg: ExperimentConfig) -> Checkpoint | None:
    """The last checkpoint of a run folder, checked against `cfg`; None if it has none yet.
    Problems are one-line ConfigErrors."""
    try:
        ckpt = load_checkpoint(Path(run_dir) / SUBDIR)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    if ckpt is not None:
        check_resumable(ckpt.config, cfg, ckpt.round)
    return ckpt
