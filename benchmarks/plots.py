"""PNG plots: latency CDFs, goodput/attainment vs rate, roles over time (matplotlib, Agg).

Every series gets its own colour *and* marker (up to 20 x 10 combinations), titles name the
trace and the SLO, SLO targets are drawn on CDFs, worker counts get integer ticks, and an
axis is logarithmic only when its data spans more than a decade.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_LOG_SPAN = 10.0  # data spanning more than this ratio gets a log axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct (colour, marker) per label: tab20 colours, markers cycling with them so
    no two of the first 200 series look alike."""
    plt = _pyplot()
    colours = plt.get_cmap("tab20" if len(labels) > 10 else "tab10").colors
    n = len(colours)
    return {label: {"color": colours[i % n], "marker": MARKERS[(i + i // n) % len(MARKERS)]}
            for i, label in enumerate(labels)}


def choose_scale(ax, values: Sequence[float], axis: str = "x") -> None:  # noqa: ANN001
    """Log scale only for positive data spanning more than a decade."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size and v.min() > 0 and v.max() / v.min() > _LOG_SPAN:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def slo_caption(slo: Any) -> str:
    """'SLO TTFT 1000 ms, TPOT 100 ms' from an `SLO` (or '' without targets)."""
    if slo is None:
        return ""
    parts = [f"{name} {value:g} ms" for name, value in
             (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms), ("E2E", slo.e2el_ms))
             if value is not None]
    return "SLO " + ", ".join(parts) if parts else ""


def _title(fig, title: str | None, slo: Any) -> None:  # noqa: ANN001
    text = "; ".join(t for t in (title, slo_caption(slo)) if t)
    if text:
        fig.suptitle(text, fontsize=10)


def _cdf(ax, values: Sequence[float], label: str, style: dict) -> None:  # noqa: ANN001
    v = np.sort(np.asarray(values, dtype=float))
    if v.size:
        y = np.arange(1, v.size + 1) / v.size
        ax.plot(v, y, label=label, color=style["color"], marker=style["marker"],
                markevery=max(1, v.size // 8), markersize=4)


def plot_latency_cdfs(runs: Mapping[str, dict], path: Path, *, title: str | None = None,
                      slo: Any = None) -> None:
    """TTFT and TPOT CDFs, one line per run. Each run needs `ttfts` (s) and either
    `tpots` (s) or `latencies`/`output_lens` to derive them; SLO targets are dashed."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    styles = series_styles(list(runs))
    seen: dict[str, list[float]] = {"ttft": [], "tpot": []}
    for label, res in runs.items():
        ttfts = [t * 1000 for t in res.get("ttfts") or [] if t > 0]
        tpots = res.get("tpots")
        if tpots is None and res.get("ttfts"):
            tpots = [(lat - tt) / (n - 1) for lat, tt, n in
                     zip(res.get("latencies", []), res["ttfts"], res.get("output_lens", []),
                         strict=False) if n and n > 1]
        tpots_ms = [t * 1000 for t in tpots or [] if t > 0]
        _cdf(ax1, ttfts, label, styles[label])
        _cdf(ax2, tpots_ms, label, styles[label])
        seen["ttft"] += ttfts
        seen["tpot"] += tpots_ms
    targets = {"ttft": getattr(slo, "ttft_ms", None), "tpot": getattr(slo, "tpot_ms", None)}
    for ax, key, name in ((ax1, "ttft", "TTFT (ms)"), (ax2, "tpot", "TPOT (ms)")):
        if targets[key] is not None:
            ax.axvline(targets[key], color="black", ls="--", lw=1,
                       label=f"SLO {targets[key]:g} ms")
        choose_scale(ax, seen[key] + ([targets[key]] if targets[key] else []))
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _title(fig, title, slo)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_goodput_vs_rate(series: Mapping[str, Sequence[tuple[float, dict]]], path: Path,
                         target: float = 0.9, *, title: str | None = None,
                         slo: Any = None) -> None:
    """SLO attainment and goodput against request rate, one line per system."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = series_styles(list(series))
    rates_seen: list[float] = []
    for label, points in series.items():
        pts = sorted(points, key=lambda p: p[0])
        rates = [r for r, _ in pts]
        rates_seen += rates
        ax1.plot(rates, [res.get("slo_attainment") or 0.0 for _, res in pts], label=label,
                 **styles[label])
        ax2.plot(rates, [res.get("request_goodput") or 0.0 for _, res in pts], label=label,
                 **styles[label])
    ax1.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
    ax1.set_ylabel("SLO attainment")
    ax1.set_ylim(0, 1.02)
    ax2.set_ylabel("goodput (req/s)")
    for ax in (ax1, ax2):
        choose_scale(ax, rates_seen)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center",
               ncol=min(6, max(1, len(labels))), frameon=False)
    _title(fig, title, slo)
    rows = (len(labels) + 5) // 6
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roles_over_time(series: Mapping[str, Sequence[tuple[float, int, int]]],
                         path: Path, *, title: str | None = None) -> None:
    """Number of prefill and decode workers over time: (t, n_prefill, n_decode) steps."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    styles = series_styles([k for k, v in series.items() if v])
    for label, points in series.items():
        if not points:
            continue
        t = [p[0] for p in points]
        style = styles[label]
        ax.step(t, [p[1] for p in points], where="post", color=style["color"],
                label=f"{label}: prefill")
        ax.step(t, [p[2] for p in points], where="post", ls="--", color=style["color"],
                label=f"{label}: decode")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("workers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
