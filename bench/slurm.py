"""Cells on a Slurm cluster, through submitit: one job array per submission, requeued on preemption and time
limits, resumed from each cell's checkpoint.

A grid's ``[slurm]`` table (and ``--slurm-set KEY=VALUE``) sets the resources of one array task::

    [slurm]
    partition = "gpu"
    gpus_per_node = 1          # default: the cells' devices (1, or N for a cell on N GPUs) on cuda, else 0 (no gres)
    cpus_per_task = 8          # default: 8 per GPU (loader workers), 2 per rank for CPU cells
    mem_gb = 64                # default: the partition's
    timeout_min = 240          # each task's time limit; a cell that needs longer is requeued and resumes
                               # "auto": the task's predicted time (plan.parquet) plus a margin, capped by the partition's
    array_parallelism = 16     # tasks running at once
    cells_per_task = 1         # small cells: several per task, each still in a fresh process
                               # "auto": cells packed into tasks of about target_task_min predicted minutes
    target_task_min = 60       # cells_per_task = "auto": the length a task is packed to
    signal_delay_s = 120       # USR2 this long before the time limit: the cell checkpoints and the task requeues
    max_requeues = 100         # time-limit requeues per task (preemptions do not count)
    additional = { qos = "normal" }   # any other sbatch option

What happens to a task:

- it runs its cells one after another, each in a fresh worker (bench/worker.py), skipping those stored ok; a
  cell on N devices (``devices = N``) runs its N ranks inside the one task, which asks N GPUs (cells of different
  ``devices`` go to separate arrays);
- USR2 before the time limit: submitit calls ``SlurmTask.checkpoint``, which asks the running worker to
  checkpoint (SIGUSR1), waits for it, and returns the same task for submitit to requeue (``scontrol requeue``);
- a preemption or ``scontrol requeue`` sends SIGTERM to every process of the job: the worker checkpoints and
  stores its row as ``preempted``; Slurm requeues the job, whose next run resumes the cell;
- ``scancel`` also sends SIGTERM, but the job's restart count does not grow: the task stores the cell as
  ``cancelled`` (its checkpoint is kept; a rerun of the grid resubmits it and it resumes).

``<results>/slurm/jobs.json`` records which job runs which cells; ``<results>/slurm/<job id>/`` holds submitit's
files and the job's log. ``queue_states`` asks ``squeue`` for the jobs' states, which ``run`` (never resubmit a
cell that is pending or running) and ``status`` read.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from reports.results import load_results, write_atomic, write_cell

from .cell import Cell, run_phases
from .errors import UsageError

JOBS = Path("slurm") / "jobs.json"
POLL_S = 10.0  # how often `run --slurm` looks at the queue and the stored rows, in seconds
# squeue states in which a job will still run (or is running) its cells
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


AUTO = "auto"  # timeout_min and cells_per_task: sized from the results folder's plan (bench/plan.py)
AUTO_SETTINGS = ("timeout_min", "cells_per_task")
# timeout_min=auto: a task's limit is its predicted time plus this share, plus the warning signal's lead and
# AUTO_SLACK_MIN minutes (the task's own start, a slower node), capped by the partition's limit
AUTO_MARGIN = 0.25
AUTO_SLACK_MIN = 2


@dataclass
class SlurmSettings:
    partition: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int | str = 240  # or AUTO
    array_parallelism: int = 256
    cells_per_task: int | str = 1  # or AUTO
    target_task_min: float = 60.0
    signal_delay_s: int = 120
    max_requeues: int = 100
    additional: dict = field(default_factory=dict)

    @classmethod
    def make(cls, table: dict | None, overrides: dict | None, cells: list[Cell]) -> "SlurmSettings":
        """The settings of a grid's ``[slurm]`` table with the command line's overrides, checked (UsageError)."""
        valid = {f.name: f for f in fields(cls)}
        values = {}
        for source, items in (("the grid's [slurm] table", table or {}), ("--slurm-set", overrides or {})):
            if not isinstance(items, dict):
                raise UsageError(f"{source} must be a table of settings; valid: {', '.join(valid)}")
            for k, v in items.items():
                if k not in valid:
                    raise UsageError(f"{source}: unknown Slurm setting {k!r}; valid: {', '.join(valid)}")
                values[k] = _coerce(k, v, source)
        s = cls(**values)
        s.explicit = set(values)
        gpu = any(c.device.startswith("cuda") for c in cells)
        widest = max((c.devices for c in cells if c.device.startswith("cuda")), default=1)
        if gpu and s.gpus_per_node is not None and s.gpus_per_node < widest:
            raise UsageError(f"a cell on {widest} devices runs its ranks in one task, which needs {widest} GPUs; "
                             f"gpus_per_node is {s.gpus_per_node}")
        return s.for_devices(max((c.devices for c in cells), default=1), gpu)

    def for_devices(self, devices: int, gpu: bool) -> "SlurmSettings":
        """These settings for a task whose cells run on ``devices`` devices each: unless set, that many GPUs
        (cuda cells; none otherwise) and 8 CPUs per GPU (loader workers), or 2 CPUs per CPU rank."""
        explicit = getattr(self, "explicit", set())
        s = SlurmSettings(**{f.name: getattr(self, f.name) for f in fields(self)})
        s.explicit = explicit
        if "gpus_per_node" not in explicit:
            s.gpus_per_node = devices if gpu else 0
        if "cpus_per_task" not in explicit:
            s.cpus_per_task = (8 if gpu else 2) * devices
        return s

    def executor_parameters(self) -> dict:
        p = {"timeout_min": self.timeout_min, "cpus_per_task": self.cpus_per_task, "tasks_per_node": 1, "nodes": 1,
             "slurm_array_parallelism": self.array_parallelism, "slurm_signal_delay_s": self.signal_delay_s}
        if self.gpus_per_node:
            p["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            p["mem_gb"] = self.mem_gb
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.additional:
            p["slurm_additional_parameters"] = dict(self.additional)
        return p


def _coerce(k: str, v, source: str):
    if k in AUTO_SETTINGS and v == AUTO:
        return AUTO
    want = {"partition": str, "gpus_per_node": int, "cpus_per_task": int, "mem_gb": float, "timeout_min": int,
            "array_parallelism": int, "cells_per_task": int, "signal_delay_s": int, "max_requeues": int,
            "additional": dict, "target_task_min": float}[k]
    try:
        if want is dict:
            v = json.loads(v) if isinstance(v, str) else v
            if not isinstance(v, dict):
                raise ValueError
            return v
        if want is str:
            return str(v)
        v = want(v)
    except (TypeError, ValueError):
        what = "a table" if want is dict else want.__name__ + (f" or {AUTO!r}" if k in AUTO_SETTINGS else "")
        raise UsageError(f"{source}: Slurm setting {k} must be {what}, got {v!r}") from None
    minimum = {"gpus_per_node": 0, "mem_gb": 0.01, "signal_delay_s": 0, "max_requeues": 0,
               "target_task_min": 1e-6}.get(k, 1)
    if v < minimum:
        raise UsageError(f"{source}: Slurm setting {k} must be >= {minimum}, got {v!r}")
    return v


def parse_slurm_sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--slurm-set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------- in the job


class SlurmTask:
    """What one array task runs (submitit's checkpointable protocol: ``__call__`` and ``checkpoint``)."""

    def __init__(self, out: str, data_root: str | None) -> None:
        self.out, self.data_root = out, data_root
        self._proc: subprocess.Popen | None = None
        self._stopping = False

    def __getstate__(self) -> dict:
        return {"out": self.out, "data_root": self.data_root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["out"], state["data_root"])

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def __call__(self, cell_configs: list[dict]) -> dict:
        from . import forkserver
        from .spawn import done_here, run_in_subprocess, stored_ok

        from .slurm_boot import redeliver

        redeliver()  # a warning signal that came before submitit's handler: handled now (a checkpoint and requeue)
        out = Path(self.out)
        restarts_at_start = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        done: dict[str, str] = {}
        server = None  # the task's fork server (bench/forkserver.py), started for its first cell to run
        try:
            for cfg in cell_configs:
                cell = Cell(**cfg)
                if done_here(stored_ok(out), cell):
                    done[cell.key] = "ok"
                    continue
                if server is None and forkserver.available():
                    server = forkserver.ForkServer().start()
                st, err = run_in_subprocess(cell, out, self.data_root, lambda d: None, on_start=self._started,
                                            stopping=lambda: self._stopping, server=server)
                self._proc = None
                done[cell.key] = st
                if st == "preempted" or self._stopping:
                    if not self._stopping and not _requeued(restarts_at_start):
                        _mark_cancelled(out, cell)
                        done[cell.key] = "cancelled"
                    break  # the job is being requeued or cancelled: no further cell starts
        finally:
            if server is not None:
                server.close()
        return done

    def checkpoint(self, cell_configs: list[dict]):
        """submitit's USR2 handler (a time limit or a preemption ahead): the worker checkpoints, then the task is
        requeued to run the same cells again (those stored ok are skipped, the stopped one resumes)."""
        import submitit

        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGUSR1)
                proc.wait(timeout=max(10, int(os.environ.get("SNNBENCH_CHECKPOINT_WAIT_S", "60"))))
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        return submitit.helpers.DelayedSubmission(SlurmTask(self.out, self.data_root), cell_configs)


def _requeued(restarts_at_start: int) -> bool:
    """Whether Slurm is requeueing this job (its restart count grew since it started), as it does for
    ``scontrol requeue`` and a preemption; ``scancel`` and a time limit without requeue leave it as it was."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: keep the cell as preempted (a rerun resumes it either way)
    for tok in text.split():
        if tok.startswith("Restarts="):
            return int(tok.split("=", 1)[1]) > restarts_at_start
    return True


def _mark_cancelled(out: Path, cell: Cell) -> None:
    path = out / "cells" / f"{cell.key}.parquet"
    try:
        import pandas as pd

        row = pd.read_parquet(path).iloc[0].to_dict()
    except (OSError, ValueError, IndexError):
        return
    if row.get("status") != "preempted":
        return
    row.pop("schema_version", None)
    job = os.environ.get("SLURM_JOB_ID", "?")
    row.update(status="cancelled", error=f"Slurm job {job} ended without a requeue (scancel, or its time limit); "
               f"{row.get('error')}")
    write_cell(out, cell.key, row)


# ---------------------------------------------------------------- submitting and watching


def submit(cells: list[Cell], out: Path, data_root: str | None, settings: SlurmSettings) -> list[dict]:
    """Submit the cells as one job array (``cells_per_task`` per task); record and return the jobs."""
    if shutil.which("sbatch") is None:
        raise UsageError("--slurm: no sbatch on PATH (is this a Slurm login node? scripts/slurm-local.sh starts a "
                         "one-node Slurm on this machine)")
    try:
        import submitit
    except ImportError:
        raise UsageError('the Slurm launcher needs submitit: pip install -e ".[slurm]"') from None
    records = []
    now = time.time()
    gpu = any(c.device.startswith("cuda") for c in cells)
    predicted = getattr(settings, "predicted", None)  # key -> seconds, from the plan (an AUTO setting)
    if predicted is None and AUTO in (settings.timeout_min, settings.cells_per_task):
        raise UsageError("timeout_min=auto and cells_per_task=auto need the cells' predicted times (plan.parquet)")
    cap = partition_limit_min(settings.partition) if settings.timeout_min == AUTO else None
    before: list[str] = []  # the arrays of the phases before: a later phase's arrays start after they end
    for phase in run_phases(cells):
        arrays = []
        for devices in sorted({c.devices for c in phase}):  # one array per devices count: a task asks what it needs
            mine = [c for c in phase if c.devices == devices]
            groups = task_groups(mine, settings, predicted)
            by_limit: dict[int, list[list[Cell]]] = {}  # one array per time limit: an array's tasks share theirs
            for g in groups:
                by_limit.setdefault(task_limit(g, settings, predicted, cap), []).append(g)
            for limit, gs in sorted(by_limit.items()):
                ex = submitit.AutoExecutor(folder=str(out / "slurm" / "%j"), cluster="slurm",
                                           slurm_max_num_timeout=settings.max_requeues,
                                           slurm_python=f"{shlex.quote(sys.executable)} -u -m bench.slurm_boot")
                params = settings.for_devices(devices, gpu).executor_parameters()
                params["timeout_min"] = limit
                if before:
                    params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}),
                                                             "dependency": "afterany:" + ":".join(before)}
                ex.update_parameters(name=f"snnbench-{cells[0].grid or 'grid'}", **params)
                try:
                    jobs = ex.map_array(SlurmTask(str(Path(out).absolute()), data_root and str(Path(data_root).absolute())),
                                        [[c.config() for c in g] for g in gs])
                except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as e:
                    msg = getattr(e, "stderr", None) or getattr(e, "output", None) or str(e)
                    msg = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
                    raise UsageError(f"sbatch refused the job array: {msg.strip().splitlines()[-1] if msg.strip() else e}") from None
                for j, g in zip(jobs, gs):
                    rec = {"job_id": str(j.job_id), "cells": [c.key for c in g], "submitted": now, "timeout_min": limit}
                    if predicted is not None:
                        rec["predicted_s"] = sum(predicted[c.key] for c in g)
                    records.append(rec)
                arrays += sorted({str(j.job_id).split("_")[0] for j in jobs})
        before += arrays
    write_atomic(out / JOBS, lambda f: f.write(json.dumps(read_jobs(out) + records, indent=1).encode()))
    return records


def task_groups(cells: list[Cell], settings: SlurmSettings, predicted: dict[str, float] | None) -> list[list[Cell]]:
    """The cells of each task: ``cells_per_task`` at a time, or with AUTO, in the grid's order, as many as fit in
    ``target_task_min`` predicted minutes (a cell longer than that alone)."""
    if settings.cells_per_task != AUTO:
        k = int(settings.cells_per_task)
        return [cells[i:i + k] for i in range(0, len(cells), k)]
    target = settings.target_task_min * 60.0
    groups: list[list[Cell]] = []
    total = 0.0
    for c in cells:
        s = predicted[c.key]
        if groups and total + s <= target:
            groups[-1].append(c)
            total += s
        else:
            groups.append([c])
            total = s
    return groups


def auto_timeout_min(predicted_s: float, signal_delay_s: float, cap_min: int | None = None) -> int:
    """A task's time limit from its predicted seconds: plus ``AUTO_MARGIN`` of them, the warning signal's lead and
    ``AUTO_SLACK_MIN``, in whole minutes, at most ``cap_min`` (the partition's limit)."""
    limit = math.ceil((predicted_s * (1.0 + AUTO_MARGIN) + signal_delay_s) / 60.0) + AUTO_SLACK_MIN
    return min(limit, cap_min) if cap_min else limit


def task_limit(group: list[Cell], settings: SlurmSettings, predicted: dict[str, float] | None,
               cap_min: int | None) -> int:
    if settings.timeout_min != AUTO:
        return int(settings.timeout_min)
    return auto_timeout_min(sum(predicted[c.key] for c in group), settings.signal_delay_s, cap_min)


def parse_slurm_time(text: str) -> int | None:
    """Minutes of a Slurm time limit ("UNLIMITED", "infinite", "D-HH:MM:SS", "HH:MM:SS", "MM:SS", "MM"), None for
    none."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "N/A", "NONE"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(x) for x in text.split(":")]
    if len(parts) == 3:
        h, m, sec = parts
    elif len(parts) == 2:
        h, m, sec = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        h, m, sec = (parts[0], 0, 0) if days else (0, parts[0], 0)
    return days * 1440 + h * 60 + m + (1 if sec else 0)


def partition_limit_min(partition: str | None) -> int | None:
    """The time limit of ``partition`` (or of the default one) in minutes, as ``sinfo`` states it; None for none
    or where sinfo cannot say."""
    try:
        text = subprocess.run(["sinfo", "-h", "-o", "%P %l"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        name, _, limit = line.strip().partition(" ")
        default = name.endswith("*")
        if (partition and name.rstrip("*") == partition) or (not partition and default):
            try:
                return parse_slurm_time(limit)
            except ValueError:
                return None
    return None


def read_jobs(out: Path) -> list[dict]:
    try:
        jobs = json.loads((Path(out) / JOBS).read_text())
        return jobs if isinstance(jobs, list) else []
    except (OSError, ValueError):
        return []


def latest_jobs(out: Path) -> dict[str, dict]:
    """cell key -> the record of the last job it was submitted in."""
    latest: dict[str, dict] = {}
    for rec in read_jobs(out):
        for key in rec.get("cells", []):
            latest[key] = rec
    return latest


def squeue() -> dict[str, str] | None:
    """job id (``<array>_<task>`` for array tasks) -> state, for this user's jobs slurmctld still knows (finished
    ones for MinJobAge); None where the scheduler cannot be asked."""
    if shutil.which("squeue") is None:
        return None
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    cmd = ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T"] + (["-u", user] if user else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    states = {}
    for line in r.stdout.splitlines():
        if "|" in line:
            jid, st = line.strip().split("|", 1)
            states[jid] = st.split()[0]
    return states


def queue_states(out: Path) -> dict[str, tuple[str, str | None]] | None:
    """cell key -> (job id, its state in the queue, or None when slurmctld no longer knows it), for every cell
    submitted from this folder; None where the scheduler cannot be asked (no cell submitted: {})."""
    latest = latest_jobs(out)
    if not latest:
        return {}
    q = squeue()
    if q is None:
        return None
    return {key: (rec["job_id"], q.get(rec["job_id"])) for key, rec in latest.items()}


def active_cells(out: Path) -> dict[str, str]:
    """cell key -> job id, for cells whose job is pending or running."""
    states = queue_states(out) or {}
    return {k: j for k, (j, st) in states.items() if st in ACTIVE}


def wait(records: list[dict], cells: dict[str, Cell], out: Path, stream, poll_s: float = POLL_S) -> list[tuple]:
    """Watch the submitted cells until each has left the queue; returns (cell, status, error) for each. A job that
    left the queue without storing its cell's row gets a row with status ``error`` naming its log."""
    from .rows import failure_row

    submitted = {key: rec for rec in records for key in rec["cells"] if key in cells}
    left = dict(submitted)
    gone_polls: dict[str, int] = {}
    results: list[tuple] = []
    last_line = ""
    while left:
        q = squeue()
        rows = _fresh_rows(out, submitted)
        counts: dict[str, int] = {}
        for key, rec in list(left.items()):
            st = q.get(rec["job_id"]) if q is not None else "UNKNOWN"
            if q is None or st in ACTIVE:
                counts[(st or "?").lower()] = counts.get((st or "?").lower(), 0) + 1
                continue
            if key in rows:
                results.append((cells[key], rows[key][0], rows[key][1]))
                del left[key]
                continue
            gone_polls[key] = gone_polls.get(key, 0) + 1
            if gone_polls[key] >= 3:  # left the queue without a row (killed before it could store one)
                log = out / "slurm" / rec["job_id"]
                err = f"Slurm job {rec['job_id']} ended ({st or 'gone'}) without storing a result; see {log}/"
                write_cell(out, key, failure_row(cells[key], "error", err))
                results.append((cells[key], "error", err))
                del left[key]
        done = len(submitted) - len(left)
        line = f"[{done}/{len(submitted)} done]" + "".join(f", {n} {s}" for s, n in sorted(counts.items()))
        if line != last_line:
            stream.write(line + "\n")
            stream.flush()
            last_line = line
        if left:
            time.sleep(poll_s)
    return results


def _fresh_rows(out: Path, submitted: dict[str, dict]) -> dict[str, tuple[str, str | None]]:
    """Stored rows written after the cell's submission: key -> (status, error)."""
    rows: dict[str, tuple[str, str | None]] = {}
    df = load_results(out, "cells")
    if df.empty:
        return rows
    for r in df.to_dict("records"):
        key = r["key"]
        if key in submitted:
            p = out / "cells" / f"{key}.parquet"
            try:
                if p.stat().st_mtime >= submitted[key]["submitted"] - 1:
                    rows[key] = (r["status"], r.get("error"))
            except OSError:
                pass
    return rows


__all__ = ["ACTIVE", "SlurmSettings", "SlurmTask", "active_cells", "parse_slurm_sets", "queue_states", "submit", "wait"]
