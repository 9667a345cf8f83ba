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
    from .cell import Cell
    from .errors import StoreFailed
    from .rows import store_result
    from .spawn import PROGRESS_PREFIX, STORE_FAILED_EXIT
    from .runner import run_cell

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cell", required=True)
    p.add_argument("--data-root")
    p.add_argument("--concurrent", type=int, default=1, help="cells the launcher runs side by side (recorded)")
    p.add_argument("--requested-at", type=float, help="when the launcher asked for this worker (time.time())")
    a = p.parse_args(argv)
    cell = Cell(**json.loads(a.cell))
    _threads_from_slurm()
    last = [0.0]

    def progress(d: dict) -> None:
        now = time.perf_counter()
        if now - last[0] >= 0.2:
            last[0] = now
            print(PROGRESS_PREFIX + json.dumps(d), flush=True)

    from . import distributed

    ranks = distributed.from_env() if cell.devices > 1 else None
    if ranks is not None:  # one rank of a multi-device cell: its result goes to the worker above, which stores
        return run_rank(cell, a, ranks, progress)
    if cell.devices > 1:
        res = run_ranks(cell, argv if argv is not None else sys.argv[1:])
    else:
        res = run_cell(cell, a.data_root, progress, out=a.out, concurrent=a.concurrent, requested_at=a.requested_at)
    try:
        store_result(a.out, cell, res)
    except StoreFailed as e:  # a full disk, say: the launcher stops the grid with this message
        print(PROGRESS_PREFIX + json.dumps({"status": res.status, "store_error": str(e)}), flush=True)
        return STORE_FAILED_EXIT
    if res.row.get("error") and res.status != "preempted":
        print(res.row["error"], file=sys.stderr)
    print(PROGRESS_PREFIX + json.dumps({"status": res.status, "error": (res.row.get("error") or "")[:500] or None}), flush=True)
    return 0


def run_rank(cell, a, ranks, progress) -> int:
    """A rank: run the cell as this rank, leave the Result for the worker; a failed cell ends the process with
    exit 1, so the launcher stops the other ranks rather than leave them waiting in a collective."""
    import torch

    from . import distributed
    from .runner import run_cell

    Path(os.environ[distributed.RANK_DIR_ENV], f"pid{ranks.rank}").write_text(str(os.getpid()))
    res = run_cell(cell, a.data_root, progress if ranks.main else None, out=a.out, concurrent=a.concurrent,
                   ranks=ranks, requested_at=a.requested_at)
    torch.save(res, distributed.rank_file(ranks.rank))
    if res.status not in ("ok", "preempted"):
        print(f"rank {ranks.rank}: {res.row.get('error')}", file=sys.stderr, flush=True)
        return 1
    return 0


def run_ranks(cell, argv: list[str]):
    """Start the cell's ranks with torch.distributed.run, pass stop signals on to them, and make their results
    one (bench.distributed.combine)."""
    import subprocess
    import tempfile

    import torch

    from . import distributed
    from .rows import Result, failure_row

    with tempfile.TemporaryDirectory(prefix="snnbench-ranks-") as tmp:
        env = {**os.environ, distributed.RANK_DIR_ENV: tmp}
        env.setdefault("OMP_NUM_THREADS", "1")  # each rank sets its share of the threads (bench/distributed.py)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cell.devices}",
               "-m", "bench.worker", *argv]
        proc = subprocess.Popen(cmd, env=env)
        told = False
        while proc.poll() is None:
            if STOP.requested and not told:  # the ranks checkpoint together at their next step boundary
                for f in Path(tmp).glob("pid*"):
                    try:
                        os.kill(int(f.read_text()), STOP.signum)
                    except (OSError, ValueError):
                        pass
                told = True
            time.sleep(0.1)
        results = []
        for r in range(cell.devices):
            path = Path(tmp) / f"rank{r}.pt"
            results.append(torch.load(path, weights_only=False) if path.is_file() else None)
    try:
        return distributed.combine(results, cell.devices)
    except RuntimeError as e:
        return Result(failure_row(cell, "error", f"{e} (torch.distributed.run exited {proc.returncode})"))


if __name__ == "__main__":
    sys.exit(main())
