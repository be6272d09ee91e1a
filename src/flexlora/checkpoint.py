"""Server checkpoints: written atomically after every round, read back by `flexlora run --resume`.

A checkpoint is a folder (``RUN_DIR/checkpoint``) with
- ``state-RRRRRR.safetensors``: the server's tensors (``protocol.flatten`` of its
  ``ServerSnapshot``: global state per module, method extras, server-optimizer moments) and the
  torch RNG states;
- ``checkpoint.json``: the snapshot's metadata (round, client rank assignment, method
  metadata), Python/NumPy RNG states,
  the run's config, every round's metrics so far, and the name, size and sha256 of the tensor
  file (verified on resume: a corrupted file is a clear error, not a silently wrong state);
- with ``output.keep_checkpoints=K`` > 1, ``checkpoint-RRRRRR.json`` (a copy of each of the K
  newest indexes) and their tensor files: a resume whose newest checkpoint is corrupted falls
  back to the newest one that verifies.

Both files are written to a temporary name, fsync'ed and renamed; the JSON is renamed last and
is the commit point: a crash at any moment leaves either the previous checkpoint or the new
one, never a mix. Tensor files of older rounds are deleted only after the commit. A write that
fails (no space, permission, I/O error) removes its temporary file and raises a one-line
`WriteError` naming the file; the previous checkpoint is untouched. No pickle: tensors go
through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexlora.config import ConfigError, ExperimentConfig
from flexlora.faults import fault_point, fault_write
from flexlora.reporting import WriteError, atomic_path, sha256_file
from flexlora.server import add_checkpoint_time

FORMAT = 2  # 2: the server's part is protocol.flatten of a ServerSnapshot; 1 is still read
INDEX = "checkpoint.json"
KEPT_INDEX = "checkpoint-{round:06d}.json"  # copies of older indexes (output.keep_checkpoints > 1)


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


def save_checkpoint(folder: str | Path, server, history: list[dict], config: dict, keep: int = 1, before_index=None) -> Path:
    """Write the server's state after `server.round`, keeping the `keep` newest checkpoints;
    returns the index file. A failed write raises WriteError (one line) and leaves the
    previous checkpoint as it was. `before_index(seconds)`: called with the time the tensors
    took (state, write, checksum) before the history goes into the index, so that the last
    record can count it."""
    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = server.state_dict()
    rng_tensors, rng_meta = rng_state()
    round_ = server.round
    name = f"state-{round_:06d}.safetensors"

    try:
        with atomic_path(folder / name, suffix=".tmp") as tmp:
            save_file(_safe_tensors({**tensors, **rng_tensors}), tmp, metadata={"format": str(FORMAT), "round": str(round_)})
            fault_write("checkpoint_tensors", round_)
            digest = sha256_file(tmp)
    except OSError as e:
        raise WriteError(f"writing the checkpoint tensors {folder / name} failed: {_reason(e)}") from None
    fault_point("checkpoint_write", round_)
    if before_index is not None:
        before_index(time.perf_counter() - started)

    index = {
        "format": FORMAT,
        "round": round_,
        "tensors": name,
        "tensors_bytes": (folder / name).stat().st_size,
        "tensors_sha256": digest,
        "server": meta,
        "rng": rng_meta,
        "config": config,
        "history": history,
    }
    targets = ([folder / KEPT_INDEX.format(round=round_)] if keep > 1 else []) + [folder / INDEX]
    for target in targets:  # the rename of checkpoint.json, last, is the commit point
        try:
            with atomic_path(target, suffix=".tmp") as tmp, open(tmp, "w") as f:
                text = json.dumps(index)
                f.write(text[: len(text) // 2])
                f.flush()
                fault_write("checkpoint_index", round_)
                f.write(text[len(text) // 2 :])
        except OSError as e:
            raise WriteError(f"writing the checkpoint index {target} failed: {_reason(e)}") from None
    _fsync_dir(folder)
    # The `keep` newest rounds up to this one (a resume that fell back may find newer ones).
    rounds = sorted({_round_of(p) for p in folder.glob("checkpoint-*.json")} | {round_}, reverse=True)
    kept = set([r for r in rounds if r <= round_][:keep])
    for old in [*folder.glob("checkpoint-*.json"), *folder.glob("state-*.safetensors")]:
        if _round_of(old) not in kept:
            old.unlink(missing_ok=True)
    return folder / INDEX


def _reason(e: OSError) -> str:
    return f"{e.strerror or e} (errno {e.errno})" if e.errno else str(e)


def _round_of(path: Path) -> int:
    """RRRRRR of checkpoint-RRRRRR.json / state-RRRRRR.safetensors (-1 if not of that form)."""
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def load_checkpoint(folder: str | Path, warn=None) -> Checkpoint | None:
    """The last committed checkpoint in `folder`, or None if there is none yet. If it does not
    verify (missing, truncated or corrupted tensors) and older checkpoints were kept
    (output.keep_checkpoints), the newest one that verifies, after `warn(message)`; else
    CheckpointError."""
    folder = Path(folder)
    index_path = folder / INDEX
    if not index_path.is_file():
        return None
    for leftover in folder.glob(".*.tmp"):  # a write a crash interrupted; never committed
        leftover.unlink(missing_ok=True)
    try:
        return _read_checkpoint(folder, index_path)
    except CheckpointError as newest:
        older = sorted(folder.glob("checkpoint-*.json"), key=_round_of, reverse=True)
        try:
            newest_round = json.loads(index_path.read_text()).get("round")
        except (OSError, ValueError, AttributeError):
            newest_round = None
        for path in older:
            if newest_round is not None and _round_of(path) >= newest_round:
                continue
            try:
                ckpt = _read_checkpoint(folder, path)
            except CheckpointError:
                continue
            if warn is not None:
                warn(f"{newest}; falling back to the checkpoint of round {ckpt.round} ({path.name})")
            return ckpt
        raise


def _read_checkpoint(folder: Path, index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint index {index_path} is unreadable: {e}") from None
    if not isinstance(index, dict) or index.get("format") not in (1, FORMAT):
        raise CheckpointError(
            f"checkpoint index {index_path}: unknown format {index.get('format') if isinstance(index, dict) else index!r}"
        )
    tensor_path = folder / index["tensors"]
    if not tensor_path.is_file() or tensor_path.stat().st_size != index["tensors_bytes"]:
        raise CheckpointError(f"checkpoint tensors {tensor_path} are missing or truncated")
    expected = index.get("tensors_sha256")  # absent in checkpoints written before checksums
    if expected is not None:
        got = sha256_file(tensor_path)
        if got != expected:
            raise CheckpointError(
                f"checkpoint tensors {tensor_path} are corrupted: sha256 {got[:16]}... differs from the index's {expected[:16]}..."
            )
    try:
        tensors = load_file(tensor_path)
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise CheckpointError(f"checkpoint tensors {tensor_path} are unreadable: {e}") from None
    rng_tensors = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    server_tensors = {k: v for k, v in tensors.items() if not k.startswith("rng/")}
    server_meta = index["server"]
    if index["format"] == 1:
        server_tensors, server_meta = _snapshot_of_format_1(server_tensors, server_meta)
    return Checkpoint(
        round=index["round"],
        tensors=server_tensors,
        meta=server_meta,
        history=index["history"],
        config=index["config"],
        rng={"tensors": rng_tensors, "meta": index["rng"]},
    )


def _snapshot_of_format_1(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A format-1 checkpoint's server part as the flattened ServerSnapshot of format 2. Format 1
    kept a method's extras under "method/" and the server optimizer's moments inside the global
    state ("state/server_opt.m/…")."""
    renamed = {}
    for key, t in tensors.items():
        if key.startswith("state/server_opt."):
            key = "server_opt/" + key[len("state/server_opt.") :]
        elif key.startswith("method/"):
            key = "method_tensors/" + key[len("method/") :]
        renamed[key] = t
    fields = [
        f
        for f, present in (
            ("state", meta.get("has_state")),
            ("method_tensors", "method_extra" in meta),
            ("server_opt", any(k.startswith("server_opt/") for k in renamed)),
        )
        if present
    ]
    snapshot_meta = {
        "type": "ServerSnapshot",
        "tensor_fields": fields,
        "round": meta["round"],
        "method": meta["method"],
        "client_types": meta["client_types"],
        "client_ranks": meta["client_ranks"],
        "declared_sizes": meta.get("declared_sizes") or {},
        "method_meta": meta.get("method_extra"),
    }
    return renamed, snapshot_meta


# --- a run folder's checkpoints ----------------------------------------------------------

SUBDIR = "checkpoint"
# What may differ between a run and its resumption; everything else must match the checkpoint.
# The engine and its settings too: the checkpoint is the server's state, whatever moved the
# clients' updates (a run started in-process may continue on Flower and back).
RESUME_MAY_CHANGE = ("federation.rounds", "device", "output.", "engine", "flower.")


class Checkpointer:
    """`run_rounds`' checkpoint callback for a run folder: RUN_DIR/checkpoint after every round."""

    def __init__(self, run_dir: str | Path, cfg: ExperimentConfig):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / SUBDIR
        self.config = cfg.to_dict()
        self.keep = cfg.output.keep_checkpoints

    def __call__(self, server, history: list[dict]) -> None:
        try:
            timing = (lambda s: add_checkpoint_time(history[-1], s)) if history else None
            save_checkpoint(self.folder, server, history, self.config, self.keep, before_index=timing)
        except WriteError as e:
            before = (
                f"the checkpoint of round {history[-2]['round']}"
                if len(history) > 1
                else "no checkpoint yet (a resume starts over)"
            )
            raise WriteError(
                f"round {server.round}: {e}; the run stopped with {before} and metrics.jsonl intact; "
                f"free space or fix the folder, then continue with: flexlora run --resume {self.run_dir}"
            ) from None


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


def open_checkpoint(run_dir: str | Path, cfg: ExperimentConfig, warn=None) -> Checkpoint | None:
    """The last checkpoint of a run folder that verifies, checked against `cfg`; None if it
    has none yet. Problems are one-line ConfigErrors."""
    try:
        ckpt = load_checkpoint(Path(run_dir) / SUBDIR, warn)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    if ckpt is not None:
        check_resumable(ckpt.config, cfg, ckpt.round)
    return ckpt
