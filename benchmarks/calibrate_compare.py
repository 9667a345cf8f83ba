"""Calibrate the speed gate (run_bench.py compare) on this machine: how often it calls a regression that is not
there, and how often it finds one that is.

    python benchmarks/calibrate_compare.py [--grid ci_cpu] [--device cpu|cuda] [--trials 20] [--rounds 3]
                                           [--method bptt_m] [--slowdowns 5,10,20] [--thresholds 3,5,8,10]
                                           [--out DIR] [--resume]

Every trial runs comparisons exactly as the gate runs them (two sides, fresh worker processes per round, steps
taken in turn): the code against an unchanged copy of itself on every cell of the grid (A/A), and against copies
in which ``--method``'s ``train_step`` spins for an extra 5, 10 or 20% of its own duration (the injected slowdowns;
on a GPU the duration of its kernels too, which the spin waits for) on that method's cells, where a slowdown can
show. The gate fails when any cell, or any method over its cells, is
called slower and fresh rounds of those cells confirm it (the gate's second measurement, run here whenever some
threshold flags a cell); a false alarm is an A/A comparison that would fail it, a detection a slowed one that does.
The first measurement's verdict alone is shown too, in brackets.

Prints, for each threshold: the false alarms and the detections at each slowdown (by the gate's rule, and by the
cells alone), the smallest threshold with no false alarm, and what a comparison of the whole grid cost. Verdicts
and per-step times are written after every trial to DIR (verdicts.parquet, steps.parquet, calibration.md), so a
calibration stopped early keeps its trials; ``--resume`` adds ``--trials`` more trials to those already in DIR (a
calibration of 20 trials, ~10 minutes each on the 2-core CI machine, can be run in parts on a quiet machine; DIR
may hold the verdicts alone, as ``baselines/speed-calibration-cpu/`` does).
Each trial records the code it calibrated (``rev``) and when it ran; the settings must be the ones DIR was made
with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLOWDOWN = '''

# --- injected by benchmarks/calibrate_compare.py: {method}'s step spins for {pct}% of its own duration
def _calibration_slowdown():
    import time as _time

    import torch as _torch

    cls = METHODS[{method!r}]
    inner = cls.train_step

    def train_step(self, *args, **kwargs):
        t0 = _time.perf_counter()
        out = inner(self, *args, **kwargs)
        if _torch.cuda.is_initialized():  # the step's own duration is its GPU work's: wait for it (the timing
            _torch.cuda.synchronize()     # probe waits at the step's end anyway), else the spin hides behind it
        end = _time.perf_counter() + {fraction!r} * (_time.perf_counter() - t0)
        while _time.perf_counter() < end:
            pass
        return out

    cls.train_step = train_step


_calibration_slowdown()
'''


def inject_slowdown(root: Path, method: str, pct: float) -> None:
    """Make ``method``'s step in the source tree ``root`` slower by ``pct`` percent of its own time."""
    init = root / "methods" / "__init__.py"
    init.write_text(init.read_text() + SLOWDOWN.format(method=method, pct=pct, fraction=pct / 100))


def main(argv=None) -> int:
    from bench.compare import checkout, confirmed, judge, measure, to_confirm
    from bench.errors import UsageError
    from bench.launch import prepare_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="ci_cpu")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the grid's, else cuda if available), as for run")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--method", default="bptt_m")
    p.add_argument("--slowdowns", default="5,10,20")
    p.add_argument("--thresholds", default="3,5,8,10,15")
    p.add_argument("--rev", default=None, help="the code to calibrate (default: the working tree)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "calibrate_compare")
    p.add_argument("--resume", action="store_true", help="add the trials to those already stored in --out")
    a = p.parse_args(argv)
    slowdowns = [float(s) for s in a.slowdowns.split(",") if s]
    thresholds = [float(s) / 100 for s in a.thresholds.split(",") if s]
    try:  # the cells exactly as `run_bench.py compare --grid` makes them, the device included
        name, cells, a.out, _ = prepare_run(a.grid, [], [], a.device, None, str(a.out))
        cells = [c for c in cells if c.kind == "profile"]
        slowed_keys = {c.key for c in cells if c.method == a.method}
        if not slowed_keys:
            raise UsageError(f"grid {name} has no profile cell of method {a.method}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = ", ".join(sorted({c.device for c in cells}))
    if device.startswith("cuda"):  # the GPU model: a calibration holds for the model it ran on
        import torch

        device += f" ({torch.cuda.get_device_name(cells[0].device)})"
    a.device = device
    verdicts, all_steps, gate_s, first = [], [], [], 0
    if a.resume and (a.out / "verdicts.parquet").is_file():
        old = pd.read_parquet(a.out / "verdicts.parquet")
        settings = {"grid": name, "rounds": a.rounds, "slowed_method": a.method, "device": device}
        stored = {k: old[k].iloc[0] for k in settings if k in old}
        stored_slowdowns = sorted(set(old["head"]) - {"A'"})
        if (stored != {k: v for k, v in settings.items() if k in stored}
                or stored_slowdowns != sorted(f"S{s:g}" for s in slowdowns)
                or set(old["threshold"]) != set(thresholds)):
            print(f"error: --resume: {a.out} holds a calibration with other settings ({stored}, slowdowns "
                  f"{stored_slowdowns}, thresholds {sorted(set(old['threshold']))})", file=sys.stderr)
            return 2
        verdicts = old.to_dict("records")
        # the per-step times are the bulky part, and a calibration kept with the project keeps only its verdicts
        all_steps = [pd.read_parquet(a.out / "steps.parquet")] if (a.out / "steps.parquet").is_file() else []
        gate_s = old[old["head"] == "A'"].groupby("trial")["aa_wall_s"].first().tolist()
        first = int(old["trial"].max()) + 1
    with tempfile.TemporaryDirectory(prefix="snnbench-calib-") as tmp:
        roots, labels = {}, {}
        for side in ["A", "A'"] + [f"S{s:g}" for s in slowdowns]:
            roots[side] = Path(tmp) / side
            labels[side] = checkout(ROOT, a.rev, roots[side])
        for s in slowdowns:
            inject_slowdown(roots[f"S{s:g}"], a.method, s)
        slowed = [c for c in cells if c.key in slowed_keys]
        when = pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")
        for trial in range(first, first + a.trials):
            runs = [("A'", cells)] + [(f"S{s:g}", slowed) for s in slowdowns]
            for head, todo in runs:
                cmp = measure({"A": roots["A"], head: roots[head]}, labels, todo, a.rounds)
                if head == "A'":
                    gate_s.append(cmp.wall_s)
                all_steps.append(cmp.steps.assign(trial=trial, comparison=head, stage="first"))
                tables = {thr: judge(cmp, "A", head, thr) for thr in thresholds}
                keys = set().union(*(to_confirm(t) for t in tables.values()))
                if keys:  # the gate's second measurement, once for every threshold's flagged cells
                    again = measure({"A": roots["A"], head: roots[head]}, labels, [c for c in todo if c.key in keys],
                                    a.rounds)
                    all_steps.append(again.steps.assign(trial=trial, comparison=head, stage="again"))
                    tables = {thr: confirmed(t, judge(again, "A", head, thr)) for thr, t in tables.items()}
                for thr, t in tables.items():
                    for _, r in t.iterrows():
                        verdicts.append({"trial": trial, "head": head, "threshold": thr, "scope": r["scope"],
                                         "method": r["method"], "T": r["T"], "verdict": r["time"],
                                         "ratio": r["ratio"], "low": r["low"], "high": r["high"],
                                         "detectable": r["detectable"], "rev": labels["A"], "started": when,
                                         "grid": name, "device": device, "rounds": a.rounds,
                                         "slowed_method": a.method,
                                         "aa_wall_s": gate_s[-1] if head == "A'" else None})
            v = pd.DataFrame(verdicts)
            pd.concat(all_steps, ignore_index=True).to_parquet(a.out / "steps.parquet", index=False)
            v.to_parquet(a.out / "verdicts.parquet", index=False)
            text = report(v, slowdowns, thresholds, a, gate_s)
            (a.out / "calibration.md").write_text(text + "\n")
            print(f"trial {trial + 1}/{first + a.trials} done; A/A comparison of the grid took {gate_s[-1]:.0f} s",
                  file=sys.stderr, flush=True)
    print(text)
    return 0


def report(v: pd.DataFrame, slowdowns, thresholds, a, gate_s) -> str:
    from tabulate import tabulate

    n = v["trial"].nunique()
    lines = [f"calibration of run_bench.py compare on grid {a.grid}, device {a.device}: {n} trial(s), {a.rounds} "
             f"round(s) per comparison, slowdowns injected into {a.method}", ""]
    rows, zero = [], None
    for thr in thresholds:
        t = v[v["threshold"] == thr]

        def failed(head, verdicts=("slower",)):
            d = t[t["head"] == head]
            return int(d.groupby("trial")["verdict"].apply(lambda x: x.isin(verdicts).any()).sum())

        def both(head):  # confirmed (the first measurement alone)
            return f"{failed(head)}/{n} ({failed(head, ('slower', 'not confirmed'))}/{n})"

        aa = failed("A'")
        row = [f"{thr * 100:g}%", both("A'")] + [both(f"S{s:g}") for s in slowdowns]
        rows.append(row)
        if zero is None and aa == 0:
            zero = thr
    lines.append(tabulate(rows, headers=["threshold", "false alarms (A/A): gate (first measurement)"]
                          + [f"{s:g}% found: gate (first measurement)" for s in slowdowns], tablefmt="github"))
    cell_aa = v[(v["head"] == "A'") & (v["threshold"] == thresholds[0]) & (v["scope"] == "cell")]["ratio"].dropna()
    if len(cell_aa):
        lines += ["", f"A/A ratios of the cells: median {cell_aa.median():.3f}, middle 95% [{cell_aa.quantile(0.025):.3f}, "
                      f"{cell_aa.quantile(0.975):.3f}], furthest from 1: {cell_aa.iloc[(cell_aa - 1).abs().argmax()]:.3f}"]
    else:
        lines += ["", "A/A ratios of the cells: none (too few steps a cell: a cell needs three ABBA quartets)"]
    for s in slowdowns:
        m = v[(v["head"] == f"S{s:g}") & (v["threshold"] == thresholds[0]) & (v["scope"] == "method")]["ratio"]
        lines.append(f"{s:g}% injected: the method's pooled ratio, median {m.median():.3f} "
                     f"(range {m.min():.3f}-{m.max():.3f})")
    if "rev" in v:
        lines.append("code calibrated: " + "; ".join(f"{rev} ({g['trial'].nunique()} trial(s), from {g['started'].min()})"
                                                      for rev, g in v.groupby("rev", sort=False)))
    lines += [f"smallest threshold without a false alarm: {'none of those tried' if zero is None else f'{zero * 100:g}%'}",
              f"a comparison of the whole grid (two sides, {a.rounds} rounds): median {pd.Series(gate_s).median():.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
