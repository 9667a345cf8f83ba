"""LaTeX (booktabs) and markdown (tabulate) tables from a results DataFrame."""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from .aggregate import contended, has, memory_column, method_order, ok, over_seeds, with_labels
from .results import METRIC

REFERENCE_CSV = Path(__file__).with_name("reference.csv")
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(s))


def load_reference(path: Path | None = None) -> pd.DataFrame:
    p = Path(path) if path else REFERENCE_CSV
    if not p.exists():
        return pd.DataFrame(columns=["method", "arch", "dataset", "T", "acc_top1", "source", "note"])
    ref = pd.read_csv(p, comment="#")
    ref["T"] = pd.to_numeric(ref["T"], errors="coerce")
    return ref


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "--"
    s = f"{mean:.{digits}f}"
    if n > 1 and std == std:
        s += f" ± {std:.{digits}f}"
    return s


# --------------------------------------------------------------------------- accuracy (Table 1 layout)


def accuracy_table(df: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows method / arch / T, a column per dataset: mean and std over seeds of ``acc_top1``;
    published numbers (exact method, arch, dataset, T match) in extra ``<dataset> (published)`` columns."""
    d = with_labels(ok(df))
    agg = over_seeds(d, ["label", "arch", "T", "dataset"], "acc_top1")
    if agg.empty:
        return pd.DataFrame()
    rows = []
    datasets = sorted(agg["dataset"].unique())
    for (label, arch, T), g in agg.groupby(["label", "arch", "T"]):
        r = {"method": label, "arch": arch, "T": int(T)}
        for ds in datasets:
            a = g[g["dataset"] == ds]
            r[ds] = (float(a["mean"].iloc[0]), float(a["std"].iloc[0]), int(a["n"].iloc[0])) if len(a) else None
        if reference is not None and not reference.empty:
            for ds in datasets:
                m = reference[(reference["method"] == label) & (reference["arch"] == arch) & (reference["dataset"] == ds)
                              & (reference["T"] == T)]
                if len(m):
                    r[f"{ds} (published)"] = (float(m["acc_top1"].iloc[0]), str(m["source"].iloc[0]))
        rows.append(r)
    out = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(method_order(out["method"]))}
    return out.sort_values(["method", "arch", "T"], key=lambda s: s.map(order) if s.name == "method" else s).reset_index(drop=True)


def _best(col: pd.Series) -> float | None:
    means = [v[0] for v in col if isinstance(v, tuple) and len(v) == 3]
    return max(means) if means else None


def _acc_cells(t: pd.DataFrame, bold: tuple[str, str]) -> tuple[list[str], list[list[str]]]:
    ds_cols = [c for c in t.columns if c not in ("method", "arch", "T")]
    best = {c: _best(t[c]) for c in ds_cols}
    header = ["Method", "Architecture", "T"] + [c for c in ds_cols]
    body = []
    for _, r in t.iterrows():
        row = [r["method"], r["arch"], str(r["T"])]
        for c in ds_cols:
            v = r[c]
            if isinstance(v, tuple) and len(v) == 3:
                s = _fmt(*v)
                if best[c] is not None and v[0] == best[c]:
                    s = bold[0] + s + bold[1]
            elif isinstance(v, tuple):
                s = f"{v[0]:.2f}"
            else:
                s = "--"
            row.append(s)
        body.append(row)
    return header, body


def accuracy_latex(t: pd.DataFrame) -> str:
    if t.empty:
        return "% no finished train cell: no accuracy table\n"
    header, body = _acc_cells(t, (r"\textbf{", "}"))
    ncol = len(header)
    lines = [
        "% accuracy (top-1, %): mean ± std over seeds; best per column in bold; (published) columns: the numbers in reports/reference.csv",
        r"\begin{tabular}{ll r" + "r" * (ncol - 3) + "}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for row in body:
        cells = [tex_escape(row[0]), tex_escape(row[1]), row[2]] + [
            (c.replace("±", r"$\pm$") if not c.startswith(r"\textbf") else r"\textbf{" + c[8:-1].replace("±", r"$\pm$") + "}")
            for c in row[3:]]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


_B0, _B1 = "\x00", "\x01"  # bold markers that survive html.escape


def _html_table(header: list[str], body: list[list[str]]) -> str:
    """tabulate's HTML, every cell escaped, bold cells (between _B0 and _B1) in <b>."""
    def esc(c) -> str:
        return html.escape(str(c)).replace(_B0, "<b>").replace(_B1, "</b>")

    return tabulate([[esc(c) for c in r] for r in body], headers=[esc(h) for h in header], tablefmt="unsafehtml",
                    disable_numparse=True)


def accuracy_html(t: pd.DataFrame) -> str:
    if t.empty:
        return "<p><em>no finished train cell: no accuracy table</em></p>"
    return _html_table(*_acc_cells(t, (_B0, _B1)))


def accuracy_markdown(t: pd.DataFrame) -> str:
    if t.empty:
        return "_no finished train cell: no accuracy table_\n"
    header, body = _acc_cells(t, ("**", "**"))
    return tabulate(body, headers=header, tablefmt="github", disable_numparse=True) + "\n"


# --------------------------------------------------------------------------- training cost


def cost_table(df: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Memory, time per step and per epoch (means over seeds), each also as a ratio to bptt_m at the same
    arch, dataset and T. Returns (table, memory column label)."""
    d = with_labels(ok(df))
    mem, mem_label = memory_column(d)
    keys = ["label", "arch", "dataset", "T"]
    cols = [(name, mem if col is None else col) for name, col in _COST_COLUMN.items() if col != mem]
    parts = []
    for name, col in cols:
        if col and has(d, col):
            parts.append(over_seeds(d, keys, col).set_index(keys)["mean"].rename(name))
    if not parts:
        return pd.DataFrame(), mem_label
    parts.append(d.assign(contended=contended(d)).groupby(keys)["contended"].any())
    t = pd.concat(parts, axis=1).reset_index()
    t["contended"] = t["contended"].fillna(False).astype(bool)
    base = t[t["label"] == "bptt_m"].set_index(["arch", "dataset", "T"])
    for name, _ in cols:
        if name in t:
            t[f"{name}_x_bptt_m"] = [
                (r[name] / base.loc[(r["arch"], r["dataset"], r["T"]), name])
                if (r["arch"], r["dataset"], r["T"]) in base.index and pd.notna(r[name]) else float("nan")
                for _, r in t.iterrows()]
    order = {m: i for i, m in enumerate(method_order(t["label"]))}
    t = t.sort_values(["arch", "dataset", "T", "label"], key=lambda s: s.map(order) if s.name == "label" else s)
    return t.reset_index(drop=True), mem_label


# the cost table's columns -> the measured column each shows (memory_mib: the figure's memory column)
_COST_COLUMN = {"memory_mib": None, "saved_mib": "saved_for_backward_mib", "footprint_mib": "footprint_mib",
                "step_ms": "step_time_ms_median", "epoch_s": "epoch_time_s", "energy_j": "energy_per_step_j",
                "acs": "ops_effective_acs", "macs": "ops_effective_macs"}
CONTENDED_MARK = "†"  # a timing measured while other processes used the CPUs or the GPU
_COST_METRICS = tuple(_COST_COLUMN)


def _cost_cells(t: pd.DataFrame, mem_label: str | None) -> tuple[list[str], list[list[str]]]:
    metrics = [m for m in _COST_METRICS if m in t]
    header = ["Method", "Architecture", "Dataset", "T"]
    for m in metrics:
        h = f"{mem_label} [MiB]" if m == "memory_mib" else METRIC[_COST_COLUMN[m]].axis_label
        header += [h, "x bptt_m"]
    body = []
    for _, r in t.iterrows():
        row = [r["label"], r["arch"], r["dataset"], str(int(r["T"]))]
        mark = CONTENDED_MARK if r.get("contended", False) else ""
        for m in metrics:
            v, x = r[m], r[f"{m}_x_bptt_m"]
            digits = 3 if m in ("epoch_s", "energy_j") else 2 if m == "saved_mib" or (m == "memory_mib" and mem_label == METRIC["saved_for_backward_mib"].label) else 1
            s = "--" if pd.isna(v) else f"{v:.3g}" if m in ("acs", "macs") else f"{v:.{digits}f}"
            row += [s + (mark if m in ("step_ms", "epoch_s") and s != "--" else ""), "--" if pd.isna(x) else f"{x:.2f}"]
        body.append(row)
    return header, body


def cost_latex(t: pd.DataFrame, mem_label: str | None) -> str:
    if t.empty:
        return "% no finished cell with cost columns: no cost table\n"
    header, body = _cost_cells(t, mem_label)
    lines = ["% training cost: means over seeds; x bptt_m = ratio to bptt_m at the same architecture, dataset and T; "
             "dagger: timing measured while other processes were busy (see the report's notes)",
             r"\begin{tabular}{lll r" + "rr" * ((len(header) - 4) // 2) + "}", r"\toprule",
             " & ".join(tex_escape(h).replace("x bptt", r"$\times$ bptt") for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c).replace(CONTENDED_MARK, r"\textsuperscript{\dag}") for c in row) + r" \\"
              for row in body]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def cost_markdown(t: pd.DataFrame, mem_label: str | None) -> str:
    if t.empty:
        return "_no finished cell with cost columns: no cost table_\n"
    header, body = _cost_cells(t, mem_label)
    return tabulate(body, headers=header, tablefmt="github", disable_numparse=True) + "\n"


def cost_html(t: pd.DataFrame, mem_label: str | None) -> str:
    if t.empty:
        return "<p><em>no finished cell with cost columns: no cost table</em></p>"
    return _html_table(*_cost_cells(t, mem_label))


def reference_latex(ref: pd.DataFrame) -> str:
    lines = ["% published results (reports/reference.csv), each with its source", r"\begin{tabular}{llllrl}", r"\toprule",
             r"Method & Architecture & Dataset & T & top-1 [\%] & Source \\", r"\midrule"]
    for _, r in ref.iterrows():
        T = "--" if pd.isna(r["T"]) else str(int(r["T"]))
        lines.append(" & ".join([tex_escape(r["method"]), tex_escape(r["arch"] if isinstance(r["arch"], str) else "--"),
                                 tex_escape(r["dataset"]), T, f"{r['acc_top1']:.2f}", tex_escape(r["source"])]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- analyses: generic (header, body) tables


def as_latex(header: list[str], body: list[list[str]], comment: str, empty: str) -> str:
    if not body:
        return f"% {empty}\n"
    lines = [f"% {comment}", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c).replace("±", r"$\pm$") for c in row) + r" \\" for row in body]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", ""])


def as_markdown(header: list[str], body: list[list[str]], empty: str) -> str:
    if not body:
        return f"_{empty}_\n"
    return tabulate(body, headers=header, tablefmt="github", disable_numparse=True) + "\n"


def as_html(header: list[str], body: list[list[str]], empty: str) -> str:
    if not body:
        return f"<p><em>{html.escape(empty)}</em></p>"
    return _html_table(header, body)


def _fmt_values(vals: pd.Series, digits: int = 3) -> str:
    """``_fmt`` of a series' mean and std (over batches, seeds, permutations)."""
    return _fmt(vals.mean(), vals.std(), int(vals.notna().sum()), digits)


def fidelity_cells(cells: pd.DataFrame, fidelity: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The all-weights gradient cosine (mean ± std over the batches and seeds) per method (rows: at
    initialisation, and with the trained weights of the last epoch compared) and T (columns), and the norm ratio."""
    d = with_labels(ok(cells))
    if fidelity.empty or d.empty or "kind" not in d:
        return [], []
    fc = d[d["kind"] == "fidelity"]
    cols = ["key", "label", "arch", "dataset", "T"] + (["fidelity_reference"] if "fidelity_reference" in fc else [])
    f = fidelity[fidelity["layer"] == -1].merge(fc[cols], on="key")
    if f.empty:
        return [], []
    f["reference"] = f["fidelity_reference"].fillna("--") if "fidelity_reference" in f else "--"
    Ts = sorted(f["T"].unique())
    header = ["Method", "vs", "Architecture", "Dataset", "weights"] + [f"cos T={int(T)}" for T in Ts] + \
        [f"ratio T={int(T)}" for T in Ts]
    body = []
    order = {m: i for i, m in enumerate(method_order(f["label"]))}
    for (arch, ds, label, ref), g in sorted(f.groupby(["arch", "dataset", "label", "reference"]),
                                            key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        for epoch in sorted(g["epoch"].unique()):
            e = g[g["epoch"] == epoch]
            when = "init" if epoch == 0 else f"epoch {int(epoch)}"
            body.append([label, str(ref), arch, ds, when]
                        + [_fmt_values(e[e["T"] == T]["cosine"]) for T in Ts] + [_fmt_values(e[e["T"] == T]["norm_ratio"]) for T in Ts])
    return header, body


def shuffle_cells(cells: pd.DataFrame, anytime: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 2: accuracy with the input frames in order and permuted in time (mean ± std over the
    permutations) per method, architecture, dataset and T."""
    d = with_labels(ok(cells))
    if anytime.empty or d.empty:
        return [], []
    a = anytime[anytime["analysis"] == "shuffle"].merge(d[["key", "label", "arch", "dataset", "T", "acc_top1"]], on="key")
    if a.empty:
        return [], []
    header = ["Method", "Architecture", "Dataset", "T", "in order [%]", "shuffled [%]", "permutations"]
    body = []
    order = {m: i for i, m in enumerate(method_order(a["label"]))}
    for (arch, ds, label, T), g in sorted(a.groupby(["arch", "dataset", "label", "T"]),
                                          key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]], kv[0][3])):
        body.append([label, arch, ds, str(int(T)), _fmt_values(g.drop_duplicates("key")["acc_top1"], 2),
                     _fmt_values(g["acc"], 2), str(g["permutation"].nunique())])
    return header, body


def single_cells(cells: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Architecture/dataset combinations with one train or profile cell: a row each, not a figure of one point."""
    d = with_labels(ok(cells))
    if d.empty:
        return [], []
    d = d[d["kind"] != "fidelity"] if "kind" in d else d
    mem, mem_label = memory_column(d)
    header = ["Method", "Architecture", "Dataset", "T", "accuracy [%]", f"{mem_label} [MiB]" if mem else "memory",
              "time per step [ms]", "time per epoch [s]"]
    body = []
    for (arch, ds), g in d.groupby(["arch", "dataset"]):
        if len(g) != 1:
            continue
        r = g.iloc[0]

        def num(col: str, digits: int) -> str:
            v = r.get(col) if col else None
            return "--" if v is None or pd.isna(v) else f"{v:.{digits}f}"
        body.append([r["label"], arch, ds, str(int(r["T"])), num("acc_top1", 2), num(mem, 2),
                     num("step_time_ms_median", 1), num("epoch_time_s", 2)])
    return header, body


def plan_cells(cmp: pd.DataFrame | None) -> tuple[list[str], list[list[str]], str]:
    """(header, body, a line of median and largest errors) of the plan against the measured cells; empty where no
    cell is in both (``aggregate.plan_vs_measured``)."""
    from .aggregate import plan_error_summary

    if cmp is None or cmp.empty:
        return [], [], ""

    def f(v, fmt):
        return "-" if v is None or pd.isna(v) else fmt.format(v)

    header = ["Cell", "wall predicted [s]", "measured [s]", "error", "step predicted [ms]", "measured [ms]",
              "saved error", "memory predicted [MiB]", "measured [MiB]", "error"]
    body = [[r.cell, f(r.predicted_wall_s, "{:.2f}"), f(r.measured_wall_s, "{:.2f}"), f(r.error_wall_s_pct, "{:+.1f}%"),
             f(r.predicted_step_ms, "{:.2f}"), f(r.measured_step_ms, "{:.2f}"), f(r.error_saved_mib_pct, "{:+.2f}%"),
             f(r.predicted_memory_mib, "{:.0f}"), f(r.measured_memory_mib, "{:.0f}"), f(r.error_memory_pct, "{:+.1f}%")]
            for r in cmp.itertuples()]
    s = plan_error_summary(cmp)
    said = [f"{label} {s[k][0]:.1f}% / {s[k][1]:.1f}%" for k, label in
            (("wall_s", "wall time"), ("step_ms", "step time"), ("saved_mib", "saved bytes"), ("memory", "peak memory"))
            if s[k][0] is not None]
    line = f"{s['cells']} cell(s) planned and measured; |error| median / largest: " + ", ".join(said) + "."
    return header, body, line
