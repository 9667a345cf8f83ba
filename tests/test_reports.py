"""Reports: rendered from parquet alone; every number checked against pandas aggregates computed here."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.results import write_cell

REPO = Path(__file__).resolve().parents[1]
METHODS = ["bptt_m", "rate_m", "rate_s"]


def make_results(root: Path, seeds=(0, 1, 2), failed=True, gpu=False) -> pd.DataFrame:
    """A results folder written with pandas alone: known numbers, several seeds, a failed cell."""
    rng = np.random.default_rng(0)
    rows = []
    for m in METHODS:
        for T in (1, 2, 4):
            for s in seeds:
                key = f"{m}-{T}-{s}"
                r = {"key": key, "status": "ok", "error": None, "method": m, "arch": "cnn_digits", "dataset": "digits", "T": T,
                     "seed": s, "kind": "train", "grid": "synthetic", "method_options": "{}",
                     "acc_top1": float(rng.uniform(80, 99)), "epoch_time_s": float(rng.uniform(0.1, 2) * T),
                     "step_time_ms_median": float(rng.uniform(5, 20) * T), "forward_ms": float(rng.uniform(1, 5) * T),
                     "backward_ms": float(rng.uniform(1, 5) * T), "optimizer_ms": float(rng.uniform(0.1, 1)),
                     "peak_rss_mib": float(rng.uniform(800, 900)), "saved_for_backward_mib": float(T if m == "bptt_m" else 1.0),
                     "footprint_mib": float(rng.uniform(1, 5) * T),
                     "peak_alloc_mib": float(rng.uniform(50, 100) * T) if gpu else None,
                     "peak_nvml_mib": float(rng.uniform(500, 600) * T) if gpu else None,
                     "gpu_null_reason": None if gpu else "not a CUDA device", "torch_version": "2.x", "host": "h",
                     "start_time": "2026-01-01T00:00:00+00:00"}
                epochs = [{"epoch": e, "test_acc": float(rng.uniform(50, 99)), "train_loss": float(rng.uniform(0.1, 2))} for e in (1, 2, 3)]
                samples = [{"source": "rss", "t_s": t / 10, "mib": 800.0 + t} for t in range(5)]
                write_cell(root, key, r, epochs, samples)
                rows.append(r)
    if failed:
        write_cell(root, "bad", {"key": "bad", "status": "oom", "error": "CUDA out of memory: tried", "method": "rate_m",
                                 "arch": "cnn_digits", "dataset": "digits", "T": 8, "seed": 0, "kind": "train", "grid": "synthetic",
                                 "method_options": "{}"})
    return pd.DataFrame(rows)


@pytest.fixture
def results(tmp_path):
    df = make_results(tmp_path / "res")
    return tmp_path / "res", df


def test_render_without_torch_bench_or_methods(results):
    root, _ = results
    code = ("import sys\n"
            "for m in ('torch', 'bench', 'methods'):\n"
            "    sys.modules[m] = None  # any import of them now fails\n"
            "from reports import render_report\n"
            f"r = render_report({str(root)!r})\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
            "print(r['index'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = root / "report"
    for name in ("fig_cost", "fig_phases", "fig_memory_time", "fig_curves"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").exists()
    for name in ("table_accuracy.tex", "table_cost.tex", "table_reference.tex", "summary.md", "index.html"):
        assert (out / name).exists()
    page = (out / "index.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")


def test_cost_figure_values_equal_pandas_aggregates(results, tmp_path):
    from reports.figures import fig_cost

    root, df = results
    from reports.results import load_results

    fig, _ = fig_cost(load_results(root), tmp_path)
    acc_ax, mem_ax, time_ax = fig.axes[:3]
    for ax, col in ((acc_ax, "acc_top1"), (mem_ax, "saved_for_backward_mib"), (time_ax, "epoch_time_s")):
        want = df.groupby(["method", "T"])[col].agg(["mean", "std"])
        seen = 0
        for cont in ax.containers:
            line = cont.lines[0]
            label = cont.get_label()
            xs, ys = line.get_xdata(), line.get_ydata()
            for x, y in zip(xs, ys):
                assert y == pytest.approx(want.loc[(label, x), "mean"], rel=1e-12)
                seen += 1
            # error bars: +- std over the 3 seeds
            seg = cont.lines[2][0].get_segments()
            for (x0, y0), (x1, y1) in (s for s in seg):
                assert (y1 - y0) / 2 == pytest.approx(want.loc[(label, x0), "std"], rel=1e-9)
        assert seen == len(METHODS) * 3
    # on a CPU the memory panel shows the bytes saved for backward, labelled so (RSS is mostly the torch import)
    assert "saved for backward" in mem_ax.get_ylabel() and "[MiB]" in mem_ax.get_ylabel()
    assert "[s]" in time_ax.get_ylabel() and "[%]" in acc_ax.get_ylabel()


def test_phase_bars_equal_means(results, tmp_path):
    from reports.figures import fig_phases
    from reports.results import load_results

    root, df = results
    fig, _ = fig_phases(load_results(root), tmp_path)
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 9) for p in ax.patches)
    want = sorted(round(v, 9) for c in ("forward_ms", "backward_ms", "optimizer_ms") for v in df.groupby(["method", "T"])[c].mean())
    assert heights == want


def _tex_rows(text):
    return [[c.strip() for c in line.rstrip("\\ ").split("&")] for line in text.splitlines()
            if "&" in line and not line.startswith(("Method", "%"))]


def test_accuracy_table_equals_pandas(results):
    from reports import render_report

    root, df = results
    render_report(root)
    text = (root / "report" / "table_accuracy.tex").read_text()
    assert r"\toprule" in text and r"\bottomrule" in text and r"bptt\_m" in text
    g = df.groupby(["method", "arch", "T"])["acc_top1"].agg(["mean", "std"])
    best = g["mean"].max()
    rows = _tex_rows(text)
    assert len(rows) == len(g)
    for method, arch, T, cell in rows:
        m = method.replace(r"\_", "_")
        mean, std = g.loc[(m, arch.replace(r"\_", "_"), int(T))]
        bold = cell.startswith(r"\textbf{")
        nums = [float(x) for x in re.findall(r"\d+\.\d+", cell)]
        assert nums == [round(mean, 2), round(std, 2)]
        assert bold == (mean == best)


def test_cost_table_ratios_equal_pandas(results):
    from reports import render_report

    root, df = results
    render_report(root)
    rows = _tex_rows((root / "report" / "table_cost.tex").read_text())
    cols = ["saved_for_backward_mib", "footprint_mib", "step_time_ms_median", "epoch_time_s"]
    means = df.groupby(["method", "T"])[cols].mean()
    assert len(rows) == len(means)
    for r in rows:
        m, T = r[0].replace(r"\_", "_"), int(r[3])
        for i, col in enumerate(cols):
            v, ratio = r[4 + 2 * i], r[5 + 2 * i]
            want = means.loc[(m, T), col]
            assert v == f"{want:.{len(v.split('.')[1])}f}"  # the printed value is the aggregate, rounded
            assert ratio == f"{want / means.loc[('bptt_m', T), col]:.2f}"


def test_published_column_when_reference_matches(results, tmp_path):
    from reports import render_report

    root, df = results
    ref = tmp_path / "ref.csv"
    ref.write_text("method,arch,dataset,T,acc_top1,source,note\nrate_m,cnn_digits,digits,4,97.5,a test source,\n")
    render_report(root, reference=ref)
    text = (root / "report" / "table_accuracy.tex").read_text()
    assert r"digits (published)" in text
    row = [r for r in _tex_rows(text) if r[0] == r"rate\_m" and r[2] == "4"][0]
    assert row[-1] == "97.50"


def test_failed_cells_missing_gpu_single_seed_still_render(tmp_path):
    from reports import render_report

    make_results(tmp_path / "res", seeds=(0,), failed=True, gpu=False)
    r = render_report(tmp_path / "res")
    summary = Path(r["summary"]).read_text()
    assert "rate_m cnn_digits digits T=8 seed=0 is missing: status oom" in summary
    assert "no values for peak_alloc_mib, peak_reserved_mib, peak_nvml_mib: not a CUDA device" in summary
    assert "one seed per configuration" in summary
    assert r"\pm" not in (tmp_path / "res" / "report" / "table_accuracy.tex").read_text()


def test_profile_grid_without_accuracy_renders(tmp_path):
    from reports.figures import fig_cost

    df = make_results(tmp_path / "res", seeds=(0,), failed=False, gpu=True)
    df = df.assign(kind="profile", acc_top1=None, epoch_time_s=None)
    fig, _ = fig_cost(df, tmp_path)
    assert "no accuracy" in fig.axes[0].texts[0].get_text()
    assert "NVML" in fig.axes[1].get_ylabel()
    assert "per step [ms]" in fig.axes[2].get_ylabel()


def test_method_colour_is_the_same_everywhere():
    from reports.aggregate import style

    assert style("rate_m") == style("rate_m") and style("rate_m")[0] != style("bptt_m")[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_tables_compile_with_pdflatex(results, tmp_path):
    from reports import render_report

    root, _ = results
    render_report(root)
    doc = tmp_path / "doc.tex"
    rep = (root / "report").as_posix()
    doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[utf8]{inputenc}\\begin{document}\n"
                   + "".join(f"\\input{{{rep}/{t}}}\n\n" for t in ("table_accuracy.tex", "table_cost.tex", "table_reference.tex"))
                   + "\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]


def test_report_and_check_survive_foreign_files(tmp_path):
    """A results folder holding a schema-1 file, a string where a number belongs, a NaN T (pandas 3 reads such a
    column as float) and an architecture whose name contains '/': `report` and `check` end without a traceback,
    warn about what they skip or coerce, and draw the rest."""
    from reports.results import SCHEMA_VERSION

    from .helpers import cli

    root = tmp_path / "res"
    make_results(root, seeds=(0,), failed=False)
    cells = root / "cells"
    base = pd.read_parquet(next(cells.glob("bptt_m-1-0.parquet")))
    old = base.drop(columns=["schema_version"]).assign(key="old", T=8)  # schema 1: no version, no fingerprint
    old.to_parquet(cells / "old.parquet")
    base.assign(key="str", T=6, step_time_ms_median="fast").to_parquet(cells / "str.parquet")
    base.assign(key="nan", T=float("nan")).to_parquet(cells / "nan.parquet")
    base.assign(key="slash", arch="conv/net", dataset="digits/v2").to_parquet(cells / "slash.parquet")
    base.assign(key="slash2", T=2, arch="conv/net", dataset="digits/v2").to_parquet(cells / "slash2.parquet")
    base.assign(key="new", schema_version=SCHEMA_VERSION + 5).to_parquet(cells / "new.parquet")
    r = cli("report", str(root))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "'step_time_ms_median' holds 1 value(s) that are not numbers" in r.stderr
    assert "nan.parquet: column 'T' holds null" in r.stderr and "new.parquet: schema version" in r.stderr
    assert list((root / "report").glob("fig_cost_conv-net_digits-v2.png"))  # a file name, not a folder
    r = cli("check", "--baseline", str(root), "--results", str(root))
    assert r.returncode == 0 and "Traceback" not in r.stderr and "gate passed" in r.stdout, r.stdout + r.stderr


def test_timings_under_contention_are_flagged(tmp_path):
    """Cells measured while other processes used the CPUs: a note names the worst, the cost table marks their
    times with a dagger, the time panel draws them hollow; quiet cells stay as they are."""
    from reports import render_report
    from reports.figures import fig_cost
    from reports.results import load_results

    root = tmp_path / "res"
    make_results(root, seeds=(0,), failed=False)
    for p in (root / "cells").glob("*.parquet"):
        d = pd.read_parquet(p)
        busy = d["method"].iloc[0] == "rate_m" and d["T"].iloc[0] == 4
        d.assign(contention_cpu_frac=0.45 if busy else 0.01, contention_cpu_s=1.0).to_parquet(p)
    r = render_report(root)
    summary = Path(r["summary"]).read_text()
    assert "timings of 1 cell(s) were measured while other processes used more than 10% of the CPUs" in summary
    assert "worst: rate_m cnn_digits digits T=4 seed=0, 45% of the CPUs" in summary
    rows = [l for l in summary.splitlines() if l.startswith("| rate_m ") or l.startswith("| bptt_m ")]
    marked = [l for l in rows if "†" in l]
    assert len(marked) == 1 and "| rate_m " in marked[0] and "| 4 " in marked[0]
    assert r"\textsuperscript{\dag}" in (root / "report" / "table_cost.tex").read_text()
    fig, _ = fig_cost(load_results(root), tmp_path)
    hollow = [l for l in fig.axes[2].lines if l.get_gid() == "contended"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [4] and hollow[0].get_markerfacecolor() == "white"
    assert not [l for l in fig.axes[1].lines if l.get_gid() == "contended"]


@pytest.mark.slow
def test_cpu_memory_panel_shows_how_memory_scales_in_t(tmp_path):
    """A real CPU run of the default grid's cells (shortened): the memory panel plots the bytes saved for backward,
    so bptt_m grows with T (T=4 / T=1 >= 2, half of linear) while rate_m and ottt_a stay flat (<= 1.1)."""
    from reports.figures import fig_cost
    from reports.results import load_results

    from .helpers import cli

    out = tmp_path / "res"
    r = cli("run", "default", "--out", str(out), "--device", "cpu", "--filter", "method=bptt_m,rate_m,ottt_a",
            "--filter", "T=1,4", "--set", "epochs=1", "--set", "train_subset=64", "--set", "warmup_steps=0")
    assert r.returncode == 0, r.stderr
    fig, _ = fig_cost(load_results(out), tmp_path)
    ax = fig.axes[1]
    assert ax.get_ylabel() == "bytes saved for backward [MiB]"
    ratio = {}
    for c in ax.containers:
        xs, ys = list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())
        ratio[c.get_label()] = ys[xs.index(4)] / ys[xs.index(1)]
    assert ratio["bptt_m"] >= 2.0 and ratio["rate_m"] <= 1.1 and ratio["ottt_a"] <= 1.1, ratio


def test_html_tables_hold_the_markdown_tables_cells(results):
    """index.html's tables (tabulate's HTML) carry the same cells as summary.md's, bold where markdown is bold."""
    from html.parser import HTMLParser

    from reports import render_report

    root, _ = results
    r = render_report(root)

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.bold, self._in = [], 0, False

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            self._in = tag in ("td", "th") or (self._in and tag == "b")
            self.bold += tag == "b"

        def handle_data(self, data):
            if self._in and data.strip():
                self.rows[-1].append(data.strip())

    p = Cells()
    p.feed(Path(r["index"]).read_text())
    md = Path(r["summary"]).read_text()
    md_rows = [[c.strip().strip("*") for c in l.strip().strip("|").split("|")] for l in md.splitlines()
               if l.startswith("|") and not l.startswith("|--") and "field" not in l]
    html_rows = [row for row in p.rows if row and len(row) > 2]
    assert html_rows[:len(md_rows)] == md_rows[:len(html_rows)] and len(md_rows) >= 10
    assert p.bold == md.count("**") // 2


def test_labels_come_from_the_metric_table(results, tmp_path, monkeypatch):
    """Renaming a metric's label in the one table renames the figure axis and the cost table header."""
    from dataclasses import replace

    from reports import results as store
    from reports import tables
    from reports.figures import fig_cost
    from reports.results import load_results

    root, _ = results
    m = store.METRIC["step_time_ms_median"]
    monkeypatch.setitem(store.METRIC, "step_time_ms_median", replace(m, label="duration of one step"))
    monkeypatch.setitem(store.METRIC, "saved_for_backward_mib", replace(store.METRIC["saved_for_backward_mib"],
                                                                        label="kept for the backward pass"))
    cells = load_results(root)
    fig, _ = fig_cost(cells.assign(kind="profile"), tmp_path)
    assert fig.axes[2].get_ylabel() == "duration of one step [ms]"
    assert fig.axes[1].get_ylabel() == "kept for the backward pass [MiB]"
    header = tables.cost_markdown(*tables.cost_table(cells)).splitlines()[0]
    assert "duration of one step [ms]" in header and "kept for the backward pass [MiB]" in header


def test_memory_over_time_has_a_panel_and_a_time_axis_per_method(tmp_path):
    """Each method's largest-T cell in its own panel, its x axis spanning its own samples: a short cell is not a
    sliver on a long one's axis."""
    from reports.figures import fig_memory_time
    from reports.results import load_results

    root = tmp_path / "res"
    make_results(root, seeds=(0,), failed=False)
    long = [{"source": "rss", "t_s": float(t), "mib": 800.0 + t} for t in range(0, 151, 10)]
    cells = load_results(root)
    key = cells[(cells["method"] == "rate_m") & (cells["T"] == 4)]["key"].iloc[0]
    write_cell(root, key, cells[cells["key"] == key].iloc[0].to_dict(), None, long)
    fig, _ = fig_memory_time(load_results(root), load_results(root, "samples"), tmp_path)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {f"{m}, T=4" for m in METHODS}
    for title, ax in axes.items():
        xs = ax.lines[0].get_xdata()
        lo, hi = ax.get_xlim()
        assert lo <= min(xs) and hi >= max(xs) and hi - lo <= 1.2 * (max(xs) - min(xs)), title
    assert max(axes["rate_m, T=4"].lines[0].get_xdata()) == 150.0 and max(axes["bptt_m, T=4"].lines[0].get_xdata()) == 0.4


def test_memory_over_time_shows_power_below_memory_where_read(tmp_path):
    """Power readings stored beside the memory samples give each method a power panel under its memory panel,
    on the same time axis; the values drawn are the stored watts."""
    from reports.figures import fig_memory_time
    from reports.results import load_results

    root = tmp_path / "res"
    make_results(root, seeds=(0,), failed=False)
    cells = load_results(root)
    watts = {}
    for i, (key, row) in enumerate(cells[cells["T"] == 4].set_index("key").iterrows()):
        watts[row["method"]] = [100.0 + 10 * i + t for t in range(5)]
        samples = ([{"source": "rss", "t_s": float(t), "mib": 500.0 + t} for t in range(5)]
                   + [{"source": "power", "t_s": float(t) + 0.5, "w": w} for t, w in enumerate(watts[row["method"]])])
        write_cell(root, key, {**row.to_dict(), "key": key, "energy_source": "nvml power"}, None, samples)
    fig, _ = fig_memory_time(load_results(root), load_results(root, "samples"), tmp_path)
    memory = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(memory) == {f"{m}, T=4" for m in METHODS}
    power = [ax for ax in fig.axes if ax.lines and ax.lines[0].get_label().endswith("power")]
    assert len(power) == len(METHODS) and "power [W]" in power[0].get_ylabel() + "".join(a.get_ylabel() for a in power)
    for ax in power:
        method = ax.lines[0].get_label().split()[0]
        assert list(ax.lines[0].get_ydata()) == watts[method]
        assert ax.get_shared_x_axes().joined(ax, memory[f"{method}, T=4"])


def test_a_combination_with_one_cell_is_a_table_row_not_a_figure(tmp_path):
    """hm2bp on its own MLP is one cell in the default grid: the report gives it a row of the single-cell table and
    draws no cost figures of single points for it; the other combination keeps its figures."""
    from reports import render_report

    root = tmp_path / "res"
    make_results(root, seeds=(0,), failed=False)
    write_cell(root, "hm2", {"key": "hm2", "status": "ok", "method": "hm2bp", "arch": "hm2_mlp", "dataset": "digits",
                             "T": 100, "seed": 0, "kind": "train", "grid": "synthetic", "method_options": "{}",
                             "acc_top1": 91.25, "epoch_time_s": 3.5, "saved_for_backward_mib": 0.5})
    rep = render_report(root)
    assert not list((root / "report").glob("fig_cost_hm2_mlp*")) and list((root / "report").glob("fig_cost_cnn_digits*"))
    md = rep["summary"].read_text()
    section = md.split("### Configurations with a single cell", 1)[1]
    row = next(ln for ln in section.splitlines() if ln.startswith("| hm2bp"))
    assert "hm2_mlp" in row and "100" in row and "91.25" in row and "3.50" in row


def test_cell_time_bars_and_the_share_line_are_the_stored_parts(tmp_path):
    """fig_cell_time stacks each cell's start and parts as stored, with what no part covers as 'other'; summary.md's
    line is the measured steps' share of the cells' start plus wall time, computed here by hand."""
    from reports import figures, render_report
    from reports.results import TIME_PARTS, load_results

    parts = {p: 0.01 * (i + 1) for i, p in enumerate(TIME_PARTS)}  # 0.01 .. 0.09 s: 0.45 s in all
    rows = [{"key": f"k{i}", "status": "ok", "method": "bptt_m", "arch": "cnn_digits", "dataset": "digits", "T": 1 + i,
             "seed": 0, "kind": "profile", "grid": "g", "method_options": "{}", "time_start_s": 0.5 * i,
             "cell_wall_s": 0.5 * (i + 1), **{f"time_{p}_s": v * (i + 1) for p, v in parts.items()}}
            for i in range(2)]  # walls 0.5 and 1.0 s over parts of 0.45 and 0.9 s: 0.05 and 0.1 s in none
    for r in rows:
        write_cell(tmp_path / "res", r["key"], r)
    fig, _ = figures.fig_cell_time(load_results(tmp_path / "res"), out=tmp_path / "fig")
    widths: dict[str, list[float]] = {}
    for bar in fig.axes[0].patches:
        widths.setdefault(bar.get_gid(), []).append(round(bar.get_width(), 9))
    assert widths["start"] == [0.0, 0.5]
    assert widths["steps"] == [round(parts["steps"], 9), round(2 * parts["steps"], 9)]
    assert widths["other"] == [0.05, 0.1]
    render_report(tmp_path / "res")
    summary = (tmp_path / "res" / "report" / "summary.md").read_text()
    total = 0.0 + 0.5 + 0.5 + 1.0  # starts and walls
    steps = 3 * parts["steps"]  # 1x and 2x
    assert f"Measured steps: {100 * steps / total:.1f}% of the grid's wall time ({total:.1f} s over 2 cell(s)" in summary
    assert "fig_cell_time.png" in summary


def test_cell_time_figure_is_left_out_without_parts(results):
    from reports import figures, render_report
    from reports.results import load_results

    root, _ = results
    assert figures.fig_cell_time(load_results(root), out=root / "x") == (None, [])
    render_report(root)
    assert "no cell stored where its time went" in (root / "report" / "summary.md").read_text()
