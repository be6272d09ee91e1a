"""The PNGs a user opens: a run's metric.png and the compare report's compare.png have
labelled axes with units and a legend naming methods and resource profiles, all inside the
figure (checked on the matplotlib figure as saved, not on pixels)."""

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


def test_compare_png_names_every_method_and_profile_below_the_panels(tmp_path, saved):
    from flexlora.compare import _plot

    methods, profiles, seeds = ["fedit", "flexlora", "hetlora"], ["heavy-tail-light", "heavy-tail-strong"], [0, 1]

    def cell_for(method, profile, seed):
        base = {"fedit": 0.20, "flexlora": 0.25, "hetlora": 0.22}[method] + 0.01 * seed
        return {"summary": {"per_round": {"0": 0.08, "5": base}}}

    _plot(tmp_path / "compare.png", [], methods, profiles, seeds, cell_for, str)
    [fig] = saved
    assert [ax.get_title() for ax in fig.axes] == [f"resource profile: {p}" for p in profiles]
    assert "(0-1)" in fig.axes[0].get_ylabel() and all("round" in ax.get_xlabel() for ax in fig.axes)
    [legend] = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 3 and all(any(t.startswith(m) for t in texts) for m in methods)
    assert "every client at the same rank" in texts[0]  # fedit runs on the homo profile only
    assert all("2 seeds" in t for t in texts)
    assert inside(fig, legend) and inside(fig, fig._suptitle)
    for ax in fig.axes:  # the legend sits below the panels: it covers no curve
        assert legend.get_window_extent(renderer(fig)).y1 <= ax.xaxis.label.get_window_extent(renderer(fig)).y0 + 1
        for artist in (ax.xaxis.label, ax.yaxis.label, ax.title):
            assert inside(fig, artist)
