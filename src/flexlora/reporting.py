"""Run outputs: JSON files written atomically, and plots."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def readable(tmp: str | Path) -> None:
    """Give a mkstemp file (mode 0600) the mode a plain open() would have (0666 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


class WriteError(RuntimeError):
    """A run output that could not be written (no space, permission, I/O error); the message is
    one line saying what failed, what is intact and how to continue."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def append_line(path: str | Path, line: str, round_: int | None = None) -> None:
    """Append one line (newline added) and fsync it; if the write fails part-way, the file is
    truncated back to where it was, so it never ends in a partial line."""
    from flexlora.faults import fault_write

    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            # Written in two parts only so that a test can fail the write in the middle of the line.
            half = len(data) // 2
            _write_all(fd, data[:half])
            if round_ is not None:
                fault_write("metrics_line", round_)
            _write_all(fd, data[half:])
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path beside `path`; once the caller has written it, fsync it and
    rename it over `path`, so a crash never leaves a half-written file. On error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def plot_metric(series: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str = "Rouge-L (generated)") -> None:
    """One line per series: (round, value) points; round 0 is the zero-shot model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        rounds, values = zip(*points)
        ax.plot(rounds, values, marker="o", label=label)
    ax.set_xlabel("round (0 = zero-shot)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
