"""`flexlora bench scale`: a real federation at growing clients per round, each in its own process.

Per setting, one `flexlora run` (the default model, SmolLM2-135M, unless --model says
otherwise; resources.profile=heavy-tail-strong, so most clients train rank 200) with short
local training so that a round costs little more than the server's work:

    data.num_clients=max(100, K) federation.clients_per_round=K federation.rounds=2
    train.steps=1 train.batch_size=1 data.cutoff_len=48 resources.profile=heavy-tail-strong
    eval.max_examples_per_client=1 eval.max_new_tokens=2 output.checkpoint=false

(issue 10's measuring command), and with --ni the paper's 1,613-client Natural Instructions
sample (data.source=natural-instructions, data.heldout_fraction=0.02 for evaluation,
federation.fraction=0.05 of the training clients per round).
Extra key=value overrides go to every run, after these.

Each run is a child process, launched with subprocess and reaped with os.wait4, whose rusage
is that child's own: its ru_maxrss is the peak resident memory of that run alone (model
loading, training, the server step and evaluation included). From the run's metrics.jsonl,
per round: seconds per client = client_training_s / clients trained in the round (valid +
rejected updates), and the server's share = server_s / total_s of the round's own time
breakdown (server_s: building tasks + validation + aggregation + checkpoint; total_s
includes evaluation); the table shows the mean over the rounds, the JSON every round.

Goals: peak memory at the largest K at most 1.25x that at the smallest (issue 10: 80 vs 10);
the NI run completes its rounds, with its peak memory reported next to the machine's memory.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flexlora.bench.common import child_env, goal, not_checked, report, with_count
from flexlora.errors import ConfigError

DEFAULT_CLIENTS = (10, 20, 40, 80)
DEFAULT_MODEL = "smollm2-135m-instruct"
NI_PATH = "../shared/data/natural-instructions-1613-mini"
NI_FRACTION = 0.05
# The NI folder marks no client as held out; evaluate on a seeded 2% of them (about 31 clients,
# one example each), so that the rest (about 1,522) train: ceil(0.05 x 1,522) = 77 per round.
NI_HELDOUT_FRACTION = 0.02
MEMORY_GOAL = 1.25  # peak RSS at the largest K / at the smallest K

# The short-training settings of issue 10's measurement (before the per-setting keys).
SHORT = [
    "train.steps=1",
    "train.batch_size=1",
    "data.cutoff_len=48",
    "resources.profile=heavy-tail-strong",
    "eval.max_examples_per_client=1",
    "eval.max_new_tokens=2",
    "output.checkpoint=false",
]


def parse_clients(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--clients: expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise ValueError(f"--clients: every value must be >= 1, got '{text}'")
    return sorted(set(values))


def settings(
    clients: list[int], rounds: int, model: str, ni: bool = False, ni_path: str = NI_PATH, extra: list[str] = ()
) -> list[dict]:
    """One dict per run: its label, clients per round (None: set by the fraction) and overrides."""
    if rounds < 1:
        raise ValueError(f"--rounds: must be >= 1, got {rounds}")
    common = [f"model={model}", f"federation.rounds={rounds}", *SHORT]
    out = [
        {
            "label": f"K={k}",
            "kind": "synthetic",
            "clients_per_round": k,
            "overrides": [*common, f"data.num_clients={max(100, k)}", f"federation.clients_per_round={k}", *extra],
        }
        for k in clients
    ]
    if ni:
        path = Path(ni_path)
        if not path.is_dir():
            raise ValueError(f"--ni-path: {ni_path} is not a folder (the 1613-client Natural Instructions sample)")
        out.append(
            {
                "label": "NI 1613, fraction 0.05",
                "kind": "ni",
                "clients_per_round": None,
                "overrides": [
                    *common,
                    "data.source=natural-instructions",
                    f"data.path={path.resolve()}",
                    f"data.heldout_fraction={NI_HELDOUT_FRACTION}",
                    f"federation.fraction={NI_FRACTION}",
                    *extra,
                ],
            }
        )
    return out


def validate(setting: dict) -> None:
    """Load the setting's config in this process, so that a bad key fails before any run starts."""
    from flexlora.config import load_config

    load_config(None, setting["overrides"])


# ---------------------------------------------------------------- one run


def run_setting(setting: dict, runs_dir: Path, name: str, timeout_s: float) -> dict:
    """Run one setting as a child process; its peak RSS from os.wait4, its times from metrics.jsonl."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    log_path = runs_dir / f"{name}.log"
    command = [
        sys.executable,
        "-m",
        "flexlora.cli",
        "run",
        "--overwrite",
        *setting["overrides"],
        f"output.dir={runs_dir}",
        f"output.name={name}",
    ]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() - started > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall_s = time.perf_counter() - started
    row = {
        "label": setting["label"],
        "kind": setting["kind"],
        "overrides": setting["overrides"],
        "returncode": proc.returncode,
        "wall_s": wall_s,
        "log": str(log_path),
        # Linux: kilobytes. The child's own peak (and that of any child it waited for).
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }
    text = log_path.read_text(errors="replace")
    device = re.search(r"^flexlora: \S+ on \S+ \((\S+?)\)", text, re.M)
    row["device"] = device.group(1) if device else None
    row.update(read_rounds(runs_dir / name / "metrics.jsonl"))
    if timed_out:
        row["error"] = f"timed out after {timeout_s:g} s"
    elif proc.returncode != 0:
        if proc.returncode == -signal.SIGKILL:
            row["error"] = "killed (SIGKILL: out of memory?)"
        else:
            lines = [line for line in text.strip().splitlines() if line.strip()]
            row["error"] = lines[-1][:200] if lines else f"exit code {proc.returncode}"
    if setting["clients_per_round"] is not None:
        row["clients_per_round"] = setting["clients_per_round"]
    elif row["rounds"]:
        row["clients_per_round"] = row["rounds"][0]["clients"]
    return row


def read_rounds(path: Path) -> dict:
    """Per round (1, 2, ...): clients trained, seconds per client, the server's time and share."""
    rounds = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            t = record.get("time") or {}
            if not record.get("round") or "server_s" not in t:
                continue  # round 0: zero-shot evaluation only
            trained = len(record.get("clients") or {}) + len(record.get("rejected") or {})
            rounds.append(
                {
                    "round": record["round"],
                    "clients": trained,
                    "failures": len(record.get("failures") or {}),
                    "s_per_client": t["client_training_s"] / trained if trained else None,
                    "time": t,
                }
            )
    out = {"rounds": rounds}
    if rounds:
        per_client = [r["s_per_client"] for r in rounds if r["s_per_client"] is not None]
        out["s_per_client"] = sum(per_client) / len(per_client) if per_client else None
        out["server_s"] = _mean(r["time"]["server_s"] for r in rounds)
        out["server_share"] = _mean(r["time"]["server_share"] for r in rounds)
        out["round_s"] = _mean(r["time"]["total_s"] for r in rounds)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---------------------------------------------------------------- the benchmark


def run_benchmark(
    clients=DEFAULT_CLIENTS,
    rounds: int = 2,
    model: str = DEFAULT_MODEL,
    *,
    ni: bool = False,
    ni_path: str = NI_PATH,
    extra: list[str] = (),
    runs_dir: str | None = None,
    timeout_s: float = 7200,
    echo=print,
) -> list[dict]:
    """Every setting in turn; the run folders go to `runs_dir` (kept) or a temporary folder (removed)."""
    todo = settings(list(clients), rounds, model, ni, ni_path, list(extra))
    for setting in todo:
        validate(setting)
    temporary = runs_dir is None
    base = Path(tempfile.mkdtemp(prefix="flexlora-bench-scale-")) if temporary else Path(runs_dir)
    rows = []
    try:
        for i, setting in enumerate(todo):
            name = f"k{setting['clients_per_round']}" if setting["kind"] == "synthetic" else "ni1613"
            echo(f"{setting['label']}: running ({i + 1}/{len(todo)}; log {base / (name + '.log')})")
            row = run_setting(setting, base, name, timeout_s)
            row["load_avg_1min"] = os.getloadavg()[0]
            rows.append(row)
            echo(f"{setting['label']}: " + _describe(row))
    finally:
        if temporary:
            shutil.rmtree(base, ignore_errors=True)
    return rows


def _describe(row: dict) -> str:
    text = f"peak RSS {row['peak_rss_mb']:.0f} MB, {row['wall_s']:.0f} s"
    if row.get("s_per_client") is not None:
        text += f", {row['s_per_client']:.2f} s/client, server share {100 * row['server_share']:.1f}%"
    if "error" in row:
        text += f"; FAILED: {row['error']}"
    return text


def _ok(row: dict) -> bool:
    return "error" not in row and bool(row.get("rounds"))


def format_table(rows: list[dict]) -> str:
    lines = [
        "| setting | clients/round | rounds done | device | peak RSS (MB) | s/client | server s/round | "
        "server share | round s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        done = len(r.get("rounds") or [])
        head = f"| {r['label']} | {r.get('clients_per_round', '')} | {done} | {r.get('device') or ''} | {r['peak_rss_mb']:.0f} |"
        if r.get("s_per_client") is None:
            lines.append(head + f" failed: {r.get('error', 'no round finished')} | | | | {r['wall_s']:.0f} |")
            continue
        lines.append(
            head + f" {r['s_per_client']:.2f} | {r['server_s']:.1f} | {100 * r['server_share']:.1f}% | "
            f"{r['round_s']:.1f} | {r['wall_s']:.0f} |" + (f" failed: {r['error']}" if "error" in r else "")
        )
    return "\n".join(lines)


def goals(rows: list[dict], total_memory_mb: float | None = None) -> list[str]:
    """The issue's goals, checked on the measured rows."""
    total_memory_mb = total_memory_mb if total_memory_mb is not None else machine_memory_mb()
    out = []
    synthetic = sorted((r for r in rows if r["kind"] == "synthetic"), key=lambda r: r["clients_per_round"])
    if len(synthetic) >= 2:
        low, high = synthetic[0], synthetic[-1]
        k_low, k_high = low["clients_per_round"], high["clients_per_round"]
        text = f"peak memory at {k_high} clients/round <= {MEMORY_GOAL}x that at {k_low}"
        if _ok(low) and _ok(high):
            q = high["peak_rss_mb"] / low["peak_rss_mb"]
            out.append(goal(q <= MEMORY_GOAL, text, f"{high['peak_rss_mb']:.0f} MB / {low['peak_rss_mb']:.0f} MB = {q:.2f}x"))
        else:
            failed = ", ".join(r["label"] for r in (low, high) if not _ok(r))
            out.append(goal(False, text, f"{failed} did not complete"))
    else:
        out.append(not_checked("peak memory flat in clients per round", "needs two --clients values"))
    for r in rows:
        if r["kind"] != "ni":
            continue
        done = len(r.get("rounds") or [])
        wanted = next((int(o.split("=", 1)[1]) for o in reversed(r["overrides"]) if o.startswith("federation.rounds=")), None)
        memory = f" of {total_memory_mb / 1024:.1f} GiB" if total_memory_mb else ""
        out.append(
            goal(
                _ok(r) and done == wanted,
                f"the 1,613-client NI sample (fraction {NI_FRACTION}, {r.get('clients_per_round', '?')} clients/round) "
                f"runs {wanted} rounds to completion",
                f"{done} done, peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB{memory}" + (f"; {r['error']}" if "error" in r else ""),
            )
        )
    return with_count(out)


def machine_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def write_json(rows: list[dict], path, argv: list[str] | None = None) -> None:
    result = {
        "benchmark": "flexlora bench scale",
        "command": "flexlora " + shlex.join(argv) if argv else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "memory_mb": machine_memory_mb()},
        "server_share": "mean over the rounds of the round's server_s / total_s (total includes evaluation)",
        "s_per_client": "mean over the rounds of client_training_s / clients trained in the round",
        "peak_rss_mb": "ru_maxrss of the run's own process (os.wait4), whole run",
        "rows": rows,
        "goals": goals(rows),
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


# ---------------------------------------------------------------- the command


HELP = (
    "a real federation at 10, 20, 40, 80 clients per round (heavy-tail-strong, short local training), each run "
    "in its own process: peak resident memory, seconds per client, the server's share of the round"
)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--clients",
        default="10,20,40,80",
        help="comma-separated clients per round (default 10,20,40,80; empty with --ni: NI only)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (default 2)")
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="model (default smollm2-135m-instruct; tiny-llama for tests)"
    )
    parser.add_argument(
        "--ni", action="store_true", help="also run the 1,613-client Natural Instructions sample with federation.fraction=0.05"
    )
    parser.add_argument(
        "--ni-path", default="../shared/data/natural-instructions-1613-mini", help="the NI per-client folder for --ni"
    )
    parser.add_argument("--runs-dir", help="keep the run folders and logs here (default: a temporary folder, removed)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run before it is killed (default 7200)")
    parser.add_argument("--out", help="write the results (rows, per-round times, goals) to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. device=cpu train.steps=2")


def run_command(args) -> None:
    try:
        clients = parse_clients(args.clients) if args.clients.strip() else []
        if not clients and not args.ni:
            raise ValueError("--clients: give at least one value (or --ni)")
        if args.timeout <= 0:
            raise ValueError(f"--timeout: must be > 0, got {args.timeout:g}")
        rows = run_benchmark(
            clients,
            args.rounds,
            args.model,
            ni=args.ni,
            ni_path=args.ni_path,
            extra=args.overrides,
            runs_dir=args.runs_dir,
            timeout_s=args.timeout,
        )
    except ValueError as e:
        raise ConfigError(f"bench scale: {e}") from None
    report(__name__, rows, args.out, args.argv)
