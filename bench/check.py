"""The regression gate: a results folder against a baseline, and invariants that need no baseline.

``compare`` matches cells of the results to cells of the baseline by their configuration (method, architecture,
dataset, T, seed, batch, optimizer settings, options, precision and the device *type*; never the host, the time
or the grid name), and compares each metric with a tolerance in percent: above ``baseline * (1 + tol)`` is a
regression, below ``baseline * (1 - tol)`` an improvement, anything between holds. A cell that failed where the
baseline's succeeded, and a metric the baseline has but the results lack, are regressions too (the gate cannot
hold what it cannot see). ``invariants`` checks what must hold on any machine: memory flat in T for rate-BP and
the online methods, growing in T for BPTT, and rate_m's step time growing in T at a fraction of bptt_m's rate, each as
the rows state it (the Method classes declare what they claim; the gate keeps no list of method names).

pandas only (no torch): the gate runs in a second and can run where the project is not installed with torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import UsageError

from reports.results import MEASURE_COLUMNS, METRIC, METRICS

from .cell import MEASURED_FIELDS

# the columns that say what a cell measures, to match results to a baseline: the Cell's fields that change a
# result (bench/cell.py decides which do not), with the device's type in place of the device itself
CONFIG_COLUMNS = tuple("device_type" if f == "device" else f for f in MEASURED_FIELDS)
ID_COLUMNS = ("method", "arch", "dataset", "T", "seed")
# the invariants' defaults (README, "Regression gate"; the CLI takes them from here). A method that claims to be faster than a reference: its step time grows with T (least-squares slope, ms per time
# step) at most this share of the reference's growth. Measured rate_m/bptt_m: 0.51 on the 2-core CPU (ci_cpu),
# 0.51 on an H200 at batch 64 (ci_gpu), 0.37 at batch 128 (paper_cost); 1.0 is no advantage at all. The paper's
# claim is about how cost scales with T, and the slope carries it on any device: the step time at one T also
# holds the fixed cost of a step, which on a GPU at small batch (launch-bound) can hide the advantage (0.855 at
# T=8 on the H200, against a slope ratio of 0.51).
MAX_GROWTH_RATIO = 0.75
FLAT_TOL_PCT = 2.0  # "flat in T": the bytes saved for backward vary over T by at most this percent

# metric -> tolerance in percent, as the metric table declares it
DEFAULT_TOLERANCES: dict[str, float] = {m.name: m.tolerance for m in METRICS if m.tolerance is not None}


@dataclass(frozen=True)
class Tolerances:
    """Percent tolerance per metric, optionally per method; ``None`` switches a metric off."""

    default: dict[str, float | None]
    per_method: dict[tuple[str, str], float | None]

    def get(self, method: str, metric: str) -> float | None:
        if (method, metric) in self.per_method:
            return self.per_method[(method, metric)]
        return self.default.get(metric)

    def metrics(self) -> list[str]:
        names = {m for m, v in self.default.items() if v is not None} | {m for (_, m), v in self.per_method.items()
                                                                          if v is not None}
        return sorted(names)


def parse_tolerances(specs: list[str]) -> Tolerances:
    """``METRIC=PCT`` or ``METHOD:METRIC=PCT``; PCT a number >= 0 or ``off``; METRIC a measured column."""
    default: dict[str, float | None] = dict(DEFAULT_TOLERANCES)
    per_method: dict[tuple[str, str], float | None] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"--tolerance {spec!r}: expected METRIC=PCT or METHOD:METRIC=PCT (PCT a number or 'off')")
        if value.strip().lower() == "off":
            pct = None
        else:
            try:
                pct = float(value.rstrip("%"))
            except ValueError:
                raise UsageError(f"--tolerance {spec!r}: {value!r} is not a percentage (a number or 'off')") from None
            if not math.isfinite(pct) or pct < 0:
                raise UsageError(f"--tolerance {spec!r}: the percentage must be >= 0")
        method, _, metric = key.rpartition(":")
        if metric not in MEASURE_COLUMNS:
            raise UsageError(f"--tolerance {spec!r}: no metric {metric!r}; valid: {', '.join(sorted(MEASURE_COLUMNS))}")
        if method:
            per_method[(method, metric)] = pct
        else:
            default[metric] = pct
    return Tolerances(default, per_method)


def read_cells(path: str | Path, what: str) -> pd.DataFrame:
    """Cell rows from a results folder (as ``run`` writes it) or one parquet file (a baseline)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    from reports.results import ResultsFileProblem, load_results, read_table

    try:
        df = read_table(path) if path.is_file() else load_results(path)
    except ResultsFileProblem as e:
        raise UsageError(f"{what} {e}") from None
    except OSError as e:
        raise UsageError(f"{what} {str(path)!r} cannot be read: {e}") from None
    missing = [c for c in ("method", "arch", "dataset", "T", "status") if c not in df.columns]
    if df.empty or missing:
        raise UsageError(f"{what} {str(path)!r} holds no result rows"
                         + (f" (columns missing: {', '.join(missing)})" if missing and not df.empty else ""))
    return _with_config(df)


def _with_config(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    dev = df["device"] if "device" in df.columns else pd.Series("cpu", index=df.index)
    df["device_type"] = dev.astype(str).str.split(":").str[0]
    for col in ("method_options", "arch_options"):  # canonical JSON so that key order never splits a match
        if col in df.columns:
            df[col] = df[col].map(_canonical_json)
    return df


def _canonical_json(v) -> str:
    if isinstance(v, str):
        try:
            return json.dumps(json.loads(v), sort_keys=True)
        except ValueError:
            return v
    return json.dumps(v or {}, sort_keys=True)


def _config_key(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    return df[cols].astype(str).agg("|".join, axis=1)


def compare(baseline: pd.DataFrame, results: pd.DataFrame, tol: Tolerances) -> tuple[pd.DataFrame, dict]:
    """One row per (matched cell, metric) with baseline, result, ratio, tolerance and verdict, and a summary."""
    cols = [c for c in CONFIG_COLUMNS if c in baseline.columns and c in results.columns]
    b, r = baseline.copy(), results.copy()
    b["_k"], r["_k"] = _config_key(b, cols), _config_key(r, cols)
    matched = sorted(set(b["_k"]) & set(r["_k"]))
    summary = {"matched_cells": len(matched), "only_in_results": int((~r["_k"].isin(b["_k"])).sum()),
               "only_in_baseline": int((~b["_k"].isin(r["_k"])).sum())}
    if not matched:
        hint = "was the baseline recorded from the same grid?"
        other = [c for c in cols if c != "device_type"]
        if "device_type" in cols and set(_config_key(b, other)) & set(_config_key(r, other)):
            hint = (f"the cells differ only in device type (baseline: {', '.join(sorted(b['device_type'].unique()))}; "
                    f"results: {', '.join(sorted(r['device_type'].unique()))}): compare against a baseline of this device")
        raise UsageError(f"no cell of the results matches a cell of the baseline by configuration ({', '.join(cols)}); {hint}")
    rows = []
    for k in sorted(set(b["_k"]) - set(r["_k"])):  # the gate cannot hold what it cannot see
        bc = b[b["_k"] == k]
        if (bc["status"] == "ok").any():
            rows.append({**{c: bc.iloc[0][c] for c in ID_COLUMNS}, "metric": "status", "baseline": "ok",
                         "result": "missing", "ratio": math.nan, "tolerance_pct": math.nan,
                         "verdict": "REGRESSION (not in results)"})
    for k in matched:
        bc, rc = b[b["_k"] == k], r[r["_k"] == k]
        ident = {c: bc.iloc[0][c] for c in ID_COLUMNS}
        b_ok, r_ok = (bc["status"] == "ok").any(), (rc["status"] == "ok").any()
        if b_ok and not r_ok:
            rows.append({**ident, "metric": "status", "baseline": "ok", "result": str(rc.iloc[-1]["status"]),
                         "ratio": math.nan, "tolerance_pct": math.nan, "verdict": "REGRESSION"})
            continue
        if not b_ok:
            rows.append({**ident, "metric": "status", "baseline": str(bc.iloc[-1]["status"]),
                         "result": str(rc.iloc[-1]["status"]), "ratio": math.nan, "tolerance_pct": math.nan,
                         "verdict": "no baseline"})
            continue
        bc, rc = bc[bc["status"] == "ok"], rc[rc["status"] == "ok"]
        if "stale" in rc and rc["stale"].any():
            ident = {**ident, "note": "stale: measured by older code (--reuse-stale)"}
        for metric in tol.metrics():
            pct = tol.get(ident["method"], metric)
            if pct is None:
                continue
            bv = _median(bc, metric)
            rv = _median(rc, metric)
            if bv is None:
                continue  # the baseline does not measure it (a GPU column on a CPU baseline): nothing to hold
            if rv is None:
                verdict, ratio = "REGRESSION (not measured)", math.nan
            else:
                ratio = rv / bv if bv else (1.0 if rv == bv else math.inf)
                verdict = _verdict(ratio, pct, METRIC[metric].better)
            rows.append({**ident, "metric": metric, "baseline": bv, "result": rv, "ratio": ratio,
                         "tolerance_pct": pct, "verdict": verdict})
    table = pd.DataFrame(rows)
    if "note" in table:
        table["note"] = table["note"].fillna("")
    summary["stale_results"] = int(r.loc[r["_k"].isin(matched), "stale"].sum()) if "stale" in r else 0
    summary["baseline_device"], summary["results_device"] = _device_names(b), _device_names(r)
    summary["comparisons"] = len(table)
    summary["regressions"] = int(table["verdict"].str.startswith("REGRESSION").sum()) if len(table) else 0
    summary["improvements"] = int((table["verdict"] == "improved").sum()) if len(table) else 0
    return table, summary


def _device_names(df: pd.DataFrame) -> str:
    """Where a frame was measured: GPU names where there are any, else CPU models."""
    for col in ("gpu_name", "cpu_model"):
        if col in df.columns and df[col].notna().any():
            return ", ".join(sorted(df[col].dropna().astype(str).unique()))
    return "unknown"


def _median(df: pd.DataFrame, metric: str) -> float | None:
    if metric not in df.columns:
        return None
    v = pd.to_numeric(df[metric], errors="coerce").dropna()
    return float(v.median()) if len(v) else None


def _verdict(ratio: float, pct: float, better: str = "lower") -> str:
    """Past the tolerance in the worse direction is a regression, in the better one an improvement (a metric
    without a better direction only holds or changes)."""
    eps = 1e-12  # a ratio of exactly 1 +- tol holds
    up, down = ratio > 1 + pct / 100 + eps, ratio < 1 - pct / 100 - eps
    if better == "higher":
        up, down = down, up
    elif better == "none":
        return "changed" if up or down else "ok"
    return "REGRESSION" if up else "improved" if down else "ok"


# ---------------------------------------------------------------- invariants

GROUP_COLUMNS = ("arch", "dataset", "kind", "batch_size", "neuron", "arch_options", "precision", "device_type")


def _stated(m: pd.DataFrame, col: str) -> str | None:
    """What a method's rows state in ``col`` (the Method class wrote it), or None."""
    if col not in m.columns:
        return None
    v = m[col].dropna()
    return str(v.iloc[0]) if len(v) else None


def invariants(results: pd.DataFrame, max_growth_ratio: float = MAX_GROWTH_RATIO, flat_tol_pct: float = FLAT_TOL_PCT,
               min_growth: float = 0.5) -> pd.DataFrame:
    """Checks that hold on any machine, each with its measured value and limit. What to check comes from the rows,
    which carry what each method claims (``memory_in_T``, ``time_reference_method``, declared on the Method class):

    - ``flat``: max/min of ``saved_for_backward_mib`` over T is at most ``1 + flat_tol_pct/100``;
    - ``linear``: ``saved_for_backward_mib`` never falls as T grows and saved(T_max)/saved(T_min) is at least
      ``min_growth * T_max/T_min`` (linear growth gives 1 x that);
    - a time reference R: over the T both ran (two or more), the slope of the method's median step time in T is at
      most ``max_growth_ratio`` x R's slope (a reference whose time does not grow in T fails: nothing to judge by).
    """
    df = results[results["status"] == "ok"]
    if "method_options" in df.columns:  # the invariants are stated for the methods as published
        df = df[df["method_options"] == "{}"]
    gcols = [c for c in GROUP_COLUMNS if c in df.columns]
    rows = []
    for gkey, g in df.groupby(gcols, dropna=False, sort=True):
        where = " ".join(f"{c}={v}" for c, v in zip(gcols, gkey) if c in ("arch", "dataset", "batch_size", "device_type"))
        for method, m in g.groupby("method"):
            saved = _per_T(m, "saved_for_backward_mib")
            scaling = _stated(m, "memory_in_T")
            if len(saved) >= 2 and scaling == "flat":
                measured = saved.max() / saved.min()
                limit = 1 + flat_tol_pct / 100
                rows.append({"invariant": "saved_for_backward flat in T", "subject": _over_t(method, saved),
                             "where": where, "measured": measured, "limit": f"<= {limit:.3f}",
                             "verdict": "ok" if measured <= limit + 1e-12 else "FAIL"})
            elif len(saved) >= 2 and scaling == "linear":
                t0, t1 = saved.index.min(), saved.index.max()
                measured = saved[t1] / saved[t0]
                limit = min_growth * t1 / t0
                monotone = bool((saved.diff().dropna() >= 0).all())
                rows.append({"invariant": "saved_for_backward grows in T", "subject": _over_t(method, saved),
                             "where": where, "measured": measured, "limit": f">= {limit:.3f}, non-decreasing",
                             "verdict": "ok" if (measured >= limit and monotone) else "FAIL"})
            ref = _stated(m, "time_reference_method")
            if ref:
                mine, theirs = _per_T(m, "step_time_ms_median"), _per_T(g[g["method"] == ref], "step_time_ms_median")
                common = sorted(set(mine.index) & set(theirs.index))
                if len(common) >= 2:
                    rows.append(_growth_row(method, ref, mine[common], theirs[common], where, max_growth_ratio))
    return pd.DataFrame(rows, columns=["invariant", "subject", "where", "measured", "limit", "verdict"])


def growth(series: pd.Series) -> float:
    """The least-squares slope of a per-T series in T (ms per time step for step times)."""
    t = series.index.to_numpy(dtype=float)
    y = series.to_numpy(dtype=float)
    dt = t - t.mean()
    return float((dt * (y - y.mean())).sum() / (dt * dt).sum())


def _growth_row(method: str, ref: str, mine: pd.Series, theirs: pd.Series, where: str, limit: float) -> dict:
    a, b = growth(mine), growth(theirs)
    measured = a / b if b > 0 else math.nan
    ok = b > 0 and measured <= limit
    subject = (f"T={','.join(str(t) for t in mine.index)}: {a:.3g} vs {b:.3g} ms per time step"
               + ("" if b > 0 else f" ({ref}'s step time does not grow in T: nothing to judge by)"))
    return {"invariant": f"{method} step-time growth in T vs {ref}", "subject": subject, "where": where,
            "measured": measured, "limit": f"<= {limit:.3f}", "verdict": "ok" if ok else "FAIL"}


def _per_T(m: pd.DataFrame, col: str) -> pd.Series:
    """The median of ``col`` per T (empty where no row measured it: train cells without a timed step, say)."""
    if col not in m.columns:
        return pd.Series(dtype=float)
    return pd.to_numeric(m[col], errors="coerce").groupby(m["T"]).median().dropna()


def _over_t(method: str, saved: pd.Series) -> str:
    return f"{method} over T={','.join(str(t) for t in saved.index)}"


# ---------------------------------------------------------------- output

def format_comparison(table: pd.DataFrame, summary: dict, fmt: str = "simple") -> str:
    from tabulate import tabulate

    shown = table.copy()
    for c in ("baseline", "result"):
        shown[c] = shown[c].map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)
    shown["ratio"] = shown["ratio"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    shown["tolerance_pct"] = shown["tolerance_pct"].map(lambda v: "" if pd.isna(v) else f"+-{v:g}%")
    head = (f"{summary['matched_cells']} matched cells, {summary['comparisons']} comparisons: "
            f"{summary['regressions']} regression(s), {summary['improvements']} improvement(s)"
            + (f"; {summary['only_in_results']} result cell(s) without a baseline" if summary["only_in_results"] else "")
            + (f"; {summary['only_in_baseline']} baseline cell(s) missing from the results" if summary["only_in_baseline"] else "")
            + (f"; {summary['stale_results']} result cell(s) stale (measured by older code, kept with --reuse-stale)"
               if summary.get("stale_results") else "")
            + f"\nbaseline measured on: {summary['baseline_device']}; results on: {summary['results_device']}"
            + ("  (different devices: absolute figures may not compare)"
               if summary["baseline_device"] != summary["results_device"] else ""))
    return head + "\n\n" + tabulate(shown, headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True)


def format_invariants(table: pd.DataFrame, fmt: str = "simple") -> str:
    from tabulate import tabulate

    shown = table.copy()
    shown["measured"] = shown["measured"].map(lambda v: f"{v:.3f}")
    n_fail = int((table["verdict"] != "ok").sum())
    return (f"{len(table)} invariant(s), {n_fail} failed\n\n"
            + tabulate(shown, headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True))


def write_baseline(results: str | Path, out: str | Path) -> int:
    """The ok cells of a results folder as one parquet file: a baseline recorded on purpose."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"baseline {str(out)!r} is a folder; give the parquet file to write, e.g. {out / 'cpu.parquet'}")
    df = read_cells(results, "results").drop(columns=["device_type", "stale"], errors="ignore")
    df = df[df["status"] == "ok"]
    if df.empty:
        raise UsageError(f"results {str(results)!r} have no successful cell to record as a baseline")
    from reports.results import atomic_write_parquet

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(df.reset_index(drop=True), out)
    except OSError as e:
        raise UsageError(f"baseline {str(out)!r} cannot be written: {e}") from None
    return len(df)


def run_gate(baseline: str | None, results: str | None, tolerances: list[str], invariants_dir: str | None,
             max_growth_ratio: float = MAX_GROWTH_RATIO, flat_tol: float = FLAT_TOL_PCT, report: str | None = None) -> tuple[bool, str]:
    """The whole gate, as ``run_bench.py check`` runs it: (failed, the text to print); writes the markdown report
    when asked. Unusable input raises UsageError."""
    if not invariants_dir and not (baseline and results):
        raise UsageError("check needs --baseline B and --results R, or --invariants R (or both)")
    if bool(baseline) != bool(results):
        raise UsageError("--baseline and --results go together")
    if report and Path(report).is_dir():
        raise UsageError(f"--report {report!r} is a folder; give the markdown file to write, e.g. {Path(report) / 'gate.md'}")
    failed, text, parts = False, [], []
    if baseline:
        table, summary = compare(read_cells(baseline, "baseline"), read_cells(results, "results"),
                                 parse_tolerances(tolerances))
        text.append(format_comparison(table, summary))
        parts.append(f"## Against the baseline\n\nbaseline `{baseline}`, results `{results}`\n\n"
                     + format_comparison(table, summary, "github"))
        failed |= summary["regressions"] > 0
    if invariants_dir:
        inv = invariants(read_cells(invariants_dir, "results"), max_growth_ratio, flat_tol)
        if inv.empty:
            raise UsageError(f"no invariant applies to {invariants_dir!r}: it needs ok cells of methods that state how "
                             "their memory scales in T (memory_in_T) at two or more T, or a method and its time reference")
        text.append(format_invariants(inv))
        parts.append(f"## Invariants\n\nresults `{invariants_dir}`\n\n" + format_invariants(inv, "github"))
        failed |= bool((inv["verdict"] != "ok").any())
    verdict = "FAILED: a regression or a broken invariant" if failed else "passed"
    text.append(f"gate {verdict}")
    if report:
        try:
            Path(report).parent.mkdir(parents=True, exist_ok=True)
            Path(report).write_text(f"# snnbench regression gate: {verdict}\n\n" + "\n\n".join(parts) + "\n")
        except OSError as e:
            raise UsageError(f"--report {report!r} cannot be written: {e.strerror}") from None
    return failed, "\n\n".join(text)
