"""Run outputs: JSON files written atomically, and plots."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from flexlora.errors import ConfigError


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
        view = view[os.write(fd, view) :]


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


def read_json(path: Path):
    """A JSON file of a run or grid folder; ConfigError naming it when it is missing or broken."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list:
    """metrics.jsonl and the like: one record per non-empty line; ConfigError naming the file and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not valid JSON ({e})") from None
    return records


ROUGE_AXIS = "Rouge-L F1 of generated answers (0-1)"


def plot_metric(series: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str = ROUGE_AXIS) -> None:
    """One line per series (its label names the method and the resource profile): (round, value)
    points; round 0 is the zero-shot model. The y axis starts at 0 (a score is never negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    top = 0.0
    for label, points in series.items():
        rounds, values = zip(*points)
        ax.plot(rounds, values, marker="o", label=label, clip_on=False)  # a score of 0 sits on the axis, visible
        top = max(top, *values)
    ax.set_xlabel("federated round (0 = zero-shot, before training)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="method, resource profile", fontsize=9, title_fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spectrum_panels(history: list[dict]) -> tuple[str, dict[str, list[tuple[int, dict]]]]:
    """("groups" | "kinds", {name: [(round, record)]}) of a run's spectrum records (see
    flexlora.spectrum): the attention / MLP groups where every round has them, else the module
    kinds. Records with one band per drawn rank (written before rank distributions got octave
    bands) are merged into octave bands."""
    from flexlora.spectrum import coarsen

    rounds = [(r["round"], r["spectrum"]) for r in history if r.get("spectrum")]
    level = "groups" if rounds and all(s.get("groups") for _, s in rounds) else "kinds"
    panels: dict[str, list[tuple[int, dict]]] = {}
    for round_, s in rounds:
        for name, record in s.get(level, {}).items():
            panels.setdefault(name, []).append((round_, coarsen(record)))
    return level, panels


def plot_spectrum(history: list[dict], path: Path, title: str) -> bool:
    """rank_energy.png: per module group (or kind), the share of the global ΔW's energy in each
    rank band over rounds, and the effective rank of every module kind (mean over its layers).
    False (nothing written) when the run logged no spectrum."""
    level, panels = spectrum_panels(history)
    kinds = {}
    for r in history:
        for kind, record in ((r.get("spectrum") or {}).get("kinds") or {}).items():
            kinds.setdefault(kind, []).append((r["round"], record["effective_rank_mean"]))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(panels) + 1
    columns = min(count, 3)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.6 * columns, 4.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (name, points) in zip(flat, panels.items()):
        labels = points[-1][1]["bands"]
        for j, label in enumerate(labels):
            series = [(rnd, rec["share"][j]) for rnd, rec in points if j < len(rec["share"])]
            ax.plot([p[0] for p in series], [p[1] for p in series], marker="o", label=f"σ_i, i in {label}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("round")
        ax.set_ylabel(r"share of energy $\Vert\Delta W\Vert_F^2$ (fraction)")
        edges = "/".join(str(e) for e in points[-1][1]["edges"])
        ax.set_title(f"{name}: energy per rank band (client ranks {edges})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="band of singular values", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax = flat[len(panels)]
    for kind, points in sorted(kinds.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=kind)
    ax.set_xlabel("round")
    ax.set_ylabel("effective rank exp(H) (singular directions)")
    ax.set_title("effective rank, mean over layers", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="module kind", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in flat[count:]:
        ax.set_visible(False)
    for ax in flat[:count]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends sit right of their panels, covering no curve
    plt.close(fig)
    return True
