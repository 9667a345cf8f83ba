"""What a grid pays per cell outside the cell itself, against a bare ``import torch`` measured in the same run.

    python benchmarks/cell_start.py                    # 12 tiny profile cells (cnn_digits on digits, 3 steps), CPU
    python benchmarks/cell_start.py --rounds 3 --cells 6

Each round times ``python -c "import torch"`` (three times, the median), then runs the tiny grid through the real
command line (``run_bench.py run``, a fresh results folder), then times ``import torch`` again, so both figures
meet the same machine. From the grid's wall time W and its rows:

- inside a cell: ``cell_wall_s`` (the median over the cells);
- outside the cells, per cell: (W - sum of ``cell_wall_s``) / cells: the launcher's own start, each worker's start,
  reading and writing the folder;
- start of a cell: ``time_start_s`` (the median; from the launcher's request to the cell's start), where rows have
  it;
- grid wall per cell: W / cells.

The last two ratios are the targets: outside per cell at most 0.3 x ``import torch``, grid wall per cell at most
1.0 x. The medians over the rounds are printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("bptt_m", "bptt_s", "rate_m", "rate_s", "sltt", "ottt_a")
TARGET_OUTSIDE = 0.3  # outside the cells, per cell, in bare imports of torch
TARGET_WALL = 1.0  # the grid's wall time per cell, in bare imports of torch


def tiny_grid(cells: int) -> str:
    """``cells`` tiny profile cells: the methods above at T 1 and 8, in that order, the first ``cells`` of them."""
    Ts = (1, 8)
    pairs = [(m, T) for m in METHODS for T in Ts][:cells]
    methods = sorted({m for m, _ in pairs}, key=METHODS.index)
    excluded = [f'[[exclude]]\nmethod = "{m}"\nT = {T}\n' for m in methods for T in Ts if (m, T) not in pairs]
    return (f'name = "cell_start"\n[axes]\nmethod = {json.dumps(methods)}\nT = {list(Ts)}\n'
            '[fixed]\narch = "cnn_digits"\ndataset = "digits"\nkind = "profile"\nbatch_size = 32\nwarmup_steps = 2\n'
            'steps = 3\nlr = 0.01\ndevice = "cpu"\n' + "".join(excluded))


def import_torch_s(times: int = 3) -> float:
    walls = []
    for _ in range(times):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def run_grid(grid: Path, out: Path, extra: list[str]) -> tuple[float, list[dict]]:
    """(the command's wall time, the rows it stored)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "run_bench.py"), "run", str(grid), "--out", str(out), *extra],
                       cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"the grid failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    from reports.results import load_results

    return wall, load_results(out).to_dict("records")


def measure_round(grid: Path, extra: list[str]) -> dict:
    before = import_torch_s()
    with tempfile.TemporaryDirectory(prefix="snnbench-cell-start-") as tmp:
        wall, rows = run_grid(grid, Path(tmp) / "out", extra)
    after = import_torch_s()
    n = len(rows)
    inside = [r["cell_wall_s"] for r in rows]
    starts = [r.get("time_start_s") for r in rows if r.get("time_start_s") is not None]
    torch_s = statistics.median([before, after])
    outside = (wall - sum(inside)) / n
    return {"cells": n, "import_torch_s": torch_s, "grid_wall_s": wall, "wall_per_cell_s": wall / n,
            "inside_median_s": statistics.median(inside), "outside_per_cell_s": outside,
            "start_median_s": statistics.median(starts) if starts else None,
            "outside_ratio": outside / torch_s, "wall_ratio": wall / n / torch_s}


def show(name: str, r: dict) -> str:
    start = f"{r['start_median_s']:.3f}" if r["start_median_s"] is not None else "-"
    return (f"{name:>8} {r['cells']:>5} {r['import_torch_s']:>8.2f} {r['grid_wall_s']:>8.1f} {r['wall_per_cell_s']:>9.2f}"
            f" {r['inside_median_s']:>9.3f} {r['outside_per_cell_s']:>9.3f} {start:>8} {r['outside_ratio']:>8.2f}x"
            f" {r['wall_ratio']:>7.2f}x")


HEADER = (f"{'round':>8} {'cells':>5} {'torch_s':>8} {'grid_s':>8} {'wall/cell':>9} {'inside':>9} {'outside':>9}"
          f" {'start':>8} {'out/torch':>9} {'wall/torch':>8}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cells", type=int, default=12, help="how many tiny cells (at most 12)")
    p.add_argument("--launcher-args", default="", help="extra arguments for `run`, e.g. '--in-process'")
    a = p.parse_args(argv)
    if not 1 <= a.cells <= 2 * len(METHODS):
        p.error(f"--cells: 1 to {2 * len(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="snnbench-cell-start-grid-") as tmp:
        grid = Path(tmp) / "cell_start.toml"
        grid.write_text(tiny_grid(a.cells))
        print(HEADER, flush=True)
        rounds = []
        for i in range(a.rounds):
            rounds.append(measure_round(grid, a.launcher_args.split()))
            print(show(str(i + 1), rounds[-1]), flush=True)
    med = {k: statistics.median([r[k] for r in rounds]) if all(r[k] is not None for r in rounds) else None
           for k in rounds[0]}
    print(show("median", med))
    print(f"targets: outside the cells {med['outside_ratio']:.2f}x import torch (at most {TARGET_OUTSIDE}x), "
          f"grid wall per cell {med['wall_ratio']:.2f}x (at most {TARGET_WALL}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
