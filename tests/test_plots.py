"""Plots people can read: one look per series, honest axes, SLO lines."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.metrics import SLO  # noqa: E402
from benchmarks.plots import (  # noqa: E402
    choose_scale,
    plot_goodput_vs_rate,
    plot_latency_cdfs,
    plot_roles_over_time,
    series_styles,
    slo_caption,
)


def test_every_series_looks_different():
    for n in (3, 14, 40):
        styles = series_styles([f"s{i}" for i in range(n)])
        looks = {(s["color"], s["marker"]) for s in styles.values()}
        assert len(looks) == n
    fourteen = series_styles([f"s{i}" for i in range(14)])
    assert len({s["color"] for s in fourteen.values()}) == 14


def test_log_axis_only_past_a_decade():
    fig, ax = plt.subplots()
    choose_scale(ax, [10, 12, 19])
    assert ax.get_xscale() == "linear"
    choose_scale(ax, [1, 50, 300])
    assert ax.get_xscale() == "log"
    plt.close(fig)


def test_cdf_has_slo_lines_and_a_title(tmp_path, monkeypatch):
    saved = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, **kw):  # noqa: ANN001, ANN003
        saved["fig"] = fig
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    runs = {"2 req/s": {"ttfts": [0.1, 0.2, 0.4], "latencies": [0.5, 0.8, 1.2],
                        "output_lens": [5, 5, 9]}}
    plot_latency_cdfs(runs, tmp_path / "cdf.png", title="trace x", slo=SLO(300, 50))
    fig = saved["fig"]
    assert fig._suptitle.get_text() == "trace x; SLO TTFT 300 ms, TPOT 50 ms"
    ttft_ax, tpot_ax = fig.axes
    assert any(line.get_label() == "SLO 300 ms" for line in ttft_ax.get_lines())
    assert any(line.get_label() == "SLO 50 ms" for line in tpot_ax.get_lines())
    assert (tmp_path / "cdf.png").stat().st_size > 1000


def test_roles_have_integer_ticks_and_goodput_plots(tmp_path, monkeypatch):
    saved = {}
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: (saved.setdefault("fig", fig),
                                                 real_savefig(fig, path, **kw)))
    plot_roles_over_time({"dopd": [(0, 2, 2), (10, 3, 1), (20, 1, 3)]}, tmp_path / "r.png",
                         title="pools")
    ticks = saved["fig"].axes[0].get_yticks()
    assert all(float(t).is_integer() for t in ticks)
    plot_goodput_vs_rate({"a": [(1, {"slo_attainment": 1.0, "request_goodput": 1.0}),
                                (2, {"slo_attainment": 0.5, "request_goodput": 1.0})]},
                         tmp_path / "g.png", slo=SLO(ttft_ms=1000))
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert slo_caption(SLO()) == "" and slo_caption(None) == ""
