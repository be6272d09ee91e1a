"""The PNGs a user opens: a run's metric.png, and the compare report's forest.png (which
differences, their intervals, a dot per seed) and scores.png (curves only through evaluated
rounds, otherwise final scores), with labelled axes and units, all inside the figure (checked on
the matplotlib figure as saved, not on pixels)."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402


@pytest.fixture
def saved(monkeypatch):
    """Every figure saved while the test runs, with its renderer-space checks done at save time."""
    figures = []
    real = Figure.savefig

    def keep(self, *args, **kwargs):
        real(self, *args, **kwargs)
        figures.append(self)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def renderer(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)  # closed: a bare canvas
    return canvas.get_renderer()


def inside(fig, artist) -> bool:
    box = artist.get_window_extent(renderer(fig))
    width, height = fig.canvas.get_width_height()
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height


def test_metric_png_has_units_a_legend_with_method_and_profile_and_nothing_cut_off(tmp_path, saved):
    from flexlora.reporting import plot_metric

    plot_metric({"flexlora, heavy-tail-light ranks": [(0, 0.08), (1, 0.15), (2, 0.21)]}, tmp_path / "metric.png", "a title")
    [fig] = saved
    [ax] = fig.axes
    assert "round" in ax.get_xlabel() and "(0-1)" in ax.get_ylabel() and "Rouge-L" in ax.get_ylabel()
    assert all(float(t).is_integer() for t in ax.get_xticks()), "rounds are whole numbers"
    assert ax.get_ylim()[0] == 0
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["flexlora, heavy-tail-light ranks"]
    assert "profile" in legend.get_title().get_text()
    for artist in (ax.xaxis.label, ax.yaxis.label, ax.title, legend):
        assert inside(fig, artist), artist


def by_gid(fig, kind: str) -> dict[str, object]:
    """The drawn elements of one kind ("interval", "seeds", "mean", "curve"), keyed by the rest of
    their gid ("profile|reference|method" or "profile|method")."""
    found = {}
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.collections]:
            gid = artist.get_gid() or ""
            if gid.startswith(kind + "|"):
                found[gid.split("|", 1)[1]] = artist
    return found


def test_the_forest_plot_shows_each_method_against_fedit_and_against_flexlora(tmp_path, saved):
    import csv

    from test_compare_report import write_finished_grid

    from flexlora.analysis.report import write_report

    base = [0.05 * (i % 7) for i in range(180)]
    gains = {"hetlora": (0.01, 0.02, -0.01), "flexlora": (0.04, 0.05, 0.03)}
    scores = {("fedit", s): base for s in range(3)}
    for method, by_seed in gains.items():
        for s, g in enumerate(by_seed):
            scores[(method, s)] = [v + g + (0.02 if i < 20 else 0.0) for i, v in enumerate(base)]
    write_finished_grid(tmp_path, scores, categories=lambda i: f"Category {'ABCDEFGHI'[i // 20]} {i // 2}.json")
    write_report(tmp_path, echo=None)
    [forest] = [f for f in saved if "Paired differences" in f._suptitle.get_text()]
    assert "seeds and categories" in forest._suptitle.get_text()
    [ax] = forest.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "hetlora − fedit (homo)",
        "flexlora − fedit (homo)",
        "fedit (homo) − flexlora",
        "hetlora − flexlora",
    ]
    against_fedit = {
        r["method"]: r for r in csv.DictReader((tmp_path / "differences.csv").open()) if r["metric"] == "rougeL_generated"
    }
    flexlora_minus = {
        r["against"]: r
        for r in csv.DictReader((tmp_path / "differences_flexlora.csv").open())
        if r["metric"] == "rougeL_generated"
    }
    expected = {  # (interval the report's significance follows, per-seed differences), sign as drawn
        "uniform|fedit (homo)|hetlora": (against_fedit["hetlora"], 1),
        "uniform|fedit (homo)|flexlora": (against_fedit["flexlora"], 1),
        "uniform|flexlora|fedit (homo)": (against_fedit["flexlora"], -1),
        "uniform|flexlora|hetlora": (flexlora_minus["hetlora"], -1),
    }
    intervals, seeds, means = by_gid(forest, "interval"), by_gid(forest, "seeds"), by_gid(forest, "mean")
    assert set(intervals) == set(seeds) == set(means) == set(expected)
    for key, (row, sign) in expected.items():
        low, high = sorted(sign * float(row[c]) for c in ("ci95_categories_low", "ci95_categories_high"))
        [segment] = intervals[key].get_segments()
        assert segment[:, 0] == pytest.approx([low, high], abs=1e-6)  # the CSV has 6 decimals
        per_seed = sorted(sign * float(x) for x in row["per_seed"].split())
        assert sorted(seeds[key].get_offsets()[:, 0]) == pytest.approx(per_seed, abs=1e-6)
        assert means[key].get_xdata()[0] == pytest.approx(
            sign * float(row[next(c for c in row if c.startswith("mean"))]), abs=1e-6
        )
        # filled when significant (the task-level interval excludes 0), hollow otherwise
        assert (means[key].get_markerfacecolor() != "white") == (row["significant"] == "True")
    # by hand: each seed's gain, plus 0.02 on the 20 of 180 examples of category A
    assert sorted(seeds["uniform|fedit (homo)|flexlora"].get_offsets()[:, 0]) == pytest.approx(
        [g + 0.02 / 9 for g in (0.03, 0.04, 0.05)]
    )
    assert all(inside(forest, a) for a in (forest._suptitle, ax.xaxis.label, *ax.get_yticklabels()))


def test_with_only_the_first_and_last_rounds_evaluated_no_curve_is_drawn(tmp_path, saved):
    from flexlora.analysis.figures import plot_scores, score_panels

    methods, profiles, seeds = ["fedit", "flexlora", "hetlora"], ["heavy-tail-light", "heavy-tail-strong"], [0, 1]
    finals = {m: {s: {"fedit": 0.20, "flexlora": 0.25, "hetlora": 0.22}[m] + 0.01 * s for s in seeds} for m in methods}

    def cell_for(method, profile, seed):
        return {"summary": {"per_round": {"0": 0.08, "5": finals[method][seed]}}}

    panels = score_panels(methods, profiles, seeds, cell_for, str, lambda m: m == "fedit")
    assert plot_scores(tmp_path / "scores.png", panels, zero_shot=0.08) == "finals"
    [fig] = saved
    assert not by_gid(fig, "curve")
    for ax in fig.axes:  # nothing joins round 0 to round 5: the only lines are the zero-shot mark
        assert all(len(set(line.get_xdata())) == 1 for line in ax.lines)
    dots = by_gid(fig, "seeds")
    assert set(dots) == {f"{p}|{m}" for p in profiles for m in methods}
    for p in profiles:
        for m in methods:
            assert sorted(dots[f"{p}|{m}"].get_offsets()[:, 0]) == pytest.approx(sorted(finals[m].values()))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == methods
    assert [ax.get_title() for ax in fig.axes] == [f"resource profile: {p}" for p in profiles]
    assert all("(0-1)" in ax.get_xlabel() for ax in fig.axes) and inside(fig, fig._suptitle)


def test_round_curves_join_only_evaluated_rounds(tmp_path, saved):
    from flexlora.analysis.figures import plot_scores, score_panels

    methods, profiles, seeds = ["fedit", "flexlora", "hetlora"], ["heavy-tail-light", "heavy-tail-strong"], [0, 1]

    def cell_for(method, profile, seed):
        if method == "fedit":  # evaluated at the first and last rounds only
            return {"summary": {"per_round": {"0": 0.08, "6": 0.2 + 0.01 * seed}}}
        return {"summary": {"per_round": {"0": 0.08, "2": 0.15, "4": 0.2, "6": 0.22 + 0.01 * seed}}}

    panels = score_panels(methods, profiles, seeds, cell_for, str, lambda m: m == "fedit")
    assert plot_scores(tmp_path / "scores.png", panels, zero_shot=0.08) == "curves"
    [fig] = saved
    curves = by_gid(fig, "curve")
    assert list(curves["heavy-tail-light|flexlora"].get_xdata()) == [0, 2, 4, 6]
    assert curves["heavy-tail-light|flexlora"].get_ydata()[-1] == pytest.approx(0.225)
    assert list(curves["heavy-tail-light|fedit"].get_xdata()) == [0, 6]
    assert curves["heavy-tail-light|fedit"].get_linestyle() == "None"  # two points, no line between them
    assert [ax.get_title() for ax in fig.axes] == [f"resource profile: {p}" for p in profiles]
    assert "(0-1)" in fig.axes[0].get_ylabel() and all("round" in ax.get_xlabel() for ax in fig.axes)
    [legend] = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert all(any(t.startswith(m) for t in texts) for m in methods) and "every client at the same rank" in texts[0]
    assert inside(fig, legend) and inside(fig, fig._suptitle)
    for ax in fig.axes:  # the legend sits below the panels: it covers no curve
        assert legend.get_window_extent(renderer(fig)).y1 <= ax.xaxis.label.get_window_extent(renderer(fig)).y0 + 1
        for artist in (ax.xaxis.label, ax.yaxis.label, ax.title):
            assert inside(fig, artist)
