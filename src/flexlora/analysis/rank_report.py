"""`flexlora rank-report DIR... [--out OUT] [--rounds 1,5,10]`: the rank-collapse study's summary
from runs' spectrum records.

For every run (a run folder, or every cell of a `flexlora compare` grid folder) and module group
(attention, MLP; and per module kind in a second table): the share of the global ΔW's energy
beyond the smallest client rank at chosen rounds, its per-round ratio from a geometric fit
(exp of the least-squares slope of log share over rounds: 1 is flat, 0.8 loses a fifth a
round), and the effective rank (mean over the group's modules) at the first and last round.
Writes rank_collapse.md and rank_collapse.png.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from flexlora.errors import ConfigError
from flexlora.reporting import read_json, read_jsonl
from flexlora.spectrum import beyond_shared, geometric_rate

DEFAULT_ROUNDS = (1, 5, 10)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders (holding metrics.jsonl) among `paths`, a grid folder standing for its cells."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
        elif (path / "cells").is_dir():
            runs += sorted(p for p in (path / "cells").iterdir() if (p / "metrics.jsonl").is_file())
        else:
            raise FileNotFoundError(f"{path}: neither a run folder (metrics.jsonl) nor a compare grid folder (cells/)")
    return runs


def load_run(run_dir: Path) -> dict:
    """{name, method, profile, seed, history, rouge (final held-out metric or None)}."""
    config_path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    profile = summary.get("profile") or (config.get("resources") or {}).get("profile", "?")
    history = read_jsonl(run_dir / "metrics.jsonl")
    return {
        "name": run_dir.name,
        "method": summary.get("method") or config.get("method", "?"),
        "profile": profile if isinstance(profile, str) else "explicit",
        "seed": summary.get("seed", config.get("seed")),
        "history": history,
        "rouge": summary.get("final"),
        "zero_shot": summary.get("zero_shot"),
        "metric": summary.get("metric"),
    }


def series(history: list[dict], level: str, name: str) -> list[tuple[int, dict]]:
    """[(round, record)] of one group ("groups") or module kind ("kinds") over a run's rounds."""
    out = []
    for r in history:
        record = ((r.get("spectrum") or {}).get(level) or {}).get(name)
        if record is not None:
            out.append((r["round"], record))
    return out


def names(runs: list[dict], level: str) -> list[str]:
    found: dict[str, None] = {}
    for run in runs:
        for r in run["history"]:
            for name in (r.get("spectrum") or {}).get(level) or {}:
                found[name] = None
    order = ["attention", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))


def row(points: list[tuple[int, dict]], rounds: tuple[int, ...]) -> dict:
    """One table row's numbers from a run's (round, record) series."""
    by_round = {rnd: rec for rnd, rec in points}
    beyond = {rnd: beyond_shared(rec) for rnd, rec in points}
    return {
        "edges": points[-1][1]["edges"],
        "at": {rnd: beyond.get(rnd) for rnd in rounds},
        "rate": geometric_rate(list(beyond), list(beyond.values())),
        "first_round": points[0][0],
        "last_round": points[-1][0],
        "eff_first": by_round[points[0][0]]["effective_rank_mean"],
        "eff_last": by_round[points[-1][0]]["effective_rank_mean"],
    }


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if 0 < abs(value) < 10**-digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def table(runs: list[dict], level: str, rounds: tuple[int, ...]) -> list[str]:
    head = [
        "method",
        "profile",
        "seed",
        level[:-1],
        "client ranks",
        *[f"beyond r_min, round {r}" for r in rounds],
        "ratio per round (fit)",
        "eff. rank, first",
        "eff. rank, last",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for name in names([run], level):
            points = series(run["history"], level, name)
            if not points:
                continue
            r = row(points, rounds)
            lines.append(
                "| "
                + " | ".join(
                    [
                        run["method"],
                        run["profile"],
                        str(run["seed"]),
                        name,
                        "/".join(map(str, r["edges"])),
                        *[_num(r["at"][x]) for x in rounds],
                        _num(r["rate"]),
                        f"{r['eff_first']:.1f} (round {r['first_round']})",
                        f"{r['eff_last']:.1f} (round {r['last_round']})",
                    ]
                )
                + " |"
            )
    return lines


def write_rank_report(paths: list[str | Path], out: str | Path, rounds: tuple[int, ...] = DEFAULT_ROUNDS) -> Path:
    """rank_collapse.md and rank_collapse.png in `out` from the runs under `paths`; returns the
    Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p) for p in find_runs(paths)]
    runs = [r for r in runs if any(h.get("spectrum") for h in r["history"])]
    if not runs:
        raise ValueError(
            "no run with spectrum records (metrics.jsonl 'spectrum', eval.spectrum=true) under " + ", ".join(map(str, paths))
        )
    runs.sort(key=lambda r: (r["profile"], r["method"], str(r["seed"])))
    lines = [
        "# Rank collapse: the global ΔW's energy beyond the smallest client rank",
        "",
        "Per run and module group: the share of the global update's energy ‖ΔW‖²_F beyond the smallest "
        "client rank r_min (1 − the share of its top r_min singular values: what a client of the smallest "
        "rank cannot receive), at the given rounds; its ratio per round from a geometric fit (exp of the "
        "least-squares slope of log share over every logged round; 1 is flat, below 1 a geometric decay); "
        "the effective rank exp(H), H the entropy of σ²/Σσ², mean over the group's modules. Shares are "
        "pooled over modules (energy-weighted). Source: each run's metrics.jsonl `spectrum` records.",
        "",
        "## By module group",
        "",
        *table(runs, "groups", rounds),
        "",
        "## By module kind",
        "",
        *table(runs, "kinds", rounds),
        "",
        "## Held-out score of each run",
        "",
        "| method | profile | seed | run | zero-shot | final |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['method']} | {run['profile']} | {run['seed']} | {run['name']} | {_num(run['zero_shot'], 4)} | {_num(run['rouge'], 4)} |"
        )
    metric = next((r["metric"] for r in runs if r["metric"]), None)
    if metric:
        lines += ["", f"Score: {metric} of the exported global model on the held-out clients."]
    lines += ["", "![rank collapse](rank_collapse.png)", ""]
    md = out / "rank_collapse.md"
    md.write_text("\n".join(lines))
    plot_rank_report(runs, out / "rank_collapse.png")
    return md


def plot_rank_report(runs: list[dict], path: Path) -> None:
    """Per module group: the energy share beyond r_min over rounds (log scale: a geometric decay
    is a straight line) and the mean effective rank; one line per run (colour: method, style:
    profile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = names(runs, "groups")
    level = "groups"
    if not groups:
        groups, level = names(runs, "kinds"), "kinds"
    methods = list(dict.fromkeys(r["method"] for r in runs))
    profiles = list(dict.fromkeys(r["profile"] for r in runs))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 8.0), squeeze=False)
    for j, name in enumerate(groups):
        top, bottom = axes[0][j], axes[1][j]
        for run in runs:
            points = series(run["history"], level, name)
            if not points:
                continue
            colour = colours[methods.index(run["method"]) % len(colours)]
            style = styles[profiles.index(run["profile"]) % len(styles)]
            label = f"{run['method']}, {run['profile']}" + (f", seed {run['seed']}" if len({r["seed"] for r in runs}) > 1 else "")
            shares = [(rnd, beyond_shared(rec)) for rnd, rec in points]
            positive = [(rnd, s) for rnd, s in shares if s > 0]
            if positive:
                top.plot(*zip(*positive), marker="o", color=colour, linestyle=style, label=label)
            bottom.plot(
                [rnd for rnd, _ in points],
                [rec["effective_rank_mean"] for _, rec in points],
                marker="o",
                color=colour,
                linestyle=style,
                label=label,
            )
        top.set_yscale("log")
        top.set_title(f"{name}: energy beyond the smallest client rank", fontsize=10)
        top.set_xlabel("round")
        top.set_ylabel(r"share of $\Vert\Delta W\Vert_F^2$ beyond $r_{min}$ (fraction, log scale)")
        bottom.set_title(f"{name}: effective rank, mean over layers", fontsize=10)
        bottom.set_xlabel("round")
        bottom.set_ylabel("effective rank exp(H) (singular directions)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.get_lines():
                ax.legend(fontsize=8)
        if not top.get_lines():  # a log axis cannot show zeros: say so instead of an empty panel
            top.set_yscale("linear")
            top.text(
                0.5,
                0.5,
                "no energy beyond the smallest rank\n(every client has the same rank)",
                ha="center",
                va="center",
                transform=top.transAxes,
                fontsize=9,
            )
    fig.suptitle("Rank collapse: spectrum of the global ΔW over rounds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
