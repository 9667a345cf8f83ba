"""A cell in a process of its own: start its worker (bench/worker.py), read its progress, and store a row for a
worker that died before it could; or run it in this process. The launcher (bench/launch.py) and a Slurm task
(bench/slurm.py) both start their cells here, so neither reaches into the other.

Nothing here computes a number of a row: the worker measures and stores. A worker that dies leaves a failure row
(``oom`` for SIGKILL, else ``error``) made by bench/rows.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from reports.results import load_results

from . import REPO
from .cell import Cell
from .errors import StoreFailed
from .fingerprint import is_current
from .forkserver import ForkServer, ServedProcess, set_pdeathsig

PROGRESS_PREFIX = "@snnbench-progress "  # a worker's stdout line that carries progress, and at last its status
STORE_FAILED_EXIT = 3  # the worker's exit code when it could not store its row


def run_in_subprocess(cell: Cell, out: Path, data_root: str | None, on_progress: Callable[[dict], None],
                      on_start: Callable[[subprocess.Popen | ServedProcess], None] | None = None,
                      stopping: Callable[[], bool] = lambda: False, env: dict | None = None,
                      concurrent: int = 1, server: ForkServer | None = None) -> tuple[str, str | None]:
    """Run a cell in a fresh worker (bench/worker.py) and return its (status, error): a child of ``server`` where
    one is given and can serve the worker's environment, else a process started afresh. A worker that dies without
    storing its row gets one here (``oom`` for SIGKILL, else ``error``), unless it died while being stopped
    (``stopping()``): then its last checkpoint stands and the status is ``preempted``."""
    logs = out / "logs"
    log_path = logs / f"{cell.key}.log"
    args = ["--out", str(out), "--cell", json.dumps(cell.config())]
    if data_root:
        args += ["--data-root", str(data_root)]
    if concurrent > 1:
        args += ["--concurrent", str(concurrent)]
    env = worker_env(env)
    status: dict = {}
    try:
        logs.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a" if cell.kind == "train" else "w") as log:  # a resumed cell's log goes on
            if log.tell():
                log.write(f"\n--- run again at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n")
                log.flush()
            proc = start_worker(args + ["--requested-at", repr(time.time())], env, log, server)
            if on_start:
                on_start(proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    msg = json.loads(line[len(PROGRESS_PREFIX):])
                    if "status" in msg:
                        status = msg
                    else:
                        on_progress(msg)
                else:
                    log.write(line)
            rc = proc.wait()
    except OSError as e:  # the log could not be written: the folder is no place to store results either
        raise StoreFailed(f"cannot write the log of {cell.label} in {logs}: {e}") from None
    if status.get("store_error"):
        raise StoreFailed(status["store_error"])
    if status:
        return status["status"], status.get("error")
    if stopping():
        return "preempted", f"the worker was stopped (exit {rc}) before it could store a row; its last checkpoint stands"
    # the worker died before it could store its row: store one for it
    from .rows import Result, failure_row, store_result

    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    if rc == -signal.SIGKILL:
        st, msg = "oom", f"worker killed by SIGKILL (most likely the out-of-memory killer); log tail:\n{tail}"
    else:
        st, msg = "error", f"worker exited with code {rc} without storing a result; log tail:\n{tail}"
    store_result(out, cell, Result(failure_row(cell, st, msg)))
    return st, msg


def worker_env(extra: dict | None = None) -> dict:
    """A worker's environment: this process's, with ``extra``, unbuffered output and this tree first on the path."""
    env = {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_worker(args: list[str], env: dict, log, server: ForkServer | None,
                  module: str = "bench.worker") -> subprocess.Popen | ServedProcess:
    """``python -m MODULE ARGS`` (a cell's worker, or a plan's probe): forked by ``server`` where it can, else
    started afresh (a server that cannot fork it says why in the log)."""
    if server is not None and server.can_serve(env):
        try:
            return server.spawn(module=module, argv=args, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log, stop=True)
        except RuntimeError as e:
            log.write(f"{e}\nstarting a fresh worker instead\n")
            log.flush()
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=log,
                            text=True, cwd=REPO, env=env, preexec_fn=set_pdeathsig if sys.platform.startswith("linux") else None)


def run_in_process(cell: Cell, out: Path, data_root: str | None, on_progress: Callable[[dict], None]) -> tuple[str, str | None]:
    from .rows import store_result
    from .runner import run_cell

    res = run_cell(cell, data_root, on_progress, out=out, requested_at=time.time())
    store_result(out, cell, res)
    return res.status, res.row.get("error")


def stored_ok(out: Path) -> dict[str, str | None]:
    """key -> code fingerprint of every cell stored with status ok."""
    df = load_results(out, "cells")
    if df.empty:
        return {}
    fps = df["code_fingerprint"] if "code_fingerprint" in df else [None] * len(df)
    return {k: (None if not isinstance(fp, str) else fp) for k, st, fp in zip(df["key"], df["status"], fps) if st == "ok"}


def done_here(stored: dict[str, str | None], cell: Cell) -> bool:
    """Whether ``cell`` is stored ok by this code (``stored``: ``stored_ok(out)``): nothing left to run."""
    return cell.key in stored and is_current(stored[cell.key], cell.device)
