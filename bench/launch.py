"""Where cells run: in this process, in a fresh subprocess per cell (the default), or on Slurm (submitit).

A fresh worker per cell gives each cell its own peak memory, and turns a crash or an out-of-memory
kill into a stored row (status ``oom`` or ``error``) while the grid goes on. A rerun skips cells whose
key is stored with status ok.
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
from typing import Callable

from .grid import Cell
from .store import stored_ok_keys, write_cell

REPO = Path(__file__).resolve().parents[1]
PROGRESS_PREFIX = "@snnbench-progress "


@dataclass
class GridOutcome:
    ran: list[tuple[Cell, str, str | None]] = field(default_factory=list)  # (cell, status, error)
    skipped: list[Cell] = field(default_factory=list)

    @property
    def failed(self) -> list[tuple[Cell, str, str | None]]:
        return [r for r in self.ran if r[1] != "ok"]


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
    from methods import METHODS

    steps = cell.epochs * 50 if cell.kind == "train" else cell.warmup_steps + 1 + cell.steps
    per_t = getattr(METHODS.get(cell.method), "eta_timestep_cost", 1.0)
    return 10.0 + cell.T * steps * per_t


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker dies with the grid process, so killing a grid leaves no orphan cell."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_in_subprocess(cell: Cell, out: Path, data_root: str | None, on_progress: Callable[[dict], None]) -> tuple[str, str | None]:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{cell.key}.log"
    cmd = [sys.executable, "-m", "bench.worker", "--out", str(out), "--cell", json.dumps(cell.config())]
    if data_root:
        cmd += ["--data-root", str(data_root)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    status: dict = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env,
                                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
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
    if status:
        return status["status"], status.get("error")
    # the worker died before it could store its row: store one for it
    from .runner import failure_row

    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    if rc == -signal.SIGKILL:
        st, msg = "oom", f"worker killed by SIGKILL (most likely the out-of-memory killer); log tail:\n{tail}"
    else:
        st, msg = "error", f"worker exited with code {rc} without storing a result; log tail:\n{tail}"
    write_cell(out, cell.key, failure_row(cell, st, msg))
    return st, msg


def run_in_process(cell: Cell, out: Path, data_root: str | None, on_progress: Callable[[dict], None]) -> tuple[str, str | None]:
    from .runner import run_cell

    res = run_cell(cell, data_root, on_progress)
    write_cell(out, cell.key, res.row, res.epochs, res.samples)
    return res.status, res.row.get("error")


def _slurm_job(cell_cfg: dict, out: str, data_root: str | None) -> tuple[str, str | None]:  # pragma: no cover - on a cluster
    return run_in_process(Cell(**cell_cfg), Path(out), data_root, lambda d: None)


def run_on_slurm(cells: list[Cell], out: Path, data_root: str | None, slurm: dict, display: ProgressDisplay,
                 outcome: GridOutcome) -> None:  # pragma: no cover - needs a cluster (or submitit's local executor)
    try:
        import submitit
    except ImportError:
        from .errors import UsageError

        raise UsageError('the Slurm launcher needs submitit: pip install -e ".[slurm]"') from None
    ex = submitit.AutoExecutor(folder=str(out / "slurm" / "%j"), cluster=slurm.pop("cluster", None))
    ex.update_parameters(**slurm)
    jobs = ex.map_array(_slurm_job, [c.config() for c in cells], [str(out)] * len(cells), [data_root] * len(cells))
    for cell, job in zip(cells, jobs):
        display.start_cell(cell)
        try:
            st, err = job.result()
        except Exception as e:  # the job died: store its row here
            from .runner import failure_row

            st, err = "error", f"Slurm job {job.job_id} failed: {e}"
            write_cell(out, cell.key, failure_row(cell, st, err))
        outcome.ran.append((cell, st, err))
        display.end_cell(st)


def run_grid(cells: list[Cell], out: Path, data_root: str | None = None, launcher: str = "subprocess",
             slurm: dict | None = None, stream=None) -> GridOutcome:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = stored_ok_keys(out)
    outcome = GridOutcome()
    todo = []
    for c in cells:
        (outcome.skipped if c.key in done else todo).append(c)
    display = ProgressDisplay(len(cells), stream, work_left=sum(cell_cost(c) for c in todo))
    display.done = len(outcome.skipped)
    if outcome.skipped:
        (stream or sys.stderr).write(f"{len(outcome.skipped)} cell(s) already stored with status ok: skipped\n")
    if launcher == "slurm":
        run_on_slurm(todo, out, data_root, dict(slurm or {}), display, outcome)
        return outcome
    run = run_in_process if launcher == "inprocess" else run_in_subprocess
    for cell in todo:
        display.start_cell(cell)
        st, err = run(cell, out, data_root, display.update)
        outcome.ran.append((cell, st, err))
        display.end_cell(st)
    return outcome

