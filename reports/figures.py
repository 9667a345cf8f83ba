"""Matplotlib figures of the rate-BP paper from a results DataFrame. Each function saves PNG and PDF
and returns the Figure (tests read the plotted values back from its artists).

A function decorated with ``@figure(...)`` is drawn by the report for every (architecture, dataset) of the
results, in the order defined here, in the report section ``section`` names (SECTIONS); ``figure("samples")`` or
``figure("epochs")`` names the frames it takes after the cells (any of reports.results.KINDS). A figure of an
analysis returns ``(None, [])`` when its cells have nothing to draw, and the report leaves it out. A new figure is
one decorated function in this file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import (contended, has, memory_column, method_order, ok, over_seeds, style, time_column,  # noqa: E402
                        time_parts, with_labels)
from .results import METRIC, TIME_PARTS  # noqa: E402

RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "lines.linewidth": 1.3, "lines.markersize": 4, "axes.grid": True, "grid.alpha": 0.3,
    "savefig.dpi": 200, "pdf.fonttype": 42, "ps.fonttype": 42,
}
FULL_WIDTH, COLUMN_WIDTH = 7.0, 3.4  # inches: a two-column paper's text width and column width

# the report's sections, in order: key -> title
SECTIONS = {"cost": "Accuracy and training cost", "fidelity": "Gradient fidelity",
            "memory": "Where the memory goes", "behaviour": "Behaviour over time steps",
            "harness": "Where a cell's time goes", "plan": "Plan against measurement"}

# name -> (function, the frames it takes after the cells, its section); filled by @figure
FIGURES: dict[str, tuple[Callable, tuple[str, ...], str]] = {}


def figure(*needs: str, section: str = "cost") -> Callable[[Callable], Callable]:
    assert section in SECTIONS, section

    def register(fn: Callable) -> Callable:
        FIGURES[fn.__name__] = (fn, needs, section)
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
    energy = has(d, "energy_per_step_j")  # a fourth panel where training energy was measured
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 4 if energy else 3, figsize=(FULL_WIDTH, 2.3), constrained_layout=True)
        mem, _ = memory_column(d)
        tcol, tlabel = time_column(d)
        busy = contended(d)
        panels = [  # (column, y label, title, what to say when there is nothing to draw, points to draw hollow)
            ("acc_top1" if has(d, "acc_top1") else None, METRIC["acc_top1"].axis_label, "accuracy",
             "no accuracy\n(profile grid or no finished train cell)", None),
            (mem, METRIC[mem].axis_label if mem else None,
             "memory" + ("" if mem in (None, "peak_nvml_mib") else " (no NVML column)"), "no memory column", None),
            (tcol, tlabel, "time" + (" (hollow: other processes busy)" if busy.any() else ""), "no time column", busy),
        ] + ([("energy_per_step_j", METRIC["energy_per_step_j"].axis_label,
               "energy (" + ", ".join(sorted(set(d["energy_source"].dropna()))) + ")", "", None)] if energy else [])
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


def _panels(n: int, height: float = 1.7, ncols: int = 4, sharey: bool = True):
    """A figure of ``n`` small panels (at most ``ncols`` a row); the unused ones are hidden."""
    ncols = max(1, min(n, ncols))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(FULL_WIDTH, height * nrows + 0.4), squeeze=False,
                             sharey=sharey, constrained_layout=True)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _T_colors(Ts) -> dict:
    """One colour per T, light to dark as T grows (viridis), the same in every panel of a figure."""
    Ts = sorted(set(int(t) for t in Ts))
    cmap = plt.get_cmap("viridis")
    return {t: cmap(0.85 * i / max(len(Ts) - 1, 1)) for i, t in enumerate(Ts)}


def _details(cells: pd.DataFrame, frame: pd.DataFrame, kind: str | None = None) -> pd.DataFrame:
    """Detail rows of the ok cells (of one ``kind``), with the cells' label, T and seed."""
    d = with_labels(ok(cells))
    if kind is not None and "kind" in d:
        d = d[d["kind"] == kind]
    if frame.empty or d.empty:
        return pd.DataFrame()
    return frame.merge(d[["key", "label", "T", "seed"]], on="key")


@figure("samples")
def fig_memory_time(cells: pd.DataFrame, samples: pd.DataFrame, out: Path, keys: list[str] | None = None,
                    name: str = "fig_memory_time"):
    """Memory over time of chosen cells (default: each method's largest-T cell), NVML if sampled, else RSS: one
    small panel per method, each on its own time axis (a 15 s cell is not a sliver beside a 150 s one). Where the
    cells' power was read (``source == "power"``), a second row of panels below shows it on the same time axes."""
    d = with_labels(ok(cells))
    with plt.rc_context(RC):
        if samples.empty or d.empty:
            fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.3), constrained_layout=True)
            _missing(ax, "no memory samples stored")
            return fig, _save(fig, out, name)
        source = "nvml" if (samples["source"] == "nvml").any() else "rss"
        if keys is None:
            keys = [g.sort_values(["T", "seed"]).iloc[-1]["key"] for _, g in d.groupby("label")]
        chosen = d[d["key"].isin(keys)]
        labels = method_order(chosen["label"])
        power = samples[(samples["source"] == "power") & samples["key"].isin(chosen["key"])]
        n = len(labels)
        if power.empty:
            fig, axes = _panels(n, sharey=True)
            mem_axes, power_axes = axes, [None] * n
        else:  # memory above, power below, per method (at most 4 a row); a method's two panels share the time axis
            ncols = min(n, 4)
            blocks = -(-n // ncols)
            fig, grid = plt.subplots(2 * blocks, ncols, figsize=(FULL_WIDTH, 3.4 * blocks + 0.2), squeeze=False,
                                     constrained_layout=True)
            mem_axes = [grid[2 * (i // ncols)][i % ncols] for i in range(n)]
            power_axes = [grid[2 * (i // ncols) + 1][i % ncols] for i in range(n)]
            for i in range(n, blocks * ncols):
                grid[2 * (i // ncols)][i % ncols].set_visible(False)
                grid[2 * (i // ncols) + 1][i % ncols].set_visible(False)
            for ax, pax in zip(mem_axes, power_axes):
                if ax is not mem_axes[0]:
                    ax.sharey(mem_axes[0])
                    pax.sharey(power_axes[0])
                pax.sharex(ax)
                ax.tick_params(labelbottom=False)
            for i in range(n):
                if i % ncols:
                    mem_axes[i].tick_params(labelleft=False)
                    power_axes[i].tick_params(labelleft=False)
        for ax, pax, label in zip(mem_axes, power_axes, labels):
            row = chosen[chosen["label"] == label].iloc[0]
            s = samples[(samples["key"] == row["key"]) & (samples["source"] == source)].sort_values("t_s")
            c, _, ls = style(label)
            ax.plot(s["t_s"], s["mib"], color=c, linestyle=ls, label=f"{label} T={row['T']}")
            ax.set_title(f"{label}, T={row['T']}")
            if pax is None:
                ax.set_xlabel("time since cell start [s]")
                continue
            p = power[power["key"] == row["key"]].sort_values("t_s")
            if p.empty:  # (not _missing: its cleared ticks would clear the shared time axis of the memory panel)
                pax.text(0.5, 0.5, "no power readings", ha="center", va="center", transform=pax.transAxes,
                         fontsize=7, color="0.35")
            pax.plot(p["t_s"], p["w"], color=c, linestyle=ls, label=f"{label} T={row['T']} power")
            pax.set_xlabel("time since cell start [s]")
        mem_axes[0].set_ylabel(("GPU memory above baseline, NVML" if source == "nvml" else "resident memory, RSS")
                               + " [MiB]")
        if power_axes[0] is not None:
            sources = ", ".join(sorted(set(chosen["energy_source"].dropna()))) if "energy_source" in chosen else ""
            power_axes[0].set_ylabel("power [W]" + (f"\n({sources})" if sources else ""))
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


# --------------------------------------------------------------------------- analyses (fidelity, memory, behaviour)


@figure()
def fig_ops(df: pd.DataFrame, out: Path, name: str = "fig_ops"):
    """What the trained network costs at inference, per sample over its T steps (bench/ops.py): accumulates driven
    by spikes, multiply-accumulates driven by real-valued inputs (the first layer's), and the dense MACs, over T."""
    d = with_labels(ok(df))
    cols = [c for c in ("ops_effective_acs", "ops_effective_macs", "ops_dense_macs") if has(d, c)]
    if not cols:
        return None, []
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, len(cols), figsize=(FULL_WIDTH, 2.3), constrained_layout=True, squeeze=False)
        for ax, col in zip(axes[0], cols):
            _lines(ax, d, col)
            ax.set_title(METRIC[col].label.replace(" per sample", ""))
            ax.set_ylabel("per sample")
            ax.set_xlabel("timesteps T")
            ax.set_yscale("log")
        axes[0][0].legend(frameon=False)
        paths = _save(fig, out, name)
    return fig, paths


@figure("fidelity", section="fidelity")
def fig_fidelity_layers(cells: pd.DataFrame, fidelity: pd.DataFrame, out: Path, name: str = "fig_fidelity_layers"):
    """The paper's Figure 3 for every method: the cosine of the method's gradient with its reference's per weight
    layer (input to output), one line per T; solid at initialisation, dashed with the trained weights (the last
    epoch compared). Means over the batches (and seeds)."""
    f = _details(cells, fidelity, "fidelity")
    if f.empty:
        return None, []
    f = f[f["layer"] >= 0]
    labels = method_order(f["label"])
    colors = _T_colors(f["T"])
    with plt.rc_context(RC):
        fig, axes = _panels(len(labels))
        for ax, label in zip(axes, labels):
            g = f[f["label"] == label]
            last = int(g["epoch"].max())
            for T in sorted(g["T"].unique()):
                for epoch, ls in ((0, "-"), (last, "--")) if last > 0 else ((0, "-"),):
                    a = g[(g["T"] == T) & (g["epoch"] == epoch)].groupby("layer")["cosine"].mean()
                    if len(a):
                        ax.plot(a.index, a.values, color=colors[int(T)], linestyle=ls, marker="o", markersize=2.5,
                                label=f"T={int(T)}" if epoch == 0 else None)
            ax.set_title(label + (f" (dashed: epoch {last})" if last > 0 else ""))
            ax.set_xlabel("weight layer (input to output)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_ylabel("cosine to reference gradient")
        axes[0].legend(frameon=False)
        paths = _save(fig, out, name)
    return fig, paths


@figure("fidelity", section="fidelity")
def fig_fidelity_epochs(cells: pd.DataFrame, fidelity: pd.DataFrame, out: Path, name: str = "fig_fidelity_epochs"):
    """The all-weights gradient cosine over training (the epochs whose weights were compared; 0: initialisation),
    one panel per method, one line per T; only where more than one epoch was compared."""
    f = _details(cells, fidelity, "fidelity")
    if f.empty or f["epoch"].nunique() < 2:
        return None, []
    f = f[f["layer"] == -1]
    labels = method_order(f["label"])
    colors = _T_colors(f["T"])
    with plt.rc_context(RC):
        fig, axes = _panels(len(labels))
        for ax, label in zip(axes, labels):
            g = f[f["label"] == label]
            for T in sorted(g["T"].unique()):
                a = g[g["T"] == T].groupby("epoch")["cosine"].agg(["mean", "std"])
                ax.errorbar(a.index, a["mean"], yerr=a["std"].fillna(0), color=colors[int(T)], marker="o",
                            markersize=2.5, capsize=2, label=f"T={int(T)}")
            ax.set_title(label)
            ax.set_xlabel("epoch of the weights")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_ylabel("cosine, all weights")
        axes[0].legend(frameon=False)
        paths = _save(fig, out, name)
    return fig, paths


MODULE_COLORS = {"conv": "#0072B2", "bn": "#56B4E9", "lif": "#D55E00", "linear": "#009E73", "other": "#999999"}
TENSOR_COLORS = {"activation": "#999999", "spike": "#0072B2", "rate": "#009E73", "membrane": "#D55E00",
                 "eligibility": "#E69F00"}


@figure("saved", section="memory")
def fig_saved_parts(cells: pd.DataFrame, saved: pd.DataFrame, out: Path, name: str = "fig_saved_parts"):
    """The bytes saved for backward at their peak, stacked by the module that saved them (left) and by the kind of
    tensor (right), a bar per method and T; on a GPU, the allocator's peak per phase beside them."""
    s = _details(cells, saved)
    if s.empty:
        return None, []
    d = with_labels(ok(cells))
    s = s.groupby(["label", "T", "module", "tensor"])["bytes"].mean().reset_index()  # mean over seeds
    bars = [(label, int(T)) for label in method_order(s["label"]) for T in sorted(s[s["label"] == label]["T"].unique())]
    x, pos = 0.0, []
    for i, (label, T) in enumerate(bars):
        if i and bars[i - 1][0] != label:
            x += 0.7  # a gap between methods
        pos.append(x)
        x += 1.0
    phases = [c for c in ("forward_peak_alloc_mib", "backward_peak_alloc_mib", "optimizer_peak_alloc_mib") if has(d, c)]
    with plt.rc_context(RC):
        n = 3 if phases else 2
        fig, axes = plt.subplots(n, 1, figsize=(FULL_WIDTH, 2.0 * n + 0.3), constrained_layout=True, sharex=True)
        for ax, by, colors in ((axes[0], "module", MODULE_COLORS), (axes[1], "tensor", TENSOR_COLORS)):
            bottom = np.zeros(len(bars))
            for part, color in colors.items():
                vals = np.array([s[(s["label"] == lb) & (s["T"] == T) & (s[by] == part)]["bytes"].sum()
                                 for lb, T in bars]) / 2**20
                if vals.any():
                    ax.bar(pos, vals, 0.8, bottom=bottom, color=color, label=part)
                    bottom += vals
            ax.set_ylabel("saved for backward [MiB]")
            ax.set_title(f"by {by}")
            ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if phases:
            ax = axes[2]
            w = 0.8 / len(phases)
            for j, c in enumerate(phases):
                m = over_seeds(d, ["label", "T"], c).set_index(["label", "T"])["mean"]
                ax.bar([p + (j - (len(phases) - 1) / 2) * w for p in pos],
                       [m.get((lb, T), np.nan) for lb, T in bars], w, label=c.split("_")[0], alpha=1.0 - 0.25 * j,
                       color="#0072B2")
            ax.set_ylabel("allocator peak [MiB]")
            ax.set_title("allocator peak per phase (GPU)")
            ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axes[-1].set_xticks(pos, [str(T) for _, T in bars], fontsize=6)
        axes[-1].set_xlabel("timesteps T, grouped by method", labelpad=14)
        for label in dict.fromkeys(lb for lb, _ in bars):  # the method under its group of bars
            xs = [p for p, (lb, _) in zip(pos, bars) if lb == label]
            axes[-1].annotate(label, (sum(xs) / len(xs), 0), xycoords=("data", "axes fraction"), xytext=(0, -14),
                              textcoords="offset points", ha="center", va="top", fontsize=6)
        paths = _save(fig, out, name)
    return fig, paths


def _over_per_method(f: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, out: Path, name: str):
    """One panel per method, one line per T: ``y`` (mean over seeds) against ``x`` (integers)."""
    labels = method_order(f["label"])
    colors = _T_colors(f["T"])
    with plt.rc_context(RC):
        fig, axes = _panels(len(labels))
        for ax, label in zip(axes, labels):
            g = f[f["label"] == label]
            for T in sorted(g["T"].unique()):
                a = g[g["T"] == T].groupby(x)[y].mean()
                ax.plot(a.index, a.values, color=colors[int(T)], marker="o", markersize=2.5, label=f"T={int(T)}")
            ax.set_title(label)
            ax.set_xlabel(xlabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_ylabel(ylabel)
        axes[0].legend(frameon=False)
        paths = _save(fig, out, name)
    return fig, paths


@figure("layers", section="behaviour")
def fig_firing_layers(cells: pd.DataFrame, layers: pd.DataFrame, out: Path, name: str = "fig_firing_layers"):
    """Each spiking layer's firing rate over the evaluation set after training (input to output), one panel per
    method, one line per T."""
    f = _details(cells, layers, "train")
    if f.empty:
        return None, []
    return _over_per_method(f, "layer", "firing_rate", "spiking layer (input to output)", "firing rate", out, name)


@figure("anytime", section="behaviour")
def fig_anytime(cells: pd.DataFrame, anytime: pd.DataFrame, out: Path, name: str = "fig_anytime"):
    """Any-time inference (the paper's Figure 5): the accuracy of a network trained with T when it answers after
    its first t steps, one panel per method, one line per trained T."""
    f = _details(cells, anytime, "train")
    if f.empty:
        return None, []
    f = f[f["analysis"] == "anytime"]
    if f.empty or f["t"].max() < 2:
        return None, []
    return _over_per_method(f, "t", "acc", "steps used at inference t", "test accuracy [%]", out, name)


@figure(section="harness")
def fig_cell_time(cells: pd.DataFrame, out: Path, name: str = "fig_cell_time"):
    """One stacked bar per cell: its start (the launcher's request to the cell's start in its worker), then each part
    of its wall time (TIME_PARTS), then what no part covers; the measured steps are the cell's point, the rest the
    harness's cost."""
    parts = time_parts(cells)
    if parts is None:
        return None, []
    cols = ["start", *TIME_PARTS, "other"]
    palette = iter(["tab:blue", "tab:orange", "tab:olive", "tab:green", "tab:purple", "tab:cyan", "tab:brown",
                    "tab:pink", "lightsteelblue"])
    colors = {c: "0.45" if c == "start" else "0.85" if c == "other" else "tab:red" if c == "steps" else next(palette)
              for c in cols}
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(FULL_WIDTH, 0.9 + 0.16 * len(parts)), constrained_layout=True)
        y = np.arange(len(parts))
        left = np.zeros(len(parts))
        for c in cols:
            vals = parts[c].to_numpy(dtype=float)
            ax.barh(y, vals, left=left, color=colors[c], label=c, height=0.8, gid=c)
            left += vals
        ax.set_yticks(y, parts.index.tolist())
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title("where each cell's time went: start, then its parts (steps: the measured steps)")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", frameon=False)
        ax.grid(axis="y", visible=False)
        paths = _save(fig, out, name)
    return fig, paths


def fig_plan(cmp: pd.DataFrame, out: Path, name: str = "fig_plan"):
    """The plan's prediction (``run_bench.py plan``) against what each cell then measured: wall time and peak
    memory, one point per cell on log axes, the diagonal and a band of +-20% around it."""
    if cmp is None or cmp.empty:
        return None, []
    panels = [("wall_s", "cell wall time (s)"), ("memory_mib", f"peak memory (MiB, {cmp['memory_column'].iloc[0]})")]
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 3.0), constrained_layout=True)
        for ax, (q, label) in zip(axes, panels):
            d = cmp[[f"measured_{q}", f"predicted_{q}"]].dropna()
            d = d[(d > 0).all(axis=1)]
            if d.empty:
                ax.set_visible(False)
                continue
            x, y = d[f"measured_{q}"].to_numpy(float), d[f"predicted_{q}"].to_numpy(float)
            lo, hi = min(x.min(), y.min()) / 1.3, max(x.max(), y.max()) * 1.3
            line = np.geomspace(lo, hi, 50)
            ax.fill_between(line, line * 0.8, line * 1.2, color="0.9", label="within 20%", gid="band")
            ax.plot(line, line, color="0.5", lw=0.8, gid="diagonal")
            ax.scatter(x, y, s=12, color="tab:blue", zorder=3, gid="cells", label="a cell")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xlabel(f"measured {label}")
            ax.set_ylabel(f"predicted {label}")
            err = np.abs(100 * (y - x) / x)
            ax.set_title(f"|error| median {np.median(err):.1f}%, largest {err.max():.1f}%")
        axes[0].legend(loc="upper left", frameon=False)
        paths = _save(fig, out, name)
    return fig, paths
