"""``render_report(results_dir)``: every figure and table, summary.md and one offline index.html."""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from tabulate import tabulate

from . import figures, tables
from .aggregate import contended, has, memory_column, ok
from .results import CONTENTION_LIMIT
from .results import load_results

ENV_COLUMNS = ["snnbench_version", "git_commit", "torch_version", "cuda_version", "python_version", "gpu_name",
               "nvml_driver", "mig_mode", "cpu_model", "cpu_threads", "host", "start_time"]
GPU_COLUMNS = ["peak_alloc_mib", "peak_reserved_mib", "peak_nvml_mib"]


def _label(r) -> str:
    return f"{r['method']} {r['arch']} {r['dataset']} T={r['T']} seed={r.get('seed')}"


def _notes(cells: pd.DataFrame) -> list[str]:
    """What is missing, said in words instead of drawn as zeros."""
    notes = []
    if cells.empty:
        return ["no cell rows stored"]
    bad = cells[cells["status"] != "ok"] if "status" in cells else cells.iloc[0:0]
    for _, r in bad.iterrows():
        first = str(r.get("error") or "").strip().splitlines()[0] if r.get("error") else ""
        notes.append(f"cell {_label(r)} is missing: status {r['status']}"
                     + (f" ({first})" if first else ""))
    good = ok(cells)
    missing_gpu = [c for c in GPU_COLUMNS if not has(good, c)]
    if missing_gpu:
        reasons = sorted(set(good["gpu_null_reason"].dropna())) if "gpu_null_reason" in good else []
        notes.append(f"no values for {', '.join(missing_gpu)}" + (f": {'; '.join(reasons)}" if reasons else ""))
    mem, label = memory_column(good)
    if mem:
        notes.append(f"memory figures use {mem} ({label}), the best column with values"
                     + ("; on a CPU the process's RSS is mostly the torch import, so the bytes autograd saves for "
                        "backward show how a method's memory scales (footprint_mib, the RSS a cell added above its "
                        "start, is in the cost table)" if mem == "saved_for_backward_mib" else ""))
    if "stale" in good and good["stale"].any():
        st = good[good["stale"].astype(bool)]
        notes.append(f"{len(st)} cell(s) are stale: measured by older code than this folder's last run, kept with "
                     "--reuse-stale (rerun without it to measure them again): "
                     + "; ".join(_label(r) for _, r in st.head(10).iterrows()) + (" ..." if len(st) > 10 else ""))
    busy = contended(good)
    if busy.any():
        b = good[busy]
        worst = b.loc[pd.to_numeric(b.get("contention_cpu_frac"), errors="coerce").fillna(0).idxmax()] \
            if "contention_cpu_frac" in b else b.iloc[0]
        frac = worst.get("contention_cpu_frac")
        notes.append(f"timings of {len(b)} cell(s) were measured while other processes used more than "
                     f"{CONTENTION_LIMIT:.0%} of the CPUs or ran on the GPU (worst: {_label(worst)}"
                     + (f", {float(frac):.0%} of the CPUs" if frac is not None and frac == frac else "")
                     + "): hollow markers in the time panel, † in the cost table; rerun them on a quiet machine")
    if "seed" in good and not good.empty and good.groupby(["method", "arch", "dataset", "T"])["seed"].nunique().max() <= 1:
        notes.append("one seed per configuration: no error bars and no ± in the tables")
    return notes


def _environment(cells: pd.DataFrame) -> list[tuple[str, str]]:
    env = []
    for c in ENV_COLUMNS:
        if c in cells and cells[c].notna().any():
            vals = sorted(set(map(str, cells[c].dropna())))
            env.append((c, ", ".join(vals[:3]) + (f" (+{len(vals) - 3} more)" if len(vals) > 3 else "")))
    if "start_time" in cells and cells["start_time"].notna().any():
        env.append(("first / last cell start", f"{cells['start_time'].min()} / {cells['start_time'].max()}"))
    return env


def render_report(results: str | Path, out: str | Path | None = None, reference: str | Path | None = None,
                  history: str | Path | None = None) -> dict:
    """Render ``results/report/`` (or ``out``) and return {"index": path, "summary": path, "files": [...]}.
    Reads parquet only."""
    results = Path(results)
    out = Path(out) if out else results / "report"
    out.mkdir(parents=True, exist_ok=True)
    cells = load_results(results, "cells")
    epochs = load_results(results, "epochs")
    samples = load_results(results, "samples")
    files: list[Path] = []
    figs = []
    if not cells.empty:
        combos = ok(cells)[["arch", "dataset"]].drop_duplicates().values.tolist() if "arch" in cells else []
        multi = len(combos) > 1
        for arch, ds in combos or [(None, None)]:
            sel = cells if arch is None else cells[(cells["arch"] == arch) & (cells["dataset"] == ds)]
            suffix = re.sub(r"[^A-Za-z0-9._-]+", "-", f"_{arch}_{ds}") if multi else ""  # a file name, whatever the names
            title = f"{arch} on {ds}" if arch else ""
            frames = {"samples": samples, "epochs": epochs}
            for name, (fn, needs) in figures.FIGURES.items():
                fig, paths = fn(sel, *(frames[n] for n in needs), out=out, name=name + suffix)
                plt.close(fig)
                files += paths
                figs.append((f"{name.replace('fig_', '').replace('_', ' ')} {title}".strip(), paths[0]))
    ref = tables.load_reference(reference)
    acc = tables.accuracy_table(cells, ref) if not cells.empty else pd.DataFrame()
    cost, mem_label = tables.cost_table(cells) if not cells.empty else (pd.DataFrame(), None)
    for name, text in (("table_accuracy.tex", tables.accuracy_latex(acc)), ("table_cost.tex", tables.cost_latex(cost, mem_label)),
                       ("table_reference.tex", tables.reference_latex(ref))):
        (out / name).write_text(text)
        files.append(out / name)
    notes = _notes(cells)
    env = _environment(cells)
    grid = ", ".join(sorted(set(cells["grid"].dropna()))) if "grid" in cells else results.name
    n_ok = int((cells["status"] == "ok").sum()) if "status" in cells else 0
    md = [f"# snnbench report: {grid or results.name}", "",
          f"{len(cells)} cell(s), {n_ok} ok, {len(cells) - n_ok} failed or missing.", "", "## Notes", ""]
    md += [f"- {n}" for n in notes] + ["", "## Accuracy (top-1 %)", "", tables.accuracy_markdown(acc),
                                       "## Training cost", "", tables.cost_markdown(cost, mem_label), "## Environment", ""]
    md.append(tabulate(env, headers=["field", "value"], tablefmt="github") if env else "_none stored_")
    summary = out / "summary.md"
    summary.write_text("\n".join(md) + "\n")
    files.append(summary)
    index = out / "index.html"
    link = None
    if history is not None:
        link = os.path.relpath(Path(history).resolve() / "history.html", out.resolve())
    index.write_text(_html(grid or results.name, notes, figs, acc, cost, mem_label, env, out, link))
    files.append(index)
    return {"index": index, "summary": summary, "files": files}


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(title, notes, figs, acc, cost, mem_label, env, out: Path, history_link: str | None = None) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>snnbench: {esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border-bottom:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}figure{margin:1em 0}"
        "figcaption{font-size:13px;color:#555}</style></head><body>",
        f"<h1>snnbench report: {esc(title)}</h1>",
        "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>",
        f"<p><a href='{esc(history_link)}'>Step time and memory over commits</a></p>" if history_link else "",
        "<h2>Figures</h2>",
    ]
    for caption, png in figs:
        parts.append(f"<figure><img alt='{esc(caption)}' src='{_img(png)}'><figcaption>{esc(caption)} "
                     f"({esc(png.name)}, PDF beside it)</figcaption></figure>")
    parts.append("<h2>Accuracy (top-1 %)</h2>" + tables.accuracy_html(acc))
    parts.append("<h2>Training cost</h2>" + tables.cost_html(cost, mem_label))
    parts.append("<p>LaTeX: table_accuracy.tex, table_cost.tex, table_reference.tex (booktabs).</p>")
    parts.append("<h2>Environment</h2><table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in env) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
