"""The comparison report's figures: a forest plot of the paired differences (forest.png) and the
held-out score per method (scores.png: round curves where rounds between the first and the last
were evaluated, otherwise each seed's final score).

The data of each figure is computed by a pure function (`forest_rows`, `score_panels`), which
the tests read; the drawing functions only lay it out. Every drawn element carries a gid naming
what it shows (e.g. "interval|heavy-tail-light|fedit (homo)|flexlora"), so a test can find it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from flexlora.reporting import atomic_path

SCORE_LABEL = "held-out Rouge-L F1, generated (0-1)"


@dataclass(frozen=True)
class ForestRow:
    """One difference of the forest plot: `method` − `reference` under `profile`, its mean, the
    95% interval `significant` follows (the union of those `interval` names) and the difference in each seed."""

    profile: str
    reference: str
    method: str
    mean: float
    low: float
    high: float
    interval: str
    per_seed: tuple[float, ...]
    significant: bool

    @property
    def name(self) -> str:
        return f"{self.method} − {self.reference}"


def _row(profile: str, reference: str, method: str, d, negate: bool = False) -> ForestRow:
    """A row from a PairedDifference; `negate`: d is reference − method, the row method − reference
    (the percentile interval of the negated resamples is the negated interval, ends swapped)."""
    low, high = d.deciding_interval
    sign = -1.0 if negate else 1.0
    if negate:
        low, high = -high, -low
    return ForestRow(
        profile, reference, method, sign * d.mean, low, high, d.decided_by, tuple(sign * x for x in d.per_seed), d.significant
    )


def forest_rows(differences, pairwise, baseline: str, ours: str, profiles: list[str], label, metric: str) -> list[ForestRow]:
    """Per profile: each method − the baseline (FedIT-homo), then each method − `ours` (FlexLoRA),
    on `metric`. `differences`: [((method, profile), [PairedDifference])] of method − baseline;
    `pairwise`: [(rival, profile, [PairedDifference])] of ours − rival (negated here)."""
    against_baseline = {}
    for (method, profile), diffs in differences:
        d = next(x for x in diffs if x.metric == metric)
        for p in profiles if profile == "homo" else [profile]:  # a homogeneous method is every profile's
            against_baseline[(method, p)] = d
    against_ours = {(rival, p): next(x for x in diffs if x.metric == metric) for rival, p, diffs in pairwise}
    rows = []
    for p in profiles:
        rows += [_row(p, label(baseline), label(m), d) for (m, q), d in against_baseline.items() if q == p]
        if (ours, p) in against_baseline:  # the baseline − ours is ours − the baseline, negated
            rows.append(_row(p, label(ours), label(baseline), against_baseline[(ours, p)], negate=True))
        rows += [_row(p, label(ours), label(m), d, negate=True) for (m, q), d in against_ours.items() if q == p]
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _suptitle(fig, text: str, fontsize: float = 9.5) -> None:
    """A title over the panels, wrapped to the figure's width (a narrow one-panel figure too)."""
    import textwrap

    per_line = int(fig.get_figwidth() * 72 / (0.55 * fontsize))  # about 0.55 em per character
    fig.suptitle(textwrap.fill(text, per_line), fontsize=fontsize)


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_forest(path: Path, rows: list[ForestRow], profiles: list[str], metric: str) -> None:
    """One panel per profile, one line per difference (the same lines in every panel, blank
    where a profile lacks that difference), grouped by reference: the interval as a bar, the
    mean as a diamond (filled: significant), each seed's difference as a dot."""
    if not rows:
        return
    plt = _pyplot()
    names = list(dict.fromkeys((r.reference, r.method) for r in rows))
    references = list(dict.fromkeys(ref for ref, _ in names))
    # y positions top down, a blank line between the reference groups
    positions, y = {}, 0.0
    for k, ref in enumerate(references):
        if k:
            y -= 1.0
        for key in (n for n in names if n[0] == ref):
            positions[key] = y
            y -= 1.0
    by_key = {(r.profile, r.reference, r.method): r for r in rows}
    intervals = sorted({r.interval for r in rows})
    colors = {ref: f"C{k}" for k, ref in enumerate(references)}
    fig, axes = plt.subplots(
        1, len(profiles), figsize=(3.6 * len(profiles) + 2.6, 0.3 * len(positions) + 2.2), sharey=True, sharex=True, squeeze=False
    )
    for ax, profile in zip(axes[0], profiles):
        ax.axvline(0.0, color="0.3", lw=0.8)
        for (ref, method), y in positions.items():
            r = by_key.get((profile, ref, method))
            if r is None:
                continue
            gid = f"{profile}|{ref}|{method}"
            color = colors[ref]
            ax.hlines(y, r.low, r.high, color=color, lw=2.4, alpha=0.55, gid=f"interval|{gid}")
            if r.per_seed:
                offsets = [
                    y + 0.18 * (k - (len(r.per_seed) - 1) / 2) / max(len(r.per_seed) - 1, 1) for k in range(len(r.per_seed))
                ]
                ax.scatter(r.per_seed, offsets, s=11, color="0.15", zorder=3, gid=f"seeds|{gid}")
            ax.plot(
                [r.mean],
                [y],
                marker="D",
                ms=6,
                color=color,
                markerfacecolor=color if r.significant else "white",
                markeredgewidth=1.4,
                zorder=4,
                linestyle="none",
                gid=f"mean|{gid}",
            )
        ax.set_title(f"resource profile: {profile}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"difference in {metric}")
    axes[0][0].set_yticks(list(positions.values()), [f"{method} − {ref}" for ref, method in positions])
    axes[0][0].set_ylim(min(positions.values()) - 0.8, max(positions.values()) + 0.8)
    _suptitle(
        fig,
        f"Paired differences on the held-out clients: mean (◆, filled: significant), 95% interval (bar; over "
        f"{' / '.join(intervals).replace(' and seeds and', ' ∪ seeds and')}), one dot per seed",
    )
    fig.tight_layout()
    _save(fig, path)


@dataclass(frozen=True)
class ScoreSeries:
    """One method under one profile: its label, whether the homogeneous method (the same cells in
    every panel), and per seed {round: score} of the evaluated rounds."""

    method: str
    homogeneous: bool
    per_seed: dict[int, dict[int, float]]

    @property
    def rounds(self) -> list[int]:
        """The rounds every seed evaluated."""
        return sorted(set.intersection(*(set(r) for r in self.per_seed.values())))

    @property
    def finals(self) -> dict[int, float]:
        return {seed: scores[max(scores)] for seed, scores in self.per_seed.items()}


def score_panels(methods, profiles, seeds, cell_for, label, is_homogeneous) -> dict[str, list[ScoreSeries]]:
    """Per profile, the evaluated rounds' scores of each method's finished seeds."""
    panels = {}
    for profile in profiles:
        series = []
        for method in methods:
            per_seed = {
                s: {int(k): v for k, v in r["summary"]["per_round"].items()} for s in seeds if (r := cell_for(method, profile, s))
            }
            if per_seed:
                series.append(ScoreSeries(label(method), is_homogeneous(method), per_seed))
        panels[profile] = series
    return panels


def has_intermediate_rounds(panels: dict[str, list[ScoreSeries]]) -> bool:
    """Whether any method evaluated a round between the first and the last: only then is a
    curve over rounds drawn (two evaluated rounds joined by a line would look like progress)."""
    return any(len(s.rounds) > 2 for series in panels.values() for s in series)


def plot_scores(path: Path, panels: dict[str, list[ScoreSeries]], zero_shot: float | None) -> str:
    """Round curves where rounds between the first and the last were evaluated (a method that
    evaluated only those two gets its points, no line), otherwise each seed's final score per
    method (a dot per seed, a bar at the mean). Returns which: "curves" or "finals"."""
    if has_intermediate_rounds(panels):
        _plot_curves(path, panels, zero_shot)
        return "curves"
    _plot_finals(path, panels, zero_shot)
    return "finals"


def _plot_curves(path: Path, panels: dict[str, list[ScoreSeries]], zero_shot: float | None) -> None:
    plt = _pyplot()
    methods = list(dict.fromkeys(s.method for series in panels.values() for s in series))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), sharey=True, squeeze=False)
    handles: dict[str, object] = {}
    for ax, (profile, series) in zip(axes[0], panels.items()):
        for s in series:
            rounds = s.rounds
            mean = [statistics.fmean(scores[t] for scores in s.per_seed.values()) for t in rounds]
            style = ("--" if s.homogeneous else "-") if len(rounds) > 2 else "none"
            same_rank = " (every client at the same rank)" if s.homogeneous else ""
            (line,) = ax.plot(
                rounds,
                mean,
                linestyle=style,
                marker="o",
                color=f"C{methods.index(s.method) % 10}",
                gid=f"curve|{profile}|{s.method}",
                label=f"{s.method}{same_rank}, {len(s.per_seed)} seeds",
            )
            handles.setdefault(line.get_label(), line)
        if zero_shot is not None:
            zero = ax.axhline(zero_shot, color="0.5", linestyle=":", lw=1.2, gid="zero-shot", label="zero-shot (base model)")
            handles.setdefault(zero.get_label(), zero)
        ax.set_title(f"resource profile: {profile}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("federated round (0 = zero-shot)")
    axes[0][0].set_ylabel(SCORE_LABEL)
    _suptitle(fig, "Held-out clients' Rouge-L at the evaluated rounds, mean over seeds", fontsize=10)
    # One legend for all panels, below them, so that it covers nothing drawn.
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(2, len(handles)) or 1, fontsize=8, frameon=False)
    rows_of_legend = -(-len(handles) // 2)
    fig.tight_layout(rect=(0, 0.045 * rows_of_legend + 0.03, 1, 1))
    _save(fig, path)


def _plot_finals(path: Path, panels: dict[str, list[ScoreSeries]], zero_shot: float | None) -> None:
    """Methods as lines of a dot plot (the same lines in every panel), the final score on x."""
    plt = _pyplot()
    methods = list(dict.fromkeys(s.method for series in panels.values() for s in series))
    position = {m: -k for k, m in enumerate(methods)}
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.4 * len(panels) + 2.4, 0.32 * len(methods) + 1.9), sharey=True, sharex=True, squeeze=False
    )
    for ax, (profile, series) in zip(axes[0], panels.items()):
        for s in series:
            y, finals, color = position[s.method], list(s.finals.values()), f"C{methods.index(s.method) % 10}"
            offsets = [y + 0.2 * (j - (len(finals) - 1) / 2) / max(len(finals) - 1, 1) for j in range(len(finals))]
            ax.scatter(finals, offsets, s=14, color=color, zorder=3, gid=f"seeds|{profile}|{s.method}")
            ax.vlines(statistics.fmean(finals), y - 0.32, y + 0.32, color="0.1", lw=1.6, gid=f"mean|{profile}|{s.method}")
        if zero_shot is not None:
            ax.axvline(zero_shot, color="0.5", linestyle=":", lw=1.2, gid="zero-shot")
        ax.set_title(f"resource profile: {profile}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_xlabel(SCORE_LABEL)
    axes[0][0].set_yticks(list(position.values()), methods)
    axes[0][0].set_ylim(-len(methods) + 0.4, 0.6)
    _suptitle(
        fig,
        "Held-out clients' final Rouge-L (only the first and the last round were evaluated, so no curve): "
        "a dot per seed, a bar at the mean, dotted: zero-shot",
    )
    fig.tight_layout()
    _save(fig, path)
