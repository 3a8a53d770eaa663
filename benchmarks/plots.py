"""PNG plots: latency CDFs, goodput/attainment vs rate, roles over time (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: Sequence[float], label: str) -> None:
    v = np.sort(np.asarray(values, dtype=float))
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label)


def plot_latency_cdfs(runs: Mapping[str, dict], path: Path) -> None:
    """TTFT and TPOT CDFs, one line per run. Each run needs `ttfts` (s) and either
    `tpots` (s) or `latencies`/`output_lens` to derive them."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, res in runs.items():
        ttfts = res.get("ttfts") or []
        _cdf(ax1, [t * 1000 for t in ttfts if t > 0], label)
        tpots = res.get("tpots")
        if tpots is None and ttfts:
            tpots = [(lat - tt) / (n - 1) for lat, tt, n in
                     zip(res.get("latencies", []), ttfts, res.get("output_lens", []),
                         strict=False) if n and n > 1]
        _cdf(ax2, [t * 1000 for t in tpots or []], label)
    for ax, name in ((ax1, "TTFT (ms)"), (ax2, "TPOT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_goodput_vs_rate(series: Mapping[str, Sequence[tuple[float, dict]]], path: Path,
                         target: float = 0.9) -> None:
    """SLO attainment and goodput against request rate, one line per system."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in series.items():
        pts = sorted(points, key=lambda p: p[0])
        rates = [r for r, _ in pts]
        ax1.plot(rates, [res.get("slo_attainment") or 0.0 for _, res in pts], marker="o",
                 label=label)
        ax2.plot(rates, [res.get("request_goodput") or 0.0 for _, res in pts], marker="o",
                 label=label)
    ax1.axhline(target, color="grey", ls="--", lw=1)
    ax1.set_ylabel("SLO attainment")
    ax2.set_ylabel("goodput (req/s)")
    for ax in (ax1, ax2):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roles_over_time(series: Mapping[str, Sequence[tuple[float, int, int]]],
                         path: Path) -> None:
    """Number of prefill and decode workers over time: (t, n_prefill, n_decode) steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for label, points in series.items():
        if not points:
            continue
        t = [p[0] for p in points]
        line = ax.step(t, [p[1] for p in points], where="post", label=f"{label}: prefill")
        ax.step(t, [p[2] for p in points], where="post", ls="--", color=line[0].get_color(),
                label=f"{label}: decode")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("workers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
