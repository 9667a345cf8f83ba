"""Step cost of every method, measured by the harness itself: a front end of the profile grid.

    python benchmarks/step_cost.py                      # grids/profile_cpu.toml: resnet18, synthetic CIFAR-10, batch 16, T 1,2,4,8
    python benchmarks/step_cost.py --set arch=cnn_digits --set batch_size=64 --filter T=1,2,4,8,16
    python benchmarks/step_cost.py --filter method=sltt_k --set 'method_options={"k": 2}'

The cells run as any grid's do (a fresh worker per cell, the same runner and profilers), into --out (default: a
temporary folder; give one to keep the rows, draw them with `run_bench.py report`, or gate them). Prints median
step time, bytes saved for backward and the RSS footprint of training, each as a ratio to bptt_m where the run
has it. Exit 1 when a cell failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def table(df) -> str:
    import pandas as pd
    from tabulate import tabulate

    from reports.aggregate import with_labels

    ok = with_labels(df[df["status"] == "ok"]).sort_values(["label", "T"])
    base = ok[ok["label"] == "bptt_m"].set_index("T")

    def ratio(v, T, col):
        return f"{v / base.loc[T, col]:.2f}" if T in base.index and base.loc[T, col] else ""

    b1 = base.loc[base.index.min(), "saved_for_backward_mib"] if len(base) else None
    rows = [[r["label"], r["T"], f"{r['step_time_ms_median']:.1f}", ratio(r["step_time_ms_median"], r["T"], "step_time_ms_median"),
             f"{r['saved_for_backward_mib']:.2f}", f"{r['saved_for_backward_mib'] / b1:.3f}" if b1 else "",
             "" if pd.isna(r.get("footprint_mib")) else f"{r['footprint_mib']:.0f}"]
            for _, r in ok.iterrows()]
    return tabulate(rows, headers=["method", "T", "step ms (median)", "x bptt_m same T", "saved MiB",
                                   "x bptt_m at its smallest T", "footprint MiB"], tablefmt="github", disable_numparse=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="profile_cpu", help="a profile grid (name in grids/ or a path)")
    p.add_argument("--filter", action="append", default=[], metavar="FIELD=V1,V2")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the grid's, else cuda if available)")
    p.add_argument("--out", type=Path, help="results folder (default: a temporary one)")
    a = p.parse_args(argv)

    from bench.errors import UsageError
    from bench.launch import prepare_run, run_grid
    from reports.results import load_results

    with tempfile.TemporaryDirectory(prefix="step_cost-") as tmp:
        try:
            name, cells, out, _ = prepare_run(a.grid, a.filter, a.set, a.device, None, a.out or tmp)
            if any(c.kind != "profile" for c in cells):
                raise UsageError(f"grid {name!r} has train cells: step_cost measures profile cells (set kind=profile)")
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        outcome = run_grid(cells, out)
        df = load_results(out)
    c = cells[0]
    print(f"\n{c.arch} on {c.dataset}, batch {c.batch_size}, {c.steps} measured steps after {c.warmup_steps} warm-up, "
          f"{c.device}")
    print(table(df))
    for cell, status, err in outcome.failed:
        print(f"FAILED [{status}] {cell.label}: {(err or '').strip().splitlines()[0] if err else ''}")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
