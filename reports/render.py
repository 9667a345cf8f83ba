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
from .aggregate import contended, harness_share, has, memory_column, ok, plan_vs_measured
from .results import CONTENTION_LIMIT
from .results import KINDS, load_results, read_plan

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
    if not has(good, "energy_per_step_j") and not good.empty:
        reasons = sorted(set(good["energy_null_reason"].dropna())) if "energy_null_reason" in good else []
        notes.append("no training energy measured" + (f": {'; '.join(reasons)}" if reasons else "")
                     + " (energy comes from NVML's counter or power readings on a GPU, RAPL on a CPU)")
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


SECTION_TEXT = {
    "cost": "",
    "fidelity": "Fidelity cells (kind = \"fidelity\") compare a method's weight gradient, scaled to BPTT's (rate-BP: "
                "x T), with its reference's (bptt_m, or bptt_s for single-step methods) on identical weights and "
                "batches: cosine similarity and norm ratio over all conv and linear weights, mean ± std over the "
                "batches, at initialisation and with the weights a train cell kept.",
    "memory": "The bytes autograd saves for backward at their peak in one training step, by the module that saved "
              "them and by the kind of tensor (spike: a spiking layer's output; rate: its output in rate-BP's rate "
              "pass; membrane: kept for the surrogate gradient; eligibility: rate-BP's local derivative; activation: "
              "the rest).",
    "behaviour": "After the last epoch, on the evaluation set: each spiking layer's firing rate; the accuracy when the "
                 "network answers after its first t steps; for event data, the accuracy with the frames permuted in "
                 "time (the paper's Table 2).",
    "harness": "Each cell's start (from the launcher's request to the cell's start in its worker) and its wall time by "
               "part: device set-up, data, model, warm-up steps, measured steps, meters, evaluation, checkpoints, "
               "storing; what no part covers is 'other'. Everything but the measured steps is the harness's cost.",
    "plan": "What `run_bench.py plan` predicted for each cell before it ran (plan.parquet) against what the cell then "
            "measured: wall time, step time, bytes saved for backward and peak memory, with the error in percent of "
            "the measured. How far the last plan was off is how far to trust the next one on this machine.",
}
SECTION_EMPTY = {
    "fidelity": "no fidelity cells in these results (a grid adds them with kind = \"fidelity\"; see grids/default.toml)",
    "memory": "no saved-bytes breakdown stored (profile and train cells store one)",
    "behaviour": "no train cell with an evaluation set stored its behaviour over time steps",
    "harness": "no cell stored where its time went (results from before time_<part>_s were measured)",
    "plan": "no plan of these cells in this folder (run_bench.py plan GRID --out DIR, before the run, writes one)",
}


def render_report(results: str | Path, out: str | Path | None = None, reference: str | Path | None = None,
                  history: str | Path | None = None) -> dict:
    """Render ``results/report/`` (or ``out``) and return {"index": path, "summary": path, "files": [...]}.
    Reads parquet only."""
    results = Path(results)
    out = Path(out) if out else results / "report"
    out.mkdir(parents=True, exist_ok=True)
    cells = load_results(results, "cells")
    frames = {k: load_results(results, k) for k in KINDS if k != "cells"}
    # the cost figures and tables are of the cells that train or profile; fidelity cells have their own section
    trained = cells[cells["kind"] != "fidelity"] if "kind" in cells else cells
    files: list[Path] = []
    figs: dict[str, list[tuple[str, Path]]] = {k: [] for k in figures.SECTIONS}
    if not cells.empty:
        combos = ok(cells)[["arch", "dataset"]].drop_duplicates().values.tolist() if "arch" in cells else []
        multi = len(combos) > 1
        for arch, ds in combos or [(None, None)]:
            sel = cells if arch is None else cells[(cells["arch"] == arch) & (cells["dataset"] == ds)]
            sel_trained = trained if arch is None else trained[(trained["arch"] == arch) & (trained["dataset"] == ds)]
            suffix = re.sub(r"[^A-Za-z0-9._-]+", "-", f"_{arch}_{ds}") if multi else ""  # a file name, whatever the names
            title = f"{arch} on {ds}" if arch else ""
            for name, (fn, needs, section) in figures.FIGURES.items():
                if section == "cost" and combos and len(ok(sel_trained)) <= 1:
                    continue  # one cell: a row of the single-cell table, not a figure of single points
                fig, paths = fn(sel_trained if section == "cost" else sel, *(frames[n] for n in needs), out=out,
                                name=name + suffix)
                if fig is None:
                    continue
                plt.close(fig)
                files += paths
                figs[section].append((f"{name.replace('fig_', '').replace('_', ' ')} {title}".strip(), paths[0]))
    planned = plan_vs_measured(read_plan(results), cells) if not cells.empty else None
    fig, paths = figures.fig_plan(planned, out=out)
    if fig is not None:
        plt.close(fig)
        files += paths
        figs["plan"].append(("plan against measurement", paths[0]))
    plan_table = tables.plan_cells(planned)
    ref = tables.load_reference(reference)
    acc = tables.accuracy_table(trained, ref) if not trained.empty else pd.DataFrame()
    cost, mem_label = tables.cost_table(trained) if not trained.empty else (pd.DataFrame(), None)
    fidelity = tables.fidelity_cells(cells, frames["fidelity"]) if not cells.empty else ([], [])
    shuffle = tables.shuffle_cells(trained, frames["anytime"]) if not trained.empty else ([], [])
    single = tables.single_cells(trained) if not trained.empty else ([], [])
    extra = {  # (header, body), what to say when it is empty, the LaTeX comment
        "fidelity": (fidelity, "no fidelity cells: no fidelity table",
                     "gradient fidelity: cosine and norm ratio (scaled method gradient / reference gradient) over all "
                     "conv and linear weights, mean and std over batches and seeds"),
        "shuffle": (shuffle, "no event-data train cell: no temporal-shuffle table",
                    "accuracy with the input frames in order and permuted in time at inference (the paper's Table 2), "
                    "mean and std over the permutations"),
    }
    for name, text in (("table_accuracy.tex", tables.accuracy_latex(acc)), ("table_cost.tex", tables.cost_latex(cost, mem_label)),
                       ("table_reference.tex", tables.reference_latex(ref)),
                       *((f"table_{k}.tex", tables.as_latex(*hb, comment, empty)) for k, (hb, empty, comment) in extra.items())):
        (out / name).write_text(text)
        files.append(out / name)
    notes = _notes(trained)
    env = _environment(cells)
    grid = ", ".join(sorted(set(cells["grid"].dropna()))) if "grid" in cells else results.name
    n_ok = int((cells["status"] == "ok").sum()) if "status" in cells else 0
    md = [f"# snnbench report: {grid or results.name}", "",
          f"{len(cells)} cell(s), {n_ok} ok, {len(cells) - n_ok} failed or missing.", ""]
    share = _share_line(cells)
    md += ([share, ""] if share else []) + ["## Notes", ""]
    md += [f"- {n}" for n in notes] + [""]
    for key, title in figures.SECTIONS.items():
        md += [f"## {title}", ""] + ([SECTION_TEXT[key], ""] if SECTION_TEXT[key] else [])
        if key == "cost":
            md += ["### Accuracy (top-1 %)", "", tables.accuracy_markdown(acc), "### Training cost", "",
                   tables.cost_markdown(cost, mem_label)]
            if single[1]:
                md += ["### Configurations with a single cell", "", tables.as_markdown(*single, "")]
        elif key == "fidelity":
            md += ["### All-weights gradient cosine and norm ratio", "", tables.as_markdown(*fidelity, extra["fidelity"][1])]
        elif key == "behaviour" and shuffle[1]:
            md += ["### Temporal shuffle", "", tables.as_markdown(*shuffle, "")]
        elif key == "plan" and plan_table[1]:
            md += [plan_table[2], "", tables.as_markdown(*plan_table[:2], "")]
        if not figs[key] and key in SECTION_EMPTY:
            md += [f"_{SECTION_EMPTY[key]}_", ""]
        md += [f"![{caption}]({png.name})" for caption, png in figs[key]] + [""]
    md += ["## Environment", ""]
    md.append(tabulate(env, headers=["field", "value"], tablefmt="github") if env else "_none stored_")
    summary = out / "summary.md"
    summary.write_text("\n".join(md) + "\n")
    files.append(summary)
    index = out / "index.html"
    link = None
    if history is not None:
        link = os.path.relpath(Path(history).resolve() / "history.html", out.resolve())
    index.write_text(_html(grid or results.name, notes, figs, acc, cost, mem_label, env, link,
                           {"fidelity": fidelity, "shuffle": shuffle, "single": single, "share": share,
                            "plan": plan_table}))
    files.append(index)
    return {"index": index, "summary": summary, "files": files}


def _share_line(cells: pd.DataFrame) -> str | None:
    """summary.md's line on the harness's own share of the grid's time, or None where no cell stored its parts."""
    share = harness_share(cells)
    if share is None:
        return None
    return (f"Measured steps: {100 * share['steps']:.1f}% of the grid's wall time ({share['total_s']:.1f} s over "
            f"{share['cells']} cell(s), each from the launcher's request to its row); starting the cells: "
            f"{100 * share['start']:.1f}%; the rest is the harness's work inside the cells (fig_cell_time).")


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(title, notes, figs, acc, cost, mem_label, env, history_link: str | None = None, extra: dict | None = None) -> str:
    esc = html.escape
    extra = extra or {}
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>snnbench: {esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border-bottom:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}figure{margin:1em 0}"
        "figcaption{font-size:13px;color:#555}nav a{margin-right:1em}</style></head><body>",
        f"<h1>snnbench report: {esc(title)}</h1>",
        "<nav>" + "".join(f"<a href='#{k}'>{esc(t)}</a>" for k, t in figures.SECTIONS.items()) + "<a href='#environment'>Environment</a></nav>",
        "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>",
        f"<p><a href='{esc(history_link)}'>Step time and memory over commits</a></p>" if history_link else "",
    ]
    for key, sec_title in figures.SECTIONS.items():
        parts.append(f"<h2 id='{key}'>{esc(sec_title)}</h2>")
        if SECTION_TEXT[key]:
            parts.append(f"<p>{esc(SECTION_TEXT[key])}</p>")
        if key == "cost":
            parts.append("<h3>Accuracy (top-1 %)</h3>" + tables.accuracy_html(acc))
            parts.append("<h3>Training cost</h3>" + tables.cost_html(cost, mem_label))
            if extra.get("single", ([], []))[1]:
                parts.append("<h3>Configurations with a single cell</h3>" + tables.as_html(*extra["single"], ""))
        elif key == "fidelity":
            parts.append("<h3>All-weights gradient cosine and norm ratio</h3>"
                         + tables.as_html(*extra.get("fidelity", ([], [])), "no fidelity cells: no fidelity table"))
        elif key == "behaviour" and extra.get("shuffle", ([], []))[1]:
            parts.append("<h3>Temporal shuffle</h3>" + tables.as_html(*extra["shuffle"], ""))
        elif key == "harness" and extra.get("share"):
            parts.append(f"<p>{esc(extra['share'])}</p>")
        elif key == "plan" and extra.get("plan", ([], [], ""))[1]:
            parts.append(f"<p>{esc(extra['plan'][2])}</p>" + tables.as_html(*extra["plan"][:2], ""))
        if not figs[key] and key in SECTION_EMPTY:
            parts.append(f"<p><em>{esc(SECTION_EMPTY[key])}</em></p>")
        for caption, png in figs[key]:
            parts.append(f"<figure><img alt='{esc(caption)}' src='{_img(png)}'><figcaption>{esc(caption)} "
                         f"({esc(png.name)}, PDF beside it)</figcaption></figure>")
    parts.append("<p>LaTeX: table_accuracy.tex, table_cost.tex, table_reference.tex, table_fidelity.tex, "
                 "table_shuffle.tex (booktabs).</p>")
    parts.append("<h2 id='environment'>Environment</h2><table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in env) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
