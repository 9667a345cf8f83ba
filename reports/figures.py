"""Matplotlib figures of the rate-BP paper from a results DataFrame. Each function saves PNG and PDF
and returns the Figure (tests read the plotted values back from its artists).

A function decorated with ``@figure(...)`` is drawn by the report for every (architecture, dataset) of the
results, in the order defined here; ``figure("samples")`` or ``figure("epochs")`` names the frames it takes after
the cells. A new figure is one decorated function in this file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import (contended, has, memory_column, method_order, ok, over_seeds, style, time_column,  # noqa: E402
                        with_labels)
from .results import METRIC  # noqa: E402

RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "lines.linewidth": 1.3, "lines.markersize": 4, "axes.grid": True, "grid.alpha": 0.3,
    "savefig.dpi": 200, "pdf.fonttype": 42, "ps.fonttype": 42,
}
FULL_WIDTH, COLUMN_WIDTH = 7.0, 3.4  # inches: a two-column paper's text width and column width

# name -> (function, the frames it takes after the cells: "samples", "epochs"); filled by @figure
FIGURES: dict[str, tuple[Callable, tuple[str, ...]]] = {}


def figure(*needs: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        FIGURES[fn.__name__] = (fn, needs)
        return fn
    return register


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    return paths


def _missing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=7, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _lines(ax, d: pd.DataFrame, col: str, flag: pd.Series | None = None) -> bool:
    """One line per method over T: mean over seeds, error bars (std) where several seeds. Points where ``flag``
    holds for any seed (timings under contention) are drawn hollow, over the line."""
    agg = over_seeds(d, ["label", "T"], col)
    if agg.empty:
        return False
    flagged = set()
    if flag is not None and flag.any():
        flagged = set(map(tuple, d.loc[flag[flag].index, ["label", "T"]].itertuples(index=False)))
    for label in method_order(agg["label"]):
        a = agg[agg["label"] == label].sort_values("T")
        c, m, ls = style(label)
        yerr = a["std"].where(a["n"] > 1).to_numpy(dtype=float)
        ax.errorbar(a["T"], a["mean"], yerr=None if np.all(np.isnan(yerr)) else np.nan_to_num(yerr), color=c, marker=m,
                    linestyle=ls, label=label, capsize=2)
        hollow = a[[(label, t) in flagged for t in a["T"]]]
        if len(hollow):
            ax.plot(hollow["T"], hollow["mean"], linestyle="none", marker=m, markerfacecolor="white",
                    markeredgecolor=c, gid="contended")
    ax.set_xticks(sorted(agg["T"].unique()))
    return True


@figure()
def fig_cost(df: pd.DataFrame, out: Path, name: str = "fig_cost"):
    """The paper's Figure 4: accuracy, peak memory and time over T, one line per method."""
    d = with_labels(ok(df))
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 3, figsize=(FULL_WIDTH, 2.3), constrained_layout=True)
        mem, _ = memory_column(d)
        tcol, tlabel = time_column(d)
        busy = contended(d)
        panels = [  # (column, y label, title, what to say when there is nothing to draw, points to draw hollow)
            ("acc_top1" if has(d, "acc_top1") else None, METRIC["acc_top1"].axis_label, "accuracy",
             "no accuracy\n(profile grid or no finished train cell)", None),
            (mem, METRIC[mem].axis_label if mem else None,
             "memory" + ("" if mem in (None, "peak_nvml_mib") else " (no NVML column)"), "no memory column", None),
            (tcol, tlabel, "time" + (" (hollow: other processes busy)" if busy.any() else ""), "no time column", busy),
        ]
        for ax, (col, ylabel, title, missing, flag) in zip(axes, panels):
            if col and _lines(ax, d, col, flag):
                ax.set_ylabel(ylabel)
            else:
                _missing(ax, missing)
            ax.set_title(title)
        for ax in axes:
            if ax.has_data():
                ax.set_xlabel("timesteps T")
        handles, labels = next(((a.get_legend_handles_labels()) for a in axes if a.get_legend_handles_labels()[0]), ([], []))
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), frameon=False)
        paths = _save(fig, out, name)
    return fig, paths


@figure()
def fig_phases(df: pd.DataFrame, out: Path, name: str = "fig_phases"):
    """Stacked forward / backward / optimizer time (median per step) per method at each T."""
    d = with_labels(ok(df))
    phases = [("forward_ms", "forward", 1.0), ("backward_ms", "backward", 0.6), ("optimizer_ms", "optimizer", 0.25)]
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.5), constrained_layout=True)
        if not all(has(d, c) for c, _, _ in phases):
            _missing(ax, "no per-phase times stored")
            return fig, _save(fig, out, name)
        means = {c: over_seeds(d, ["label", "T"], c).set_index(["label", "T"])["mean"] for c, _, _ in phases}
        labels = method_order(d["label"])
        Ts = sorted(d["T"].unique())
        width = 0.8 / max(len(labels), 1)
        for i, label in enumerate(labels):
            color = style(label)[0]
            bottom = np.zeros(len(Ts))
            x = np.arange(len(Ts)) + (i - (len(labels) - 1) / 2) * width
            for c, pname, alpha in phases:
                vals = np.array([means[c].get((label, T), np.nan) for T in Ts], dtype=float)
                ax.bar(x, np.nan_to_num(vals), width, bottom=bottom, color=color, alpha=alpha, edgecolor=color,
                       linewidth=0.6, label=f"{label}" if c == "forward_ms" else None)
                bottom += np.nan_to_num(vals)
        ax.set_xticks(np.arange(len(Ts)), [str(t) for t in Ts])
        ax.set_xlabel("timesteps T")
        ax.set_ylabel("time per step [ms]")
        ax.set_title("phases: forward (solid), backward (light), optimizer (lightest)")
        ax.legend(ncol=2, frameon=False)
        paths = _save(fig, out, name)
    return fig, paths


@figure("samples")
def fig_memory_time(cells: pd.DataFrame, samples: pd.DataFrame, out: Path, keys: list[str] | None = None,
                    name: str = "fig_memory_time"):
    """Memory over time of chosen cells (default: each method's largest-T cell), NVML if sampled, else RSS."""
    d = with_labels(ok(cells))
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.3), constrained_layout=True)
        if samples.empty or d.empty:
            _missing(ax, "no memory samples stored")
            return fig, _save(fig, out, name)
        source = "nvml" if (samples["source"] == "nvml").any() else "rss"
        if keys is None:
            keys = [g.sort_values(["T", "seed"]).iloc[-1]["key"] for _, g in d.groupby("label")]
        chosen = d[d["key"].isin(keys)]
        for label in method_order(chosen["label"]):
            row = chosen[chosen["label"] == label].iloc[0]
            s = samples[(samples["key"] == row["key"]) & (samples["source"] == source)].sort_values("t_s")
            c, _, ls = style(label)
            ax.plot(s["t_s"], s["mib"], color=c, linestyle=ls, label=f"{label} T={row['T']}")
        ax.set_xlabel("time since cell start [s]")
        ax.set_ylabel(("GPU memory above baseline, NVML" if source == "nvml" else "resident memory, RSS") + " [MiB]")
        ax.legend(frameon=False)
        paths = _save(fig, out, name)
    return fig, paths


@figure("epochs")
def fig_curves(cells: pd.DataFrame, epochs: pd.DataFrame, out: Path, T: int | None = None, name: str = "fig_curves"):
    """Test accuracy and training loss per epoch, one line per method, at one T (mean over seeds)."""
    d = with_labels(ok(cells))
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.2), constrained_layout=True)
        if epochs.empty or d.empty:
            for ax in axes:
                _missing(ax, "no epoch rows (profile grid?)")
            return fig, _save(fig, out, name)
        Ts = sorted(d["T"].unique())
        T = T if T in Ts else (4 if 4 in Ts else Ts[-1])
        e = epochs.merge(d[d["T"] == T][["key", "label", "seed"]], on="key")
        for ax, col, ylabel in ((axes[0], "test_acc", "test accuracy [%]"), (axes[1], "train_loss", "training loss (CE)")):
            agg = over_seeds(e, ["label", "epoch"], col)
            for label in method_order(agg["label"]):
                a = agg[agg["label"] == label].sort_values("epoch")
                c, m, ls = style(label)
                ax.plot(a["epoch"], a["mean"], color=c, linestyle=ls, label=label)
                if (a["n"] > 1).any():
                    ax.fill_between(a["epoch"], a["mean"] - a["std"].fillna(0), a["mean"] + a["std"].fillna(0), color=c, alpha=0.15)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"T = {T}")
        axes[0].legend(frameon=False)
        paths = _save(fig, out, name)
    return fig, paths
