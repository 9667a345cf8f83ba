"""Where cells run: in this process, in a fresh subprocess per cell (the default), or on Slurm (submitit).

A fresh worker per cell gives each cell its own peak memory, and turns a crash or an out-of-memory
kill into a stored row (status ``oom`` or ``error``) while the grid goes on. A rerun skips cells whose
key is stored with status ok by the same code (see bench/fingerprint.py), and reruns stale ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from reports.results import TO_CONTINUE, FolderLock, device_type, remove_stray_temp_files, update_manifest

from . import REPO
from .cell import Cell, run_phases
from .errors import StoreFailed, UsageError
from .fingerprint import fingerprint
from .forkserver import ForkServer, ServedProcess
from .forkserver import available as forkserver_available
from .slurm import POLL_S
from .spawn import done_here, run_in_process, run_in_subprocess, stored_ok
from .stop import STOP

# the relative cost of one timestep where it is far from a LIF network's, for the progress line's ETA only
# (hm2bp: elementwise work on [B, N], ~0.4 ms per timestep at B=16 against ~4 ms for cnn_digits)
ETA_TIMESTEP_COST = {"hm2bp": 0.1}


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
    """One status line: cells done/left, every running cell (with its slot when cells run side by side), epoch
    and step, ETA. Thread-safe: the slots of a pool report from their own threads."""

    def __init__(self, total: int, stream=None, work_left: float | None = None, slots: int = 1,
                 cost: Callable[[Cell], float] | None = None, seconds: bool = False) -> None:
        self.total, self.done, self.slots = total, 0, max(1, slots)
        self.work_left = work_left  # estimated cost of the cells still to run (ETA weighting)
        self.cost = cost or cell_cost  # a cell's estimated cost
        self.seconds = seconds  # the costs are predicted seconds (a plan's): an ETA before any cell has ended
        self._work_done = 0.0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.running: dict[str | None, dict] = {}  # slot -> {"label", "t0", "work", "detail"}
        self._last = 0.0
        self._cell_times: list[float] = []
        self._lock = threading.RLock()

    def start_cell(self, cell: Cell, slot: str | None = None) -> None:
        with self._lock:
            self.running[slot] = {"label": cell.label, "t0": time.perf_counter(), "work": self.cost(cell), "detail": {}}
            self.render(force=True)

    def update(self, detail: dict, slot: str | None = None) -> None:
        with self._lock:
            if slot in self.running:
                self.running[slot]["detail"] = detail
            self.render()

    def end_cell(self, status: str, slot: str | None = None) -> None:
        with self._lock:
            r = self.running.get(slot) or {"label": "", "t0": time.perf_counter(), "work": 0.0, "detail": {}}
            self._cell_times.append(time.perf_counter() - r["t0"])
            self.done += 1
            self._work_done += r["work"]
            if self.work_left is not None:
                self.work_left -= r["work"]
            self.render(force=True, final=(slot, status))
            self.running.pop(slot, None)

    def labels(self) -> list[str]:
        """The cells running now."""
        with self._lock:
            return [r["label"] for r in self.running.values()]

    def eta_s(self) -> float | None:
        left = self.total - self.done
        if not self._cell_times and self.seconds and self.work_left is not None:
            spent = sum(time.perf_counter() - r["t0"] for r in self.running.values())
            return max(self.work_left - spent, 0.0) / self.slots
        if not self._cell_times:
            for r in self.running.values():
                d = r["detail"]
                if d.get("steps") and d.get("step"):
                    spent = time.perf_counter() - r["t0"]
                    return (spent * d["steps"] / d["step"] * left - spent) / self.slots
            return None
        if self.work_left is not None and self._work_done > 0:
            return sum(self._cell_times) / self._work_done * self.work_left / self.slots
        return sum(self._cell_times) / len(self._cell_times) * left / self.slots

    @staticmethod
    def _where(d: dict) -> str:
        where = f" epoch {d.get('epoch')}/{d['epochs']}" if d.get("epochs") else ""
        return where + (f" step {d.get('step')}/{d['steps']}" if d.get("steps") else "")

    def render(self, force: bool = False, final: tuple | None = None) -> None:
        now = time.perf_counter()
        if not force and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        parts = []
        for slot, r in self.running.items():
            state = f" -> {final[1]}" if final and final[0] == slot else ""
            parts.append((f"{slot}: " if slot is not None else "") + r["label"] + self._where(r["detail"]) + state)
        eta = self.eta_s()
        eta_s = f" ETA {int(eta // 60)}m{int(eta % 60):02d}s" if eta is not None else ""
        line = f"[{self.done}/{self.total} done, {self.total - self.done} left] " + " | ".join(parts) + eta_s
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def cell_cost(cell: Cell) -> float:
    """A rough relative cost of a cell for the ETA: steps x T x the method's cost of a timestep (plus a fixed
    start-up)."""
    if cell.kind == "fidelity":  # two gradients per batch and weights
        return 10.0 + cell.T * cell.steps * len(cell.weights_at) * 2 * ETA_TIMESTEP_COST.get(cell.method, 1.0)
    steps = cell.epochs * 50 if cell.kind == "train" else cell.warmup_steps + 1 + cell.steps
    per_t = ETA_TIMESTEP_COST.get(cell.method, 1.0)
    return 10.0 + cell.T * steps * per_t


def run_grid(cells: list[Cell], out: Path, data_root: str | None = None, launcher: str = "subprocess",
             slurm=None, stream=None, reuse_stale: bool = False, detach: bool = False,
             poll_s: float = POLL_S, slots: list["Slot"] | None = None, server: ForkServer | None = None) -> GridOutcome:
    """Run the cells not yet stored ok with the current code. Cells stored ok by other code (stale) are rerun,
    or kept with ``reuse_stale``; cells pending or running under Slurm (submitted from this folder) are left
    to their jobs. Holds the folder's lock while it runs; raises StoreFailed when a result cannot be stored (the
    cells stored before stay as they are).

    SIGTERM, SIGUSR1 or SIGUSR2 to the grid process reach the running worker, which checkpoints and ends its
    cell as ``preempted``; no further cell starts. ``slots`` (``gpu_slots``, ``cpu_slots``) run that many cells
    side by side, each in its own worker: a child of ``server`` (bench/forkserver.py; one is started for the run
    where none is given). ``launcher="slurm"`` submits the cells as a job array (``slurm``:
    bench.slurm.SlurmSettings) and watches them unless ``detach``."""
    out = Path(out)
    stream = stream or sys.stderr
    with FolderLock(out) as lock:
        _prepare_folder(lock, out, cells, stream)
        queued = _queued(out, stream)
        outcome, todo, stale = plan(cells, stored_ok(out), queued, reuse_stale)
        _say_plan(outcome, stale, queued, stream)
        if launcher == "slurm":
            if todo or outcome.queued:
                _run_on_slurm(todo, out, data_root, slurm, outcome, stream, detach, poll_s)
            return outcome
        _run_here(todo, len(cells), out, data_root, launcher, slots or [Slot()], lock, outcome, stream, server)
    return outcome


def _prepare_folder(lock: FolderLock, out: Path, cells: list[Cell], stream) -> None:
    """With the lock held: say whether it was taken over, remove what a killed writer left, and record the cells
    asked for and this code's fingerprints in the manifest."""
    if lock.taken_over:
        stream.write(f"took over the lock of a run that is no longer alive (pid {lock.taken_over.get('pid')})\n")
    remove_stray_temp_files(out)
    current = {t: fingerprint(t) for t in sorted({device_type(c.device) for c in cells})}
    try:
        update_manifest(out, cells[0].grid if cells else "", {c.key: c.config() for c in cells}, current)
    except OSError as e:
        raise StoreFailed(f"cannot write the manifest of {out}: {e}\nno cell ran: {len(cells)} cell(s) not stored. "
                          "Free the space and run the same command again.") from None


def plan(cells: list[Cell], stored: dict[str, str | None], queued: dict[str, str],
         reuse_stale: bool = False) -> tuple[GridOutcome, list[Cell], list[Cell]]:
    """(the outcome so far, the cells to run, the stale ones among them): a cell queued under Slurm is left to its
    job, one stored ok by this code is skipped, one stored ok by other code is rerun (kept with ``reuse_stale``)."""
    outcome = GridOutcome()
    todo, stale = [], []
    for c in cells:
        if c.key in queued:
            outcome.queued.append(c)
        elif done_here(stored, c):
            outcome.skipped.append(c)
        elif c.key not in stored:
            todo.append(c)
        elif reuse_stale:
            outcome.stale_kept.append(c)
        else:
            stale.append(c)
            todo.append(c)
    return outcome, todo, stale


def _say_plan(outcome: GridOutcome, stale: list[Cell], queued: dict[str, str], stream) -> None:
    """One line for each kind of cell that will not simply run: skipped, queued, stale (rerun or kept)."""
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


def _run_here(todo: list[Cell], total: int, out: Path, data_root, launcher: str, slots: list["Slot"], lock: FolderLock,
              outcome: GridOutcome, stream, server: ForkServer | None = None) -> None:
    """Run ``todo`` on this machine, one worker per cell and slot (or in this process), fidelity cells after the
    others; a stop signal to this process reaches the running workers, and no further cell starts."""
    from .plan import plan_seconds

    planned = plan_seconds(out)  # the folder's plan, where it predicts every cell to run: the ETA in seconds
    cost = (lambda c: planned[c.key]) if planned and all(c.key in planned for c in todo) else cell_cost
    display = ProgressDisplay(total, stream, work_left=sum(cost(c) for c in todo), slots=len(slots), cost=cost,
                              seconds=cost is not cell_cost)
    display.done = total - len(todo)
    STOP.clear()
    STOP.install()
    workers: dict[str | None, subprocess.Popen | ServedProcess] = {}
    # the workers' fork server: the caller's, or one started here (in the thread it dies with)
    own = server is None and launcher == "subprocess" and bool(todo) and forkserver_available()
    if own:
        server = ForkServer().start()

    def forward(signum: int) -> None:  # a signal to the grid process reaches its workers
        for p in list(workers.values()):
            if p.poll() is None:
                p.send_signal(signum)

    undo = STOP.forward(forward)

    def run_one(cell: Cell, slot: Slot) -> None:
        display.start_cell(cell, slot.name)
        lock.note_cell(display.labels() if len(slots) > 1 else cell.label)
        progress = lambda d: display.update(d, slot.name)  # noqa: E731
        try:
            if launcher == "inprocess":
                st, err = run_in_process(cell, out, data_root, progress)
            else:
                st, err = run_in_subprocess(cell, out, data_root, progress, stopping=lambda: STOP.requested,
                                            on_start=lambda p: workers.__setitem__(slot.name, p),
                                            env=slot.env, concurrent=len(slots), server=server)
        finally:
            workers.pop(slot.name, None)
        outcome.ran.append((cell, st, err))
        display.end_cell(st, slot.name)

    try:
        left: list[Cell] = []
        for phase in run_phases(todo):  # fidelity cells read the weights train cells keep: they start after them
            left += phase if STOP.requested else run_pool(phase, slots, run_one, lambda: STOP.requested)
        outcome.not_started = left if STOP.requested else []
        outcome.stopped_by = STOP.name
    except StoreFailed as e:
        done = {id(c) for c, _, _ in outcome.ran}
        left = [c for c in todo if id(c) not in done]
        raise StoreFailed(f"{e}\nthe grid stopped: {len(left)} cell(s) not stored ("
                          + ", ".join(c.label for c in left[:5]) + (", ..." if len(left) > 5 else "")
                          + f"); the {len(outcome.ran) + len(outcome.skipped)} cell(s) stored before stay "
                          "readable. Free the space and run the same command again.") from None
    finally:
        if own:
            server.close()
        undo()
        STOP.uninstall()
        lock.note_cell(None)


@dataclass(frozen=True)
class Slot:
    """Where one cell runs at a time: a GPU of this machine (the worker sees only that GPU, as its cuda:0) or a
    share of the CPU. ``name`` is None for the one slot of a plain sequential run."""

    name: str | None = None
    env: dict = field(default_factory=dict, hash=False)


def gpu_slots(spec: str, count: int) -> list[Slot]:
    """``--gpus 0,1,3`` or ``--gpus all``: one slot per GPU (``count``: the GPUs this machine has)."""
    if count <= 0:
        raise UsageError(f"--gpus {spec}: no CUDA device is available here")
    if spec.strip() == "all":
        ids = list(range(count))
    else:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--gpus expects 'all' or GPU indices like 0,1,2, got {spec!r}") from None
        bad = [i for i in ids if not 0 <= i < count]
        if bad or not ids or len(set(ids)) != len(ids):
            raise UsageError(f"--gpus {spec}: this machine has {count} GPU(s), indices 0..{count - 1}, each once")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    phys = [v.strip() for v in visible.split(",")] if visible else None  # indices are within what is visible
    return [Slot(f"gpu{i}", {"CUDA_VISIBLE_DEVICES": phys[i] if phys else str(i)}) for i in ids]


def cpu_slots(jobs: int) -> list[Slot]:
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    return [Slot(f"cpu{i}" if jobs > 1 else None) for i in range(jobs)]


def check_slots(cells: list[Cell], slots: list[Slot], share_cpu: bool = False, launcher: str = "subprocess") -> None:
    """Refuse what a pool cannot do well, before any cell runs: GPU slots for cells that do not ask for ``cuda``
    (the pool picks the GPU), and profile cells sharing the CPU (their timings are their point) unless asked."""
    if len(slots) > 1 and launcher != "subprocess":
        raise UsageError("--gpus and --jobs run cells side by side in fresh workers: not with --in-process or --slurm")
    wide = [c for c in cells if c.devices > 1]
    if wide and launcher == "inprocess":
        raise UsageError(f"{wide[0].label} runs on {wide[0].devices} devices: its ranks need a worker of their own "
                         "(drop --in-process)")
    if wide and len(slots) > 1:
        raise UsageError(f"{wide[0].label} runs on {wide[0].devices} devices and takes the GPUs it sees (the first "
                         f"{wide[0].devices}; set CUDA_VISIBLE_DEVICES to choose): not with --gpus or --jobs")
    if any(s.name and s.name.startswith("gpu") for s in slots):
        bad = sorted({c.device for c in cells if c.device != "cuda"})
        if bad:
            raise UsageError(f"--gpus picks each cell's GPU: the cells must ask for device 'cuda' (use --device cuda), "
                             f"not {', '.join(bad)}")
    elif len(slots) > 1:
        if any(c.device != "cpu" for c in cells):
            raise UsageError("--jobs runs CPU cells side by side; for GPU cells use --gpus")
        profile = [c for c in cells if c.kind == "profile"]
        if profile and not share_cpu:
            raise UsageError(f"--jobs {len(slots)}: {len(profile)} profile cell(s) would share the CPU, and their "
                             "timings are their point; run them alone, or pass --share-cpu to do it anyway (their "
                             "rows record concurrent_cells and the CPU contention)")


def run_pool(todo: list[Cell], slots: list[Slot], run_one: Callable[[Cell, Slot], None],
             stopped: Callable[[], bool] = lambda: False) -> list[Cell]:
    """Run ``run_one(cell, slot)`` for each cell, at most one cell per slot at a time, in order of ``todo``; stop
    taking cells when ``stopped()``. Returns the cells not started. The first exception of a slot stops the
    others taking cells and is raised once the running ones end."""
    queue = list(todo)
    if len(slots) == 1:  # in this thread: signals and Ctrl-C reach the loop directly
        while queue and not stopped():
            run_one(queue.pop(0), slots[0])
        return queue
    guard, errors = threading.Lock(), []

    def work(slot: Slot) -> None:
        while True:
            with guard:
                if not queue or errors or stopped():
                    return
                cell = queue.pop(0)
            try:
                run_one(cell, slot)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                with guard:
                    errors.append(e)
                return

    threads = [threading.Thread(target=work, args=(s,), name=f"slot-{s.name}", daemon=True) for s in slots]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)  # wake up for signal handlers in the main thread
    if errors:
        raise errors[0]
    return queue


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
        stream.write(_say_limits(records, settings))
    if detach:
        stream.write(f"detached: `run_bench.py status {out}` shows their progress\n")
        return
    latest = latest_jobs(out)
    earlier = {id(latest[c.key]): latest[c.key] for c in outcome.queued}
    watched = {c.key: c for c in todo + outcome.queued}
    outcome.ran.extend(wait(records + list(earlier.values()), watched, out, stream, poll_s))


def _say_limits(records: list[dict], settings) -> str:
    """The tasks' time limits, and where they come from when the plan sized them."""
    from collections import Counter

    from .slurm import AUTO, AUTO_MARGIN, AUTO_SLACK_MIN

    limits = Counter(r.get("timeout_min") for r in records)
    text = "task time limit(s): " + ", ".join(f"{m} min x{n}" for m, n in sorted(limits.items()))
    if settings.timeout_min == AUTO:
        text += (f" (timeout_min=auto: each task's predicted time + {AUTO_MARGIN:.0%}, + the {settings.signal_delay_s} s "
                 f"signal lead, + {AUTO_SLACK_MIN} min, at most the partition's limit)")
    if settings.cells_per_task == AUTO:
        sizes = [len(r["cells"]) for r in records]
        text += f"; cells_per_task=auto: {min(sizes)}-{max(sizes)} cell(s) per task of about {settings.target_task_min:g} min"
    return text + "\n"


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
                out: str | None, need_data: bool = True) -> PreparedRun:
    """(grid name, cells, results folder, grid spec) of a run, after every check a user's input can fail: the
    grid, the values, the devices, the data folders (unless ``need_data`` is False: a plan reads none) and the
    results folder. Raises UsageError, before any cell runs."""
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
    for ds in sorted({c.dataset for c in cells}) if need_data else ():  # missing data: one message before any cell runs
        if dataset_info(ds).folder is not None:
            check_dataset(ds, data_root)
    # absolute: a Slurm task (and a worker) may run in another folder than the one the command was typed in
    return PreparedRun(name, cells, check_out_dir((Path(out) if out else REPO / "results" / name).absolute()), spec)
