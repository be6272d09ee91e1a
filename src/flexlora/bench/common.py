"""What every benchmark shares, kept once: the environment of a child process, resident-memory
sampling and wall-clock timing (interleaved repeats, medians), the goal lines printed as
PASS or FAIL with a count, and a command's report (table, goals, JSON).

Nothing here imports torch at module level: a parent process that only launches children
(`bench client`, `bench scale`) stays light. The same holds for every benchmark module, which
the command line imports to add its flags (``add_arguments``).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager

# ---------------------------------------------------------------- child processes


def child_env() -> dict:
    """The environment of a benchmark's child process: this source tree first on the path,
    quiet libraries, passive OpenMP waits (so that a child does not spin against its parent)."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


# ---------------------------------------------------------------- memory and time


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Resident memory sampled every millisecond while the block runs; `.peak` in MiB (a spike
    shorter than a millisecond can be missed)."""

    def __init__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def sync(device) -> None:
    """Wait for the device's queued work, so that a wall time covers it (no-op off CUDA)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


@contextmanager
def measure(device, result: dict):
    """Wall time and peak memory above the start, into result["time_s"], result["peak_mb"]
    (CUDA: the allocator's peak; CPU: resident memory, sampled by PeakRSS)."""
    import torch

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
        sampler = None
    else:
        sampler = PeakRSS().__enter__()
    started = time.perf_counter()
    try:
        yield
        sync(device)
    finally:
        result["time_s"] = time.perf_counter() - started
        if sampler is None:
            result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start_mem) / 2**20
        else:
            sampler.__exit__(None, None, None)
            result["peak_mb"] = sampler.peak - sampler.start


def timed(device, fn):
    """(result of fn, wall time, peak memory above the start) of one run."""
    m: dict = {}
    with measure(device, m):
        out = fn()
    return out, m["time_s"], m["peak_mb"]


def interleaved(repeat: int, device, procedures: dict) -> dict:
    """Run each procedure `repeat` times, round-robin (one of each, then again), so that a
    change of machine load hits all of them alike. Returns {name: (last result, times, max
    peak)}. A procedure's previous result is freed before it runs again."""
    out = {name: [None, [], 0.0] for name in procedures}
    for _ in range(repeat):
        for name, fn in procedures.items():
            out[name][0] = None
            result, t, peak = timed(device, fn)
            out[name][0] = result
            out[name][1].append(t)
            out[name][2] = max(out[name][2], peak)
    return {name: tuple(v) for name, v in out.items()}


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- goals


def goal(met: bool, text: str, measured: str) -> str:
    """One goal line: 'PASS <goal> (<what was measured>)' or 'FAIL ...'."""
    return f"{'PASS' if met else 'FAIL'} {text} ({measured})"


def not_checked(text: str, why: str) -> str:
    return f"SKIP {text} ({why})"


def with_count(lines: list[str]) -> list[str]:
    """The goal lines and a last one counting them: 'goals: 3 of 4 met, 1 FAILED'."""
    checked = [line for line in lines if line.startswith(("PASS ", "FAIL "))]
    if not checked:
        return list(lines)
    failed = sum(line.startswith("FAIL ") for line in checked)
    return [*lines, f"goals: {len(checked) - failed} of {len(checked)} met" + (f", {failed} FAILED" if failed else "")]


def print_report(table: str, goal_lines: list[str], echo=print) -> None:
    """A benchmark's Markdown table, then its goal lines."""
    echo("")
    echo(table)
    echo("")
    echo("\n".join(goal_lines))


def report(module_name: str, rows, json_path: str | None, *write_args) -> None:
    """What `flexlora bench <name>` prints: the benchmark module's table and goal lines (its
    format_table and goals), and its rows as JSON if asked (its write_json; write_args: what
    else that records, e.g. the command line)."""
    module = sys.modules[module_name]
    print_report(module.format_table(rows), module.goals(rows))
    if json_path:
        module.write_json(rows, json_path, *write_args)
        print(f"results: {json_path}")


def comma_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (a comma-separated flag)."""
    return [part.strip() for part in text.split(",") if part.strip()]
