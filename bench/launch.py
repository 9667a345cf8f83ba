"""Where cells run: in this process, in a fresh subprocess per cell (the default), or on Slurm (submitit).

A fresh worker per cell gives each cell its own peak memory, and turns a crash or an out-of-memory
kill into a stored row (status ``oom`` or ``error``) while the grid goes on. A rerun skips cells whose
key is stored with status ok by the same code (see bench/fingerprint.py), and reruns stale ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from reports.results import (FolderLock, device_type, load_results, remove_stray_temp_files, update_manifest,
                             write_cell)

from .errors import UsageError
from .fingerprint import fingerprint, is_current
from .grid import Cell
from .stop import STOP

REPO = Path(__file__).resolve().parents[1]
PROGRESS_PREFIX = "@snnbench-progress "
# the relative cost of one timestep where it is far from a LIF network's, for the progress line's ETA only
# (hm2bp: elementwise work on [B, N], ~0.4 ms per timestep at B=16 against ~4 ms for cnn_digits)
ETA_TIMESTEP_COST = {"hm2bp": 0.1}


class StoreFailed(Exception):
    """A result could not be stored (a full disk, a folder gone): the grid stops. The message names the cause,
    the cell and the cells left."""


# statuses of a cell that is to be continued (a rerun resumes it from its checkpoint), not a failure
TO_CONTINUE = ("preempted", "cancelled")


@dataclass
class GridOutcome:
    ran: list[tuple[Cell, str, str | None]] = field(default_factory=list)  # (cell, status, error)
    skipped: list[Cell] = field(default_factory=list)
    stale_kept: list[Cell] = field(default_factory=list)
    queued: list[Cell] = field(default_factory=list)  # pending or running under Slurm already: not resubmitted
    submitted: list[dict] = field(default_factory=list)  # Slurm jobs submitted (bench/slurm.py)
    not_started: list[Cell] = field(default_factory=list)  # left when a stop signal ended the grid
    stopped_by: str | None = None

    @property
    def failed(self) -> list[tuple[Cell, str, str | None]]:
        return [r for r in self.ran if r[1] != "ok" and r[1] not in TO_CONTINUE]

    @property
    def preempted(self) -> list[tuple[Cell, str, str | None]]:
        return [r for r in self.ran if r[1] in TO_CONTINUE]


class ProgressDisplay:
    """One status line: cells done/left, the current cell, epoch and step, ETA."""

    def __init__(self, total: int, stream=None, work_left: float | None = None) -> None:
        self.total, self.done = total, 0
        self.work_left = work_left  # estimated cost of the cells still to run (ETA weighting)
        self._work_done = 0.0
        self._cell_work = 0.0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.cell_t0 = self.t0
        self.current = ""
        self.detail: dict = {}
        self._last = 0.0
        self._cell_times: list[float] = []

    def start_cell(self, cell: Cell) -> None:
        self.current, self.detail = cell.label, {}
        self._cell_work = cell_cost(cell)
        self.cell_t0 = time.perf_counter()
        self.render(force=True)

    def update(self, detail: dict) -> None:
        self.detail = detail
        self.render()

    def end_cell(self, status: str) -> None:
        self._cell_times.append(time.perf_counter() - self.cell_t0)
        self.done += 1
        self._work_done += self._cell_work
        if self.work_left is not None:
            self.work_left -= self._cell_work
        self.render(force=True, final=status)

    def eta_s(self) -> float | None:
        left = self.total - self.done
        if not self._cell_times:
            d = self.detail
            if d.get("steps") and d.get("step"):
                per_cell = (time.perf_counter() - self.cell_t0) * d["steps"] / d["step"]
                return per_cell * left - (time.perf_counter() - self.cell_t0)
            return None
        if self.work_left is not None and self._work_done > 0:
            return sum(self._cell_times) / self._work_done * self.work_left
        return sum(self._cell_times) / len(self._cell_times) * left

    def render(self, force: bool = False, final: str | None = None) -> None:
        now = time.perf_counter()
        if not force and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        d = self.detail
        where = ""
        if d.get("epochs"):
            where = f" epoch {d.get('epoch')}/{d['epochs']}"
        if d.get("steps"):
            where += f" step {d.get('step')}/{d['steps']}"
        eta = self.eta_s()
        eta_s = f" ETA {int(eta // 60)}m{int(eta % 60):02d}s" if eta is not None else ""
        state = f" -> {final}" if final else ""
        line = f"[{self.done}/{self.total} done, {self.total - self.done} left] {self.current}{where}{state}{eta_s}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def cell_cost(cell: Cell) -> float:
    """A rough relative cost of a cell for the ETA: steps x T x the method's cost of a timestep (plus a fixed
    start-up)."""
    steps = cell.epochs * 50 if cell.kind == "train" else cell.warmup_steps + 1 + cell.steps
    per_t = ETA_TIMESTEP_COST.get(cell.method, 1.0)
    return 10.0 + cell.T * steps * per_t


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker dies with the grid process, so killing a grid leaves no orphan cell."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


STORE_FAILED_EXIT = 3  # the worker's exit code when it could not store its row


def _store(out: Path, cell: Cell, row: dict, epochs=None, samples=None) -> None:
    try:
        write_cell(out, cell.key, row, epochs, samples)
    except OSError as e:
        raise StoreFailed(f"cannot store the result of {cell.label} in {out}: {e}") from None


def run_in_subprocess(cell: Cell, out: Path, data_root: str | None, on_progress: Callable[[dict], None],
                      on_start: Callable[[subprocess.Popen], None] | None = None,
                      stopping: Callable[[], bool] = lambda: False) -> tuple[str, str | None]:
    """Run a cell in a fresh worker (bench/worker.py) and return its (status, error). A worker that dies without
    storing its row gets one here (``oom`` for SIGKILL, else ``error``), unless it died while being stopped
    (``stopping()``): then its last checkpoint stands and the status is ``preempted``."""
    logs = out / "logs"
    log_path = logs / f"{cell.key}.log"
    cmd = [sys.executable, "-m", "bench.worker", "--out", str(out), "--cell", json.dumps(cell.config())]
    if data_root:
        cmd += ["--data-root", str(data_root)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    status: dict = {}
    try:
        logs.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a" if cell.kind == "train" else "w") as log:  # a resumed cell's log goes on
            if log.tell():
                log.write(f"\n--- run again at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n")
                log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env,
                                    preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
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
    from .runner import failure_row

    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    if rc == -signal.SIGKILL:
        st, msg = "oom", f"worker killed by SIGKILL (most likely the out-of-memory killer); log tail:\n{tail}"
    else:
        st, msg = "error", f"worker exited with code {rc} without storing a result; log tail:\n{tail}"
    _store(out, cell, failure_row(cell, st, msg))
    return st, msg


def run_in_process(cell: Cell, out: Path, data_root: str | None, on_progress: Callable[[dict], None]) -> tuple[str, str | None]:
    from .runner import run_cell

    res = run_cell(cell, data_root, on_progress, out=out)
    if res.status == "preempted":
        _store(out, cell, res.row)
    else:
        _store(out, cell, res.row, res.epochs, res.samples)
    return res.status, res.row.get("error")


def stored_ok(out: Path) -> dict[str, str | None]:
    """key -> code fingerprint of every cell stored with status ok."""
    df = load_results(out, "cells")
    if df.empty:
        return {}
    fps = df["code_fingerprint"] if "code_fingerprint" in df else [None] * len(df)
    return {k: (None if not isinstance(fp, str) else fp) for k, st, fp in zip(df["key"], df["status"], fps) if st == "ok"}


def run_grid(cells: list[Cell], out: Path, data_root: str | None = None, launcher: str = "subprocess",
             slurm=None, stream=None, reuse_stale: bool = False, detach: bool = False,
             poll_s: float = 10.0) -> GridOutcome:
    """Run the cells not yet stored ok with the current code. Cells stored ok by other code (stale) are rerun,
    or kept with ``reuse_stale``; cells pending or running under Slurm (submitted from this folder) are left
    to their jobs. Holds the folder's lock while it runs; raises StoreFailed when a result cannot be stored (the
    cells stored before stay as they are).

    SIGTERM, SIGUSR1 or SIGUSR2 to the grid process reach the running worker, which checkpoints and ends its
    cell as ``preempted``; no further cell starts. ``launcher="slurm"`` submits the cells as a job array
    (``slurm``: bench.slurm.SlurmSettings) and watches them unless ``detach``."""
    out = Path(out)
    stream = stream or sys.stderr
    with FolderLock(out) as lock:
        if lock.taken_over:
            stream.write(f"took over the lock of a run that is no longer alive (pid {lock.taken_over.get('pid')})\n")
        remove_stray_temp_files(out)
        current = {t: fingerprint(t) for t in sorted({device_type(c.device) for c in cells})}
        try:
            update_manifest(out, cells[0].grid if cells else "", {c.key: c.config() for c in cells}, current)
        except OSError as e:
            raise StoreFailed(f"cannot write the manifest of {out}: {e}\nno cell ran: {len(cells)} cell(s) not stored. "
                              "Free the space and run the same command again.") from None
        stored = stored_ok(out)
        queued = _queued(out, stream)
        outcome = GridOutcome()
        todo, stale = [], []
        for c in cells:
            if c.key in queued:
                outcome.queued.append(c)
            elif c.key not in stored:
                todo.append(c)
            elif is_current(stored[c.key], c.device):
                outcome.skipped.append(c)
            elif reuse_stale:
                outcome.stale_kept.append(c)
            else:
                stale.append(c)
                todo.append(c)
        if outcome.skipped:
            stream.write(f"{len(outcome.skipped)} cell(s) already stored with status ok: skipped\n")
        if outcome.queued:
            jobs = sorted({queued[c.key] for c in outcome.queued})
            stream.write(f"{len(outcome.queued)} cell(s) pending or running under Slurm (job(s) "
                         + ", ".join(jobs[:5]) + (", ..." if len(jobs) > 5 else "") + "): not submitted again\n")
        if stale:
            stream.write(f"{len(stale)} cell(s) stale (code changed since they ran): rerunning "
                         "(--reuse-stale keeps them)\n")
        if outcome.stale_kept:
            stream.write(f"{len(outcome.stale_kept)} cell(s) stale (code changed since they ran): kept, as "
                         "--reuse-stale asks; report and check mark them\n")
        if launcher == "slurm":
            if todo or outcome.queued:
                _run_on_slurm(todo, out, data_root, slurm, outcome, stream, detach, poll_s)
            return outcome
        display = ProgressDisplay(len(cells), stream, work_left=sum(cell_cost(c) for c in todo))
        display.done = len(cells) - len(todo)
        STOP.clear()
        STOP.install()
        worker: list[subprocess.Popen] = []

        def forward(signum: int) -> None:  # a signal to the grid process reaches its worker
            if worker and worker[0].poll() is None:
                worker[0].send_signal(signum)

        undo = STOP.forward(forward)
        try:
            for i, cell in enumerate(todo):
                if STOP.requested:
                    outcome.not_started = todo[i:]
                    break
                display.start_cell(cell)
                lock.note_cell(cell.label)
                try:
                    if launcher == "inprocess":
                        st, err = run_in_process(cell, out, data_root, display.update)
                    else:
                        st, err = run_in_subprocess(cell, out, data_root, display.update,
                                                    on_start=worker.append,
                                                    stopping=lambda: STOP.requested)
                except StoreFailed as e:
                    left = todo[i:]
                    raise StoreFailed(f"{e}\nthe grid stopped: {len(left)} cell(s) not stored ("
                                      + ", ".join(c.label for c in left[:5]) + (", ..." if len(left) > 5 else "")
                                      + f"); the {len(outcome.ran) + len(outcome.skipped)} cell(s) stored before stay "
                                      "readable. Free the space and run the same command again.") from None
                finally:
                    worker.clear()
                outcome.ran.append((cell, st, err))
                display.end_cell(st)
            outcome.stopped_by = STOP.name
        finally:
            undo()
            STOP.uninstall()
            lock.note_cell(None)
    return outcome


def _queued(out: Path, stream) -> dict[str, str]:
    """Cells of this folder whose Slurm job is pending or running (key -> job id)."""
    from .slurm import active_cells, queue_states, read_jobs

    if not read_jobs(out):
        return {}
    if queue_states(out) is None:
        stream.write("warning: cells of this folder were submitted to Slurm, but squeue cannot be asked: cells still "
                     "queued there may run twice\n")
        return {}
    return active_cells(out)


def _run_on_slurm(todo: list[Cell], out: Path, data_root, settings, outcome: GridOutcome, stream, detach: bool,
                  poll_s: float) -> None:
    """Submit ``todo``; unless ``detach``, watch it and the cells already queued from this folder to their end."""
    from .slurm import latest_jobs, submit, wait

    records = submit(todo, out, data_root, settings) if todo else []
    outcome.submitted = records
    if records:
        ids = [r["job_id"] for r in records]
        stream.write(f"submitted {len(todo)} cell(s) as {len(records)} Slurm task(s): {ids[0]}"
                     + (f" .. {ids[-1]}" if len(ids) > 1 else "") + f"; job ids in {out / 'slurm' / 'jobs.json'}\n")
    if detach:
        stream.write(f"detached: `run_bench.py status {out}` shows their progress\n")
        return
    latest = latest_jobs(out)
    earlier = {id(latest[c.key]): latest[c.key] for c in outcome.queued}
    watched = {c.key: c for c in todo + outcome.queued}
    outcome.ran.extend(wait(records + list(earlier.values()), watched, out, stream, poll_s))


# ---------------------------------------------------------------- before a grid runs: every bad input, exit 2


def auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_devices(cells) -> None:
    """A cell on a CUDA device where there is none is bad input, not a failed cell."""
    wanted = sorted({c.device for c in cells if c.device.startswith("cuda")})
    if wanted:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"device {', '.join(wanted)}: no CUDA device is available here (use --device cpu)")
        n = torch.cuda.device_count()
        bad = [d for d in wanted if ":" in d and (not d.split(":")[1].isdigit() or int(d.split(":")[1]) >= n)]
        if bad:
            raise UsageError(f"device {', '.join(bad)}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")


def check_out_dir(path: Path) -> Path:
    """A results folder that can be written: created if need be, and proven writable by a probe file."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".snnbench-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise UsageError(f"--out {str(path)!r} is a file, not a folder") from None
    except NotADirectoryError:
        raise UsageError(f"--out {str(path)!r} lies under a file, not a folder") from None
    except OSError as e:
        raise UsageError(f"--out {str(path)!r} cannot be used as a results folder: {e.strerror}") from None
    return path


class PreparedRun(NamedTuple):
    name: str
    cells: list[Cell]
    out: Path
    spec: dict  # the grid file's tables (its [slurm] table, say)


def prepare_run(grid: str, filters: list[str], sets: list[str], device: str | None, data_root: str | None,
                out: str | None) -> PreparedRun:
    """(grid name, cells, results folder, grid spec) of a run, after every check a user's input can fail: the
    grid, the values, the devices, the data folders and the results folder. Raises UsageError, before any cell
    runs."""
    from .data import check_dataset, dataset_info
    from .grid import expand, load_grid, parse_filters, parse_sets

    if data_root and not Path(data_root).is_dir():
        raise UsageError(f"data folder {data_root!r} does not exist")
    name, spec = load_grid(grid)
    cells = expand(spec, name, parse_filters(filters), parse_sets(sets),
                   device=None if device in (None, "auto") else device, default_device=auto_device())
    if not cells:
        raise UsageError(f"grid {name!r} has no cells left after the filters")
    check_devices(cells)
    for ds in sorted({c.dataset for c in cells}):  # missing data: one message before any cell runs
        if dataset_info(ds).folder is not None:
            check_dataset(ds, data_root)
    return PreparedRun(name, cells, check_out_dir(Path(out) if out else REPO / "results" / name), spec)
