"""Calibrate the speed gate (run_bench.py compare) on this machine: how often it calls a regression that is not
there, and how often it finds one that is.

    python benchmarks/calibrate_compare.py [--grid ci_cpu] [--trials 20] [--rounds 3] [--method bptt_m]
                                           [--slowdowns 5,10,20] [--thresholds 3,5,8,10] [--out DIR]

Every trial is one comparison run the way the gate runs it (fresh worker processes per round, steps interleaved),
with more than two sides at once: two copies of the same code (A and A': the A/A comparison), and copies in which
``--method``'s ``train_step`` spins for an extra 5, 10 or 20% of its own duration (the injected slowdowns, compared
against A). A/A uses every cell of the grid; the slowed sides run only the slowed method's cells, where a slowdown
can show. Sharing trials keeps the sides interleaved with each other, so a drift of the machine hits them alike.

Prints, for each threshold: the false-alarm rate (A/A trials with any cell called slower), the detection rate at
each slowdown (trials where every slowed cell was called slower, and where any was), the smallest threshold with
no false alarm, and the time a comparison took. Per-step times of every trial go to DIR/steps.parquet.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLOWDOWN = '''

# --- injected by benchmarks/calibrate_compare.py: {method}'s step spins for {pct}% of its own duration
def _calibration_slowdown():
    import time as _time

    cls = METHODS[{method!r}]
    inner = cls.train_step

    def train_step(self, *args, **kwargs):
        t0 = _time.perf_counter()
        out = inner(self, *args, **kwargs)
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
    from bench.compare import checkout, decide, measure, paired
    from bench.grid import expand, load_grid

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="ci_cpu")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--method", default="bptt_m")
    p.add_argument("--slowdowns", default="5,10,20")
    p.add_argument("--thresholds", default="3,5,8,10")
    p.add_argument("--rev", default=None, help="the code to calibrate (default: the working tree)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "calibrate_compare")
    a = p.parse_args(argv)
    slowdowns = [float(s) for s in a.slowdowns.split(",") if s]
    thresholds = [float(s) / 100 for s in a.thresholds.split(",") if s]
    name, spec = load_grid(a.grid)
    cells = [c for c in expand(spec, name) if c.kind == "profile"]
    slowed_keys = {c.key for c in cells if c.method == a.method}
    if not slowed_keys:
        print(f"error: grid {name} has no cell of method {a.method}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    verdicts, all_steps, walls, gate_s = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="snnbench-calib-") as tmp:
        roots, labels = {}, {}
        for side in ["A", "A'"] + [f"S{s:g}" for s in slowdowns]:
            roots[side] = Path(tmp) / side
            labels[side] = checkout(ROOT, a.rev, roots[side])
        for s in slowdowns:
            inject_slowdown(roots[f"S{s:g}"], a.method, s)
        for trial in range(a.trials):
            t0 = time.perf_counter()
            # A/A: both copies on every cell; the slowed copies join on the slowed method's cells
            aa = measure({k: roots[k] for k in ("A", "A'")}, labels, [c for c in cells if c.key not in slowed_keys],
                         a.rounds)
            sl = measure(roots, labels, [c for c in cells if c.key in slowed_keys], a.rounds)
            walls.append(time.perf_counter() - t0)
            gate_s.append(aa.wall_s + sl.wall_s * 2 / len(roots))  # what a two-sided comparison of the grid costs
            steps = pd.concat([aa.steps, sl.steps], ignore_index=True)
            all_steps.append(steps.assign(trial=trial))
            for cell in cells:
                pairs = [("A", "A'")] + ([("A", f"S{s:g}") for s in slowdowns] if cell.key in slowed_keys else [])
                for base, head in pairs:
                    b, h = paired(steps, cell.key, base, head)
                    for thr in thresholds:
                        d = decide(b, h, thr)
                        verdicts.append({"trial": trial, "key": cell.key, "method": cell.method, "T": cell.T,
                                         "head": head, "threshold": thr, "verdict": d.verdict, "ratio": d.ratio,
                                         "low": d.low, "high": d.high, "detectable": d.detectable})
            print(f"trial {trial + 1}/{a.trials}: {walls[-1]:.0f} s", file=sys.stderr, flush=True)
    v = pd.DataFrame(verdicts)
    pd.concat(all_steps, ignore_index=True).to_parquet(a.out / "steps.parquet", index=False)
    v.to_parquet(a.out / "verdicts.parquet", index=False)
    print(report(v, slowdowns, thresholds, a, walls, gate_s))
    return 0


def report(v: pd.DataFrame, slowdowns, thresholds, a, walls, gate_s) -> str:
    from tabulate import tabulate

    n = v["trial"].nunique()
    lines = [f"calibration of run_bench.py compare on grid {a.grid}: {n} trial(s), {a.rounds} round(s) each, "
             f"slowdowns injected into {a.method}", ""]
    rows, zero = [], None
    for thr in thresholds:
        t = v[v["threshold"] == thr]
        aa = t[t["head"] == "A'"].groupby("trial")["verdict"].apply(lambda s: (s == "slower").any())
        row = [f"{thr * 100:g}%", f"{int(aa.sum())}/{n}"]
        for s in slowdowns:
            d = t[t["head"] == f"S{s:g}"].groupby("trial")["verdict"]
            row += [f"{int(d.apply(lambda x: (x == 'slower').all()).sum())}/{n} "
                    f"({int(d.apply(lambda x: (x == 'slower').any()).sum())}/{n})"]
        rows.append(row)
        if zero is None and aa.sum() == 0:
            zero = thr
    lines.append(tabulate(rows, headers=["threshold", "false alarms (A/A)"]
                          + [f"{s:g}% found: all cells (any)" for s in slowdowns], tablefmt="github"))
    aa_ratio = v[(v["head"] == "A'") & (v["threshold"] == thresholds[0])]
    lines += ["", f"A/A ratios: median {aa_ratio['ratio'].median():.3f}, spread of the middle 95% "
                  f"[{aa_ratio['ratio'].quantile(0.025):.3f}, {aa_ratio['ratio'].quantile(0.975):.3f}], "
                  f"worst {aa_ratio['ratio'].max():.3f}",
              f"smallest threshold without a false alarm: {'none of those tried' if zero is None else f'{zero * 100:g}%'}",
              f"time per trial (A/A on the whole grid plus {len(slowdowns)} slowed copies on the slowed method's "
              f"cells): median {pd.Series(walls).median():.0f} s; a two-sided comparison of the grid, as the gate "
              f"runs it: about {pd.Series(gate_s).median():.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
