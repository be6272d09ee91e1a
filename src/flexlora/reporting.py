"""Run outputs: JSON files written atomically, and plots."""

from __future__ import annotations

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
