"""Aggregates over seeds and the choice of columns, shared by figures and tables."""

from __future__ import annotations

import zlib

import pandas as pd

from .results import method_options_label

from .results import CONTENTION_LIMIT, METRIC

# the memory column a figure shows: the first with values. On a CPU there is no device memory: the bytes autograd
# saves for backward (deterministic) say what a method's memory scales with; the process's RSS, most of it the
# torch import, would hide it
MEMORY_PREFERENCE = ("peak_nvml_mib", "peak_alloc_mib", "saved_for_backward_mib", "footprint_mib", "peak_rss_mib")

# fixed colour, marker and line style per method (Okabe-Ito palette, colour-blind safe), the same in every figure
STYLE = {
    "bptt_m": ("#0072B2", "o", "-"),
    "bptt_s": ("#56B4E9", "s", "--"),
    "rate_m": ("#D55E00", "^", "-"),
    "rate_s": ("#E69F00", "v", "--"),
    "ottt_a": ("#009E73", "D", "-"),
    "ottt_o": ("#009E73", "d", ":"),
    "sltt": ("#CC79A7", "P", "-"),
    "sltt_k": ("#CC79A7", "X", ":"),
    "os": ("#000000", "*", "-"),
    "hm2bp": ("#999999", "h", "-"),
}
_EXTRA = ["#332288", "#117733", "#882255", "#44AA99", "#AA4499", "#DDCC77"]


def style(method: str) -> tuple[str, str, str]:
    base = method.split("[")[0]
    if base in STYLE:
        c, m, ls = STYLE[base]
        return c, m, (ls if base == method else "-.")
    return _EXTRA[zlib.crc32(method.encode()) % len(_EXTRA)], "o", "-."


def method_order(methods) -> list[str]:
    known = list(STYLE)
    return sorted(set(methods), key=lambda m: (known.index(m.split("[")[0]) if m.split("[")[0] in known else len(known), m))


def with_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ``label``: the method name, with its non-default options (backend, precision) in brackets."""
    if df.empty:
        return df.assign(label=pd.Series(dtype=str))
    opts = df.apply(method_options_label, axis=1) if "method_options" in df else ""
    return df.assign(label=[m if not o else f"{m}[{o}]" for m, o in zip(df["method"], opts)])


def ok(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or "status" not in df:
        return df
    return df[df["status"] == "ok"]


def has(df: pd.DataFrame, col: str) -> bool:
    return col in df and df[col].notna().any()


def memory_column(df: pd.DataFrame) -> tuple[str | None, str | None]:
    """(column, its label) of the first memory column with values."""
    for col in MEMORY_PREFERENCE:
        if has(df, col):
            return col, METRIC[col].label
    return None, None


def contended(df: pd.DataFrame) -> pd.Series:
    """True for rows whose timings were measured while other processes used more than CONTENTION_LIMIT of the
    CPUs, or while other processes ran on their GPU."""
    flag = pd.Series(False, index=df.index)
    if "contention_cpu_frac" in df:
        flag |= pd.to_numeric(df["contention_cpu_frac"], errors="coerce").fillna(0) > CONTENTION_LIMIT
    if "contention_gpu_processes" in df:
        flag |= pd.to_numeric(df["contention_gpu_processes"], errors="coerce").fillna(0) > 0
    return flag


def time_column(df: pd.DataFrame) -> tuple[str | None, str | None]:
    """Per epoch for train grids, per step for profile grids."""
    if has(df, "epoch_time_s") and (df.get("kind") == "train").any():
        return "epoch_time_s", METRIC["epoch_time_s"].axis_label
    if has(df, "step_time_ms_median"):
        return "step_time_ms_median", METRIC["step_time_ms_median"].axis_label
    return None, None


def over_seeds(df: pd.DataFrame, keys: list[str], col: str) -> pd.DataFrame:
    """mean, std (ddof 1; NaN for one seed) and n over seeds of ``col`` for each ``keys`` group."""
    d = df[df[col].notna()] if col in df else df.iloc[0:0]
    if d.empty:
        return pd.DataFrame(columns=keys + ["mean", "std", "n"])
    g = d.groupby(keys, dropna=False)[col]
    out = g.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    return out


def time_parts(cells: pd.DataFrame) -> pd.DataFrame | None:
    """Seconds per cell (index: a label per cell) in its start (``time_start_s``), each part of TIME_PARTS, and
    ``other``: what of ``cell_wall_s`` no part covers (never below 0). None where no cell stored its parts (results
    from before they were measured)."""
    from .results import TIME_PARTS

    cols = [f"time_{p}_s" for p in TIME_PARTS]
    if cells.empty or not all(c in cells for c in cols):
        return None
    d = cells[cells[cols].notna().all(axis=1)]
    if d.empty:
        return None
    out = pd.DataFrame({p: d[f"time_{p}_s"].to_numpy(dtype=float) for p in TIME_PARTS})
    out.insert(0, "start", d["time_start_s"].fillna(0.0).to_numpy(dtype=float) if "time_start_s" in d else 0.0)
    out["other"] = (d["cell_wall_s"].to_numpy(dtype=float) - out[list(TIME_PARTS)].sum(axis=1)).clip(lower=0.0)
    labels = [f"{r.method} {r.kind} T={r.T} s{r.seed}" for r in d.itertuples()]
    out.index = pd.Index(labels, name="cell")
    return out


def harness_share(cells: pd.DataFrame) -> dict | None:
    """The share of the cells' total time (each cell's start and wall time, added up) spent in measured steps, and
    in starting cells: {"steps": fraction, "start": fraction, "total_s": seconds, "cells": n}; None without parts."""
    parts = time_parts(cells)
    if parts is None:
        return None
    total = float(parts.to_numpy().sum())
    if total <= 0:
        return None
    return {"steps": float(parts["steps"].sum()) / total, "start": float(parts["start"].sum()) / total,
            "total_s": total, "cells": len(parts)}


def plan_vs_measured(plan: pd.DataFrame | None, cells: pd.DataFrame) -> pd.DataFrame | None:
    """Each cell the plan predicted and a run measured ok (not counted as measured by the plan itself): predicted
    and measured wall time, step time, bytes saved for backward and peak memory, and the errors in percent of the
    measured ((predicted - measured) / measured). None where no cell is in both."""
    if plan is None or plan.empty or cells.empty or "predicted_cell_wall_s" not in plan:
        return None
    p = plan[plan["source"] == "probed"]
    m = cells[cells["status"] == "ok"].drop_duplicates("key", keep="last")
    d = p.merge(m, on="key", suffixes=("_plan", ""))
    if d.empty:
        return None
    out = pd.DataFrame({"key": d["key"], "cell": [f"{r.kind} {r.label}" for r in d.itertuples()],
                        "memory_column": d["memory_column"]})
    pairs = {"wall_s": ("predicted_cell_wall_s", "cell_wall_s"),
             "step_ms": ("predicted_step_time_ms_median", "step_time_ms_median"),
             "saved_mib": ("predicted_saved_for_backward_mib", "saved_for_backward_mib")}
    for name, (pc, mc) in pairs.items():
        pred = pd.to_numeric(d[pc], errors="coerce") if pc in d else pd.Series(float("nan"), index=d.index)
        meas = pd.to_numeric(d[mc], errors="coerce") if mc in d else pd.Series(float("nan"), index=d.index)
        out[f"predicted_{name}"], out[f"measured_{name}"] = pred.to_numpy(), meas.to_numpy()
        out[f"error_{name}_pct"] = (100.0 * (pred - meas) / meas).to_numpy()
    mem_pred, mem_meas = [], []
    for _, r in d.iterrows():  # each cell's own device's column
        col = r["memory_column"]
        mem_pred.append(r.get(f"predicted_{col}"))
        mem_meas.append(r.get(col))
    out["predicted_memory_mib"] = pd.to_numeric(pd.Series(mem_pred), errors="coerce").to_numpy()
    out["measured_memory_mib"] = pd.to_numeric(pd.Series(mem_meas), errors="coerce").to_numpy()
    out["error_memory_pct"] = 100.0 * (out["predicted_memory_mib"] - out["measured_memory_mib"]) / out["measured_memory_mib"]
    return out.sort_values("measured_wall_s", ascending=False).reset_index(drop=True)


def plan_error_summary(cmp: pd.DataFrame) -> dict:
    """The median and the largest absolute error (percent) of each predicted quantity over the cells."""
    out = {"cells": len(cmp)}
    for name in ("wall_s", "step_ms", "saved_mib", "memory"):
        e = cmp[f"error_{name}_pct"].abs().dropna()
        out[name] = (float(e.median()), float(e.max())) if len(e) else (None, None)
    return out
