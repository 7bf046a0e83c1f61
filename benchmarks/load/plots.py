"""PNG plots of a run (matplotlib, Agg): latency percentiles against offered load per scenario,
and latency histograms per RPC at 70 % of each scenario's maximum."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from benchmarks.load.report import P99_TARGET_MS
from benchmarks.load.stats import Histogram

PCTS = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def _panels(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"anchor {n}", s) for n, s in result["anchors"].items()] + \
        list(result["scenarios"].items())


def _plain_log(axis: Any) -> None:
    """Log axis labelled 1, 10, 100 (not 10^1), without crowded minor labels."""
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _grid(n: int) -> tuple[Any, list[Any]]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.6 * cols, 7.0), 3.3 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat


def latency_vs_load(result: dict[str, Any], path: Path) -> bool:
    panels = [(n, s) for n, s in _panels(result)
              if any(st["mode"] == "open" for st in s["steps"])]
    if not panels:
        return False
    fig, axes = _grid(len(panels))
    for ax, (name, s) in zip(axes, panels, strict=False):
        rpc = s["rpcs"][0]
        opened = sorted((st for st in s["steps"] if st["mode"] == "open" and rpc in st["rpcs"]),
                        key=lambda st: st["offered_per_s"])
        xs = [st["offered_per_s"] for st in opened]
        for key, label in PCTS:
            ax.plot(xs, [st["rpcs"][rpc][key] for st in opened], marker="o", ms=3, label=label)
        sat = [st for st in s["steps"] if st["mode"] == "closed" and rpc in st["rpcs"]]
        if sat:
            ax.plot([sat[0]["ops_per_s"]], [sat[0]["rpcs"][rpc]["p99_ms"]], "kx",
                    label="p99 saturated")
            ax.axvline(sat[0]["ops_per_s"], color="grey", lw=0.8, ls=":")
        ax.axhline(P99_TARGET_MS, color="red", lw=0.8, ls="--")
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.set_title(f"{name}: {rpc}", fontsize=9)
        ax.set_xlabel("offered operations/s", fontsize=8)
        ax.set_ylabel("latency ms", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Latency against offered load (open loop); x: saturated closed loop; "
                 f"red: {P99_TARGET_MS:g} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _rebinned(h: Histogram, per_decade: int = 20) -> tuple[list[float], list[float]]:
    """Bin edges (ms) and the share of calls in each coarser log bin."""
    bins: dict[int, int] = {}
    for lo, _hi, c in h.buckets_ms():
        k = math.floor(math.log10(max(lo, 1e-3)) * per_decade)
        bins[k] = bins.get(k, 0) + c
    if not bins:
        return [], []
    ks = range(min(bins), max(bins) + 1)
    edges = [10 ** (k / per_decade) for k in ks] + [10 ** ((max(bins) + 1) / per_decade)]
    return edges, [bins.get(k, 0) / h.n for k in ks]


def histograms(result: dict[str, Any], path: Path) -> bool:
    panels = []
    for name, s in _panels(result):
        step = s.get("at_70pct") or (s["steps"][0] if s["steps"] else None)
        if step and step["rpcs"]:
            panels.append((name, step))
    if not panels:
        return False
    fig, axes = _grid(len(panels))
    for ax, (name, step) in zip(axes, panels, strict=False):
        for rpc, r in step["rpcs"].items():
            edges, shares = _rebinned(Histogram.from_dict(r["hist"]))
            if shares:
                ax.stairs(shares, edges, label=f"{rpc} (p99 {r['p99_ms']:.1f})")
        ax.axvline(P99_TARGET_MS, color="red", lw=0.8, ls="--")
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        ax.set_title(f"{name}: {step['label']}", fontsize=9)
        ax.set_xlabel("latency ms", fontsize=8)
        ax.set_ylabel("share of calls", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Latency histograms at 70 % of each maximum (flash sale: its one phase)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_all(result: dict[str, Any], out: Path) -> list[str]:
    """Write every plot that has data; return the file names."""
    written = []
    if latency_vs_load(result, out / "latency_vs_load.png"):
        written.append("latency_vs_load.png")
    if histograms(result, out / "histograms.png"):
        written.append("histograms.png")
    return written
