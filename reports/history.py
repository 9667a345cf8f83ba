"""The gate's history: step time and memory per method over commits, one plot per metric (an asv-style page).

    <history>/runs/<n>-<commit>.parquet   the ok cell rows of one run, with commit, date and order columns
    <history>/history.html               the page: one figure per metric, a panel per method, a line per T
    <history>/history_<metric>.png/.pdf

A point is marked as a regression where the metric is worse than at the commit before it by more than the metric's
tolerance in the metric table (step time 10%, memory 5%): the same rule as the gate's, applied along the history.
"""

from __future__ import annotations

import datetime as _dt
import html
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import method_order, style  # noqa: E402
from .results import METRIC, atomic_write_parquet, load_results, write_atomic  # noqa: E402

# the metrics drawn, in order; each only where the runs have values (NVML and allocator columns on a GPU)
HISTORY_METRICS = ("step_time_ms_median", "peak_nvml_mib", "peak_alloc_mib", "saved_for_backward_mib")
KEEP = ("key", "method", "T", "arch", "dataset", "device", "gpu_name") + HISTORY_METRICS


def add_run(history: Path, results: Path, commit: str, date: str | None = None) -> Path:
    """Append a results folder's ok cells as the run of ``commit``; returns the file written."""
    cells = load_results(results, "cells")
    if cells.empty or "status" not in cells:
        raise ValueError(f"{results} holds no cells")
    ok = cells[cells["status"] == "ok"]
    rows = ok[[c for c in KEEP if c in ok]].copy()
    runs = history / "runs"
    order = len(list(runs.glob("*.parquet"))) if runs.exists() else 0
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", commit)[:40]
    rows = rows.assign(commit=commit, date=date or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       order=order)
    path = runs / f"{order:05d}-{safe}.parquet"
    atomic_write_parquet(rows, path)
    return path


def load_history(history: Path) -> pd.DataFrame:
    files = sorted((history / "runs").glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def regressions(h: pd.DataFrame, metric: str) -> pd.Series:
    """True where a (method, T)'s value is worse than at its previous run by more than the metric's tolerance."""
    m = METRIC[metric]
    tol = (m.tolerance or 0.0) / 100
    out = pd.Series(False, index=h.index)
    for _, g in h.dropna(subset=[metric]).sort_values("order").groupby(["method", "T"]):
        prev = g[metric].shift(1)
        worse = g[metric] > prev * (1 + tol) if m.better != "higher" else g[metric] < prev * (1 - tol)
        out.loc[g.index] = worse.fillna(False).astype(bool)
    return out


def fig_history(h: pd.DataFrame, metric: str, out: Path):
    """One panel per method; x: the runs in order (labelled by short commit), y: the metric, a line per T; a red
    cross over every regression. Returns (figure, paths)."""
    d = h.dropna(subset=[metric])
    methods = method_order(d["method"])
    commits = d.drop_duplicates("order").sort_values("order")
    fig, axes = plt.subplots(1, len(methods), figsize=(max(3.0, 2.6 * len(methods)), 2.6), squeeze=False,
                             sharey=False)
    bad = regressions(d, metric)
    for ax, method in zip(axes[0], methods):
        g = d[d["method"] == method]
        colour, marker, _ = style(method)
        for i, (T, gt) in enumerate(sorted(g.groupby("T"), key=lambda kv: kv[0])):
            gt = gt.sort_values("order")
            ax.plot(gt["order"], gt[metric], marker=marker, color=colour, alpha=0.4 + 0.6 * (i + 1) / g["T"].nunique(),
                    label=f"T={int(T)}", gid=f"{method}|{int(T)}")
            r = gt[bad.loc[gt.index]]
            if len(r):
                ax.plot(r["order"], r[metric], linestyle="none", marker="x", color="red", markersize=9,
                        gid=f"regression|{method}|{int(T)}")
        ax.set_title(method)
        ax.set_xticks(commits["order"], [str(c)[:7] for c in commits["commit"]], rotation=60, fontsize=6)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(METRIC[metric].axis_label)
    fig.tight_layout()
    paths = [out / f"history_{metric}.png", out / f"history_{metric}.pdf"]
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    return fig, paths


def render_history(history: Path) -> Path:
    """Draw every metric with values and write history.html beside the runs; returns the page."""
    h = load_history(history)
    if h.empty:
        raise ValueError(f"{history} holds no runs (add one with `run_bench.py history {history} --add RESULTS`)")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>snnbench history</title>"
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}img{max-width:100%}</style>"
             "</head><body><h1>snnbench: the gate over commits</h1>",
             f"<p>{h['order'].nunique()} run(s), from {html.escape(str(h['commit'].iloc[0])[:10])} to "
             f"{html.escape(str(h.sort_values('order')['commit'].iloc[-1])[:10])}. A red cross marks a value worse "
             "than at the previous run by more than the metric's tolerance.</p>"]
    for metric in HISTORY_METRICS:
        if metric not in h or h[metric].isna().all():
            continue
        fig, paths = fig_history(h, metric, history)
        plt.close(fig)
        n_bad = int(regressions(h.dropna(subset=[metric]), metric).sum())
        parts.append(f"<h2>{html.escape(METRIC[metric].label)}</h2><p>{n_bad} regression(s) marked.</p>"
                     f"<img alt='{html.escape(metric)}' src='{paths[0].name}'>")
    parts.append("</body></html>")
    page = history / "history.html"
    write_atomic(page, lambda f: f.write("\n".join(parts).encode()))
    return page
