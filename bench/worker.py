"""A fresh process that runs one cell and stores its row: ``python -m bench.worker --out DIR --cell JSON``.

Progress goes to stdout as ``@snnbench-progress {json}`` lines (throttled); the last such line carries
the cell's status once its files are stored. SIGTERM, SIGUSR1 and SIGUSR2 make a train cell checkpoint at its
next step boundary and end with status ``preempted`` (bench/stop.py); run again, it resumes.
"""

from __future__ import annotations

import sys

from .stop import STOP

STOP.install()  # before torch is imported: a stop signal during start-up is a request, not a kill

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def _threads_from_slurm() -> None:
    """Under Slurm, use the CPUs the job was given, not every core of the node."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        import torch

        from .data import available_cpus

        torch.set_num_threads(available_cpus())


def main(argv=None) -> int:
    from reports.results import write_cell

    from .grid import Cell
    from .launch import PROGRESS_PREFIX, STORE_FAILED_EXIT
    from .runner import run_cell

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cell", required=True)
    p.add_argument("--data-root")
    p.add_argument("--concurrent", type=int, default=1, help="cells the launcher runs side by side (recorded)")
    a = p.parse_args(argv)
    cell = Cell(**json.loads(a.cell))
    _threads_from_slurm()
    last = [0.0]

    def progress(d: dict) -> None:
        now = time.perf_counter()
        if now - last[0] >= 0.2:
            last[0] = now
            print(PROGRESS_PREFIX + json.dumps(d), flush=True)

    res = run_cell(cell, a.data_root, progress, out=a.out, concurrent=a.concurrent)
    try:
        write_cell(a.out, cell.key, res.row, res.epochs, res.samples)
    except OSError as e:  # a full disk, say: the launcher stops the grid with this message
        msg = f"cannot store the result of {cell.label} in {a.out}: {e}"
        print(PROGRESS_PREFIX + json.dumps({"status": res.status, "store_error": msg}), flush=True)
        return STORE_FAILED_EXIT
    if res.row.get("error") and res.status != "preempted":
        print(res.row["error"], file=sys.stderr)
    print(PROGRESS_PREFIX + json.dumps({"status": res.status, "error": (res.row.get("error") or "")[:500] or None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
