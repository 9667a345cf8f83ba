"""What a grid will cost, before it runs: ``run_bench.py plan GRID``.

Each distinct step configuration of the grid's cells (``step_config``: method, architecture, dataset, T, batch,
precision, backend, ...) is measured once by a probe (bench/plan_probe.py: a worker as a cell's, a few steps on
the device that will run the grid, the dataset's real data where it ships in memory and random input of its
shape otherwise). ``predict`` turns a probe into a cell's figures, part by part as the row's ``time_<part>_s``
columns count them: the set-up the probe went through itself (device, meters, model, data), the warm-up and
memory steps, every other step at the probe's median step time, the evaluation of each epoch (the test set's
batches at the probe's time for one, the last with the analyses), a checkpoint at each epoch's end, and the
storing of the row. The step counts come from the dataset registry's sizes (``DatasetInfo.sizes``), so no
dataset file is read. Cells stored ok by this code in the results folder count with their measured figures.

The peak memory (``peak_alloc_mib`` on CUDA, ``peak_rss_mib`` on a CPU) is a line in the batch size, fitted from
the probe's two batch sizes; against the device's memory (``memory_limit``) it says whether a cell fits and the
largest batch that does (where the cell's own batch runs out of memory in its probe, from halved batches that
run). Against a grid's Slurm time limit it says how often a cell will be requeued;
``slurm_limits`` sizes Slurm tasks from the plan (``timeout_min=auto``, ``cells_per_task=auto``).

``plan.parquet`` in the results folder keeps one row per cell (``PLAN_COLUMNS``, the predicted parts and peak);
``report`` sets it beside the measured cells.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

from reports.results import PLAN_FILE, TIME_PARTS, load_results, read_plan, write_atomic

from .cell import Cell
from .errors import UsageError

MIB = 2**20
PROBE_PREFIX = "@snnbench-probe "  # a probe's stdout line that carries its measurement (bench/plan_probe.py)
TIMED_S = 0.3  # each probe times training steps until this many seconds of them (at least MIN_STEPS)
MIN_STEPS = 3
# the largest batch that fits keeps this share of the device's memory free, by memory column: the same cell's peak
# moves between runs (on a CPU with the heap's layout: tests/test_plan.py saw the same cell's resident peak 1.80 to
# 2.07 GiB, and the line's point at a batch up to 9% below a run's peak; the CUDA allocator's peak is the same each
# run, but the context, the cache and its fragments come on top of it)
MEMORY_HEADROOM = {"peak_rss_mib": 0.15, "peak_alloc_mib": 0.05}
PROBE_WARMUP = 2  # a probe's warm-up steps (a cell's first steps are cold), before its memory step
# the fields that change what one training step costs: cells equal in these share a probe
STEP_FIELDS = ("method", "method_options", "arch", "arch_options", "neuron", "dataset", "T", "batch_size",
               "eval_batch_size", "optimizer", "precision", "backend", "device", "devices")


# the figures every row of plan.parquet carries (NaN where a cell has none: a probe that failed), beside the
# predicted parts (predicted_time_<part>_s) and the memory's line
PLAN_COLUMNS = ("predicted_cell_wall_s", "predicted_time_start_s", "predicted_step_time_ms_median", "predicted_epoch_s",
                "predicted_steps", "predicted_saved_for_backward_mib", "predicted_energy_j", "memory_intercept_mib",
                "memory_per_sample_mib", "eval_peak_mib", "max_batch_size", "slurm_requeues")


def _missing(v) -> bool:
    """No figure: None, or NaN (what a parquet column holds for a row without one)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def step_config(cell: Cell) -> str:
    return json.dumps({f: getattr(cell, f) for f in STEP_FIELDS}, sort_keys=True, default=str)


def memory_column(device: str) -> str:
    """The row's peak memory column of a device: the allocator's on CUDA, the process's resident set on a CPU."""
    return "peak_alloc_mib" if device.startswith("cuda") else "peak_rss_mib"


# ---------------------------------------------------------------- what a cell needs probed


def reference_of(cell: Cell) -> str:
    from methods import METHODS

    return cell.reference or METHODS[cell.method].fidelity_reference


def reference_cell(cell: Cell) -> Cell:
    """The step configuration of a fidelity cell's reference method (its gradient is computed on the same batches)."""
    return replace(cell, method=reference_of(cell), method_options={}, kind="train")


def probes_needed(cells: list[Cell]) -> dict[str, Cell]:
    """step_config -> a cell of that configuration, for every configuration the cells need: their own, and for a
    fidelity cell its reference method's (it computes both gradients)."""
    need: dict[str, Cell] = {}
    for c in cells:
        need.setdefault(step_config(c), c)
        if c.kind == "fidelity":
            need.setdefault(step_config(reference_cell(c)), reference_cell(c))
    return need


def run_probes(configs: dict[str, Cell], server=None, stream=None, timed_s: float = TIMED_S,
               limit_of=lambda cell: None, every_line: bool = False) -> dict[str, dict]:
    """Probe each configuration in a worker of its own (a child of ``server`` where it can serve one, else a fresh
    process), one after another so none shares the device; step_config -> the probe's figures. The memory's line
    in the batch size takes a second probe, at half the batch: for a configuration that does not fit in
    ``limit_of(cell)`` MiB (with ``MEMORY_HEADROOM``), or for every one with ``every_line``."""
    from .spawn import worker_env

    stream = stream or sys.stderr
    got: dict[str, dict] = {}
    env = worker_env()
    for i, (key, cell) in enumerate(configs.items(), 1):
        stream.write(f"probe {i}/{len(configs)}: {cell.method} {cell.arch} {cell.dataset} T={cell.T} "
                     f"batch {cell.batch_size} on {cell.device}\n")
        stream.flush()
        got[key] = result = _probe(cell, ["--timed-s", repr(timed_s), "--min-steps", str(MIN_STEPS)], env, server)
        if result.get("status") == "oom":  # the cell's batch ran out of memory: the line from batches that run
            result["below"] = _probe_below(cell, env, server, stream)
            continue
        peaks = (result.get("peaks") or {}).values()
        limit = limit_of(cell)
        tight = limit is not None and max(peaks, default=0.0) / MIB > limit * (
            1.0 - MEMORY_HEADROOM[memory_column(cell.device)])
        if every_line or tight:
            _add_line(cell, result, env, server)
    return got


def _add_line(cell: Cell, result: dict, env: dict, server) -> None:
    """A second point of the memory's line, at half ``cell``'s batch in a fresh memory-only probe, read at the point
    ``result`` (the probe at ``cell``'s batch) was: ``result["memory_at"]``, [] where a reading is missing."""
    half = max(cell.batch_size // 2, 1)
    if half < cell.batch_size:
        other = _probe(replace(cell, batch_size=half), ["--min-steps", str(MIN_STEPS), "--timed-s", "0",
                                                         "--memory-only"], env, server)
        reads = [r.get("memory_reading") for r in (other, result)]
        result["memory_at"] = reads if all(reads) else []


def _probe_below(cell: Cell, env: dict, server, stream) -> dict | None:
    """The probe of the largest of ``cell``'s batch halved, quartered, ... that runs (with its memory line), after
    the cell's own batch ran out of memory; None where even a batch of 1 does not. Its ``batch_size`` is the batch
    it ran."""
    failed, b = cell.batch_size, cell.batch_size // 2
    while b >= 1:
        stream.write(f"  out of memory at batch {failed}: probing batch {b}\n")
        stream.flush()
        smaller = replace(cell, batch_size=b)
        p = _probe(smaller, ["--timed-s", "0", "--min-steps", str(MIN_STEPS)], env, server)
        if p.get("status") == "ok":
            _add_line(smaller, p, env, server)
            return {**p, "batch_size": b}
        if p.get("status") != "oom":
            return None
        failed, b = b, b // 2
    return None


def _probe(cell: Cell, args: list[str], env: dict, server) -> dict:
    """One probe worker's figures, or a failure's (``oom`` for SIGKILL, else ``error``, with its log's tail)."""
    from .spawn import start_worker

    args = ["--cell", json.dumps(cell.config()), *args, "--requested-at", repr(time.time())]
    with tempfile.TemporaryFile("w+") as log:
        proc = start_worker(args, env, log, server, module="bench.plan_probe")
        result = None
        for line in proc.stdout:
            if line.startswith(PROBE_PREFIX):
                result = json.loads(line[len(PROBE_PREFIX):])
        rc = proc.wait()
        if result is None:
            log.seek(0)
            tail = log.read()[-1500:]
            killed = rc == -9
            result = {"status": "oom" if killed else "error",
                      "error": ("probe killed by SIGKILL (most likely the out-of-memory killer)" if killed
                                else f"probe exited with code {rc}") + (f"; log tail:\n{tail}" if tail else "")}
    return result


# ---------------------------------------------------------------- from a probe to a cell


def memory_columns(p: dict) -> dict:
    """The peak memory of a cell as a function of its batch size b, in MiB: max(``eval_peak_mib``,
    ``memory_intercept_mib`` + ``memory_per_sample_mib`` * b). On CUDA the evaluations' allocator peak is the same
    at any training batch (what training allocated is freed), and the line is the training stretches'. A
    process's resident memory keeps what training's heap grew to, so an evaluation's peak there rises with the
    batch as well: the line runs through the highest stretch, and ``eval_peak_mib`` is left out."""
    peaks = p.get("peaks") or {}
    cuda = p.get("device_type") == "cuda"
    train = max([v for k, v in peaks.items() if not cuda or k in ("start", "train")], default=None)
    line = memory_line(p, train)
    evals = [peaks[k] for k in ("eval_cold", "eval") if k in peaks and cuda]
    return {"memory_intercept_mib": line[0] / MIB if line else None,
            "memory_per_sample_mib": line[1] / MIB if line else None,
            "eval_peak_mib": max(evals) / MIB if evals else None}


def memory_at_batch(row: dict, batch: int) -> float | None:
    """The peak memory (MiB) that a row's fitted line (``memory_columns``) puts at a batch size; None unfitted."""
    a, b = row.get("memory_intercept_mib"), row.get("memory_per_sample_mib")
    if _missing(a) or _missing(b):
        return None
    e = row.get("eval_peak_mib")
    return max(a + b * batch, 0.0 if _missing(e) else e)


def memory_line(p: dict, peak: float | None = None) -> tuple[float, float] | None:
    """(intercept, slope) in bytes of the peak memory against the batch size: the slope from the probes' readings
    at two batch sizes (``memory_at``, read at the same point of two fresh workers), the line through the cell's
    predicted ``peak`` at its batch (what the cell adds after that point, its evaluation say, is the same at any
    batch), or through the reading where no peak is given."""
    pts = p.get("memory_at") or []
    if len(pts) < 2 or pts[1][0] == pts[0][0]:
        return None
    (b0, m0), (b1, m1) = pts[0], pts[1]
    slope = max((m1 - m0) / (b1 - b0), 0.0)
    return (peak if peak is not None else m1) - slope * b1, slope


def train_batches(cell: Cell) -> tuple[int, float]:
    """(training batches per epoch, evaluation batches per epoch as a fraction: the last one is partial)."""
    from .data import dataset_info, global_batches

    n_train, n_test = dataset_info(cell.dataset).sizes
    if cell.train_subset:
        n_train = min(n_train, cell.train_subset)
    return global_batches(n_train, cell.batch_size, None), n_test / max(cell.eval_batch_size, 1)


def predict(cell: Cell, p: dict, ref: dict | None = None, rows_before: int = 0) -> dict:
    """A cell's predicted figures from its configuration's probe (``ref``: a fidelity cell's reference method's;
    ``rows_before``: the rows in the results folder when a fidelity cell starts, which its search for trained
    weights reads)."""
    parts = dict.fromkeys(TIME_PARTS, 0.0)
    pp = p.get("parts") or {}
    for k in ("device", "meters", "model", "data"):
        parts[k] = pp.get(k, 0.0)
    step_s = median(p["step_ms"]) / 1e3
    wait_s = median(p.get("data_wait_ms") or [0.0]) / 1e3

    def warmup(n: int) -> float:  # a cell's first n steps: the probe's cold ones, then steps at the usual time
        return pp.get("warmup", 0.0) * min(n, PROBE_WARMUP) / PROBE_WARMUP + max(n - PROBE_WARMUP, 0) * step_s
    row: dict = {}
    if cell.kind == "train":
        per_epoch, eval_batches = train_batches(cell)
        steps = per_epoch * cell.epochs
        parts["warmup"] = warmup(min(cell.warmup_steps, steps))
        timed = max(steps - cell.warmup_steps - 1, 0)
        parts["steps"] = timed * step_s
        parts["data"] += steps * wait_s
        # the first batch of the first evaluation is cold; the last evaluation adds the analyses. The warm batch is
        # timed once: where the machine's load made it slower than the cold one (which pays for first use on top),
        # the cold one bounds it (the default grid once saw a warm batch at 3.5x a cell's measured ones)
        warm = min(p["eval_batch_s"], p["eval_cold_s"])
        parts["eval"] = p["eval_cold_s"] - warm + (cell.epochs * warm + p["analyses_batch_s"] - warm) * eval_batches
        saves = max(cell.epochs - 1, 0) + len(cell.save_weights_at)
        parts["checkpoint"] = saves * p["checkpoint_s"]
        row["predicted_epoch_s"] = per_epoch * (step_s + wait_s)
        row["predicted_steps"] = steps
    elif cell.kind == "profile":
        parts["warmup"] = warmup(cell.warmup_steps)
        parts["steps"] = cell.steps * step_s
        steps = cell.warmup_steps + 1 + cell.steps
        row["predicted_steps"] = steps
    else:  # fidelity: each batch's gradient by the method and by its reference, for each set of weights
        ref_s = median(ref["step_ms"]) / 1e3 if ref and ref.get("step_ms") else step_s
        parts["steps"] = cell.steps * len(cell.weights_at) * (step_s + ref_s)
        trained = {e for e in cell.weights_at if e != 0}
        if trained:  # the search for the train cell's weights (every stored row read), then their files loaded
            first, each = p.get("lookup_first_s", 0.0), p.get("lookup_row_s", 0.0)
            parts["checkpoint"] = first + max(rows_before - 1, 0) * each + len(trained) * p.get("weights_load_s", 0.0)
        steps = 0
        row["predicted_steps"] = cell.steps * len(cell.weights_at)
    parts["store"] = p.get("store_s", 0.0)
    row.update({f"predicted_time_{k}_s": v for k, v in parts.items()})
    row["predicted_cell_wall_s"] = sum(parts.values())
    row["predicted_time_start_s"] = p.get("start_s") or 0.0
    row["predicted_step_time_ms_median"] = step_s * 1e3
    saved = p.get("saved_bytes")
    row["predicted_saved_for_backward_mib"] = saved / MIB if saved is not None else None
    e = p.get("energy_per_step_j")
    row["predicted_energy_j"] = e * steps if e is not None and steps else None
    col = memory_column(cell.device)
    peaks = p.get("peaks") or {}
    row[f"predicted_{col}"] = max(peaks.values()) / MIB if peaks else None
    row.update(memory_columns(p))
    return row


# ---------------------------------------------------------------- the device's memory, Slurm's time limit


def memory_limit(device: str, spec: dict, explicit_mib: float | None = None) -> tuple[float | None, str]:
    """(the memory a cell may use on ``device`` in MiB, where that figure comes from)."""
    if explicit_mib is not None:
        return float(explicit_mib), "--memory-mib"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device here"
        idx = torch.device(device).index or 0
        return torch.cuda.get_device_properties(idx).total_memory / MIB, f"{torch.cuda.get_device_name(idx)}'s memory"
    import psutil

    limits = [(psutil.virtual_memory().total / MIB, "this machine's memory")]
    cgroup = cgroup_memory_limit()
    if cgroup is not None:
        limits.append((cgroup / MIB, "the cgroup's memory limit"))
    mem_gb = (spec.get("slurm") or {}).get("mem_gb")
    if isinstance(mem_gb, (int, float)) and mem_gb > 0:
        limits.append((mem_gb * 1024.0, "the grid's [slurm] mem_gb"))
    return min(limits)


def memory_cgroups(proc_cgroup: str | None = None,
                   root: Path = Path("/sys/fs/cgroup")) -> list[tuple[Path, Path, str]]:
    """(the hierarchy's root, the folder of this process's own cgroup in it, the name of its memory limit file) in
    each hierarchy that can hold one: v1's memory controller (``memory.limit_in_bytes``), v2's unified hierarchy (``memory.max``) at the
    mount point or beside v1's (hybrid). ``proc_cgroup``: the text of /proc/self/cgroup. A folder may not exist."""
    try:
        text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    except OSError:
        return []
    places = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        parts = [p for p in path.split("/") if p]
        if controllers == "":
            places += [(base, base.joinpath(*parts), "memory.max") for base in (root, root / "unified")]
        elif "memory" in controllers.split(","):
            places.append((root / "memory", (root / "memory").joinpath(*parts), "memory.limit_in_bytes"))
    return places


def cgroup_memory_limit(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit in bytes of this process's cgroup (``memory_cgroups``), the least of it and its ancestors'
    up to the hierarchy's root (a Slurm job's cgroup sits below its step's); None where none is set."""
    found = []
    for top, folder, name in memory_cgroups(proc_cgroup, root):
        for d in (folder, *folder.parents):
            try:
                value = (d / name).read_text().strip()
            except OSError:
                pass
            else:
                if value.isdigit() and int(value) < 2**62:  # "max" or v1's page-rounded 2^63: no limit
                    found.append(int(value))
            if d == top:
                break
    return min(found) if found else None


def largest_batch(row: dict, col: str, limit_mib: float) -> int | None:
    """The largest batch size whose predicted peak memory (the fitted line) leaves ``MEMORY_HEADROOM`` of
    ``limit_mib`` free; None where none does or nothing was fitted."""
    a, b = row.get("memory_intercept_mib"), row.get("memory_per_sample_mib")
    usable = limit_mib * (1.0 - MEMORY_HEADROOM[col])
    if _missing(a) or _missing(b):
        return None
    e = row.get("eval_peak_mib")
    if not _missing(e) and e > usable:
        return None  # the evaluation alone does not fit: a smaller eval_batch_size, not a smaller batch
    if b <= 0:
        return None if a > usable else 1 << 30
    n = math.floor((usable - a) / b)
    return n if n >= 1 else None


def slurm_requeues(wall_s: float, timeout_min: float, signal_delay_s: float) -> int:
    """How often a task that runs ``wall_s`` is requeued under a time limit: each run ends ``signal_delay_s``
    before the limit with a checkpoint."""
    usable = max(timeout_min * 60.0 - signal_delay_s, 1.0)
    return max(math.ceil(wall_s / usable) - 1, 0)


# ---------------------------------------------------------------- the plan of a grid


def measured_rows(df, cells: list[Cell]) -> dict[str, dict]:
    """key -> the stored row of each cell stored ok by this code among a results folder's rows ``df``."""
    from .fingerprint import is_current

    if df.empty:
        return {}
    wanted = {c.key: c for c in cells}
    rows = {}
    for r in df.to_dict("records"):
        c = wanted.get(r["key"])
        if c is not None and r["status"] == "ok" and is_current(r.get("code_fingerprint"), c.device):
            rows[r["key"]] = r
    return rows


def rows_when_run(stored: set[str], todo: list[Cell]) -> dict[str, int]:
    """key -> how many rows the results folder holds when each fidelity cell of ``todo`` starts (what its search
    for trained weights reads): those ``stored`` now, every other cell of ``todo`` (they run first, ``run_phases``),
    and the fidelity cells before it."""
    from .cell import run_phases

    keys = set(stored)
    counts = {}
    for phase in run_phases(todo):
        for c in phase:
            if c.kind == "fidelity":
                counts[c.key] = len(keys)
                keys.add(c.key)
        keys |= {c.key for c in phase}
    return counts


def _measured(cell: Cell, r: dict) -> dict:
    col = memory_column(cell.device)
    energy = r.get("energy_epoch_j")
    row = {"predicted_cell_wall_s": r.get("cell_wall_s"), "predicted_time_start_s": r.get("time_start_s") or 0.0,
           "predicted_step_time_ms_median": r.get("step_time_ms_median"),
           "predicted_saved_for_backward_mib": r.get("saved_for_backward_mib"),
           f"predicted_{col}": r.get(col), "predicted_epoch_s": r.get("epoch_s_median"),
           "predicted_energy_j": None if _missing(energy) else energy * cell.epochs}
    row.update({f"predicted_time_{k}_s": r.get(f"time_{k}_s") for k in TIME_PARTS})
    return row


def make_plan(cells: list[Cell], out: Path, spec: dict, memory_mib: float | None = None, server=None, stream=None,
              timed_s: float = TIMED_S, every_line: bool = False) -> "pd.DataFrame":  # noqa: F821
    """Predict every cell (probing what is not stored ok by this code) and write ``plan.parquet`` into ``out``."""
    import pandas as pd

    stream = stream or sys.stderr
    t0 = time.perf_counter()
    stored = load_results(out) if out.is_dir() else None
    measured = measured_rows(stored, cells) if stored is not None else {}
    todo = [c for c in cells if c.key not in measured]
    rows_before = rows_when_run(set(stored["key"]) if stored is not None and len(stored) else set(), todo)
    configs = probes_needed(todo)
    if measured:
        stream.write(f"{len(measured)} cell(s) stored ok by this code: their measured figures count\n")
    stream.write(f"{len(configs)} step configuration(s) to probe for {len(todo)} cell(s)\n")
    limits = {d: memory_limit(d, spec, memory_mib) for d in sorted({c.device for c in cells})}
    probes = run_probes(configs, server, stream, timed_s, lambda c: limits[c.device][0], every_line) if configs else {}
    # a worker's start: the first waited for the fork server to finish importing, which a grid's first cell does
    # once; every cell is given the probes' median
    starts = [p["start_s"] for p in probes.values() if p.get("start_s") is not None]
    for p in probes.values():
        p["start_s"] = median(starts) if starts else None
    from .slurm import SlurmSettings, partition_limit_min

    slurm = spec.get("slurm") if isinstance(spec.get("slurm"), dict) else {}
    # a grid with a [slurm] table runs under its tasks' time limit (SlurmSettings' default where it sets none)
    timeout = slurm.get("timeout_min", SlurmSettings.timeout_min) if slurm else None
    delay = slurm.get("signal_delay_s", SlurmSettings.signal_delay_s)
    if timeout == "auto":  # each task gets its prediction: only the partition's limit can cut a cell
        timeout = partition_limit_min(slurm.get("partition"))
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        timeout = None
    rows = []
    for c in cells:
        col = memory_column(c.device)
        limit, limit_from = limits[c.device]
        row = {"key": c.key, "method": c.method, "arch": c.arch, "dataset": c.dataset, "T": c.T, "seed": c.seed,
               "kind": c.kind, "batch_size": c.batch_size, "epochs": c.epochs, "device": c.device, "devices": c.devices,
               "label": c.label, "memory_column": col, "memory_limit_mib": limit, "memory_limit_from": limit_from}
        if c.key in measured:
            row.update(source="measured", **_measured(c, measured[c.key]))
        else:
            p = probes[step_config(c)]
            ref = probes.get(step_config(reference_cell(c))) if c.kind == "fidelity" else None
            if p.get("status") != "ok" or not p.get("step_ms"):
                row.update(source="probe " + str(p.get("status")), probe_error=(p.get("error") or "")[:2000])
                row.update(memory_columns(p.get("below") or p))
                if p.get("below"):  # where the line from the batches that ran puts the cell's batch
                    row["probe_ran_batch"] = p["below"]["batch_size"]
                    row[f"predicted_{col}"] = memory_at_batch(row, c.batch_size)
            else:
                row.update(source="probed", **predict(c, p, ref, rows_before.get(c.key, 0)))
        peak = row.get(f"predicted_{col}")
        fits = None if limit is None or _missing(peak) else peak <= limit
        if row["source"] == "probe oom":
            fits = False
        row["fits"] = fits
        row["max_batch_size"] = largest_batch(row, col, limit) if fits is False and limit is not None else None
        ran = row.get("probe_ran_batch")
        if ran is not None and (row["max_batch_size"] is None or row["max_batch_size"] >= c.batch_size):
            # the cell's batch ran out of memory below the limit the plan knows (another process on the GPU, an
            # address-space limit): the largest batch known to fit is the one that ran
            row["max_batch_size"] = ran
        wall = row.get("predicted_cell_wall_s")
        row["slurm_requeues"] = slurm_requeues(wall, timeout, delay) if timeout and wall is not None else None
        rows.append(row)
    df = pd.DataFrame(rows)
    for name in (*PLAN_COLUMNS, *(f"predicted_{memory_column(d)}" for d in limits)):
        if name not in df:
            df[name] = math.nan
    df["plan_s"] = time.perf_counter() - t0
    df["planned_at"] = pd.Timestamp.now(tz="UTC")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PLAN_FILE, lambda f: df.to_parquet(f, index=False))
    return df


# ---------------------------------------------------------------- what the plan says


def _hms(s) -> str:
    if _missing(s):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if _missing(v) else fmt.format(v)


def render_plan(df, top: int = 30) -> str:
    """The plan as a table sorted by predicted wall time (most expensive first), the flags, and the totals."""
    from tabulate import tabulate

    d = df.sort_values("predicted_cell_wall_s", ascending=False, na_position="first")
    lines = []
    rows = []
    for r in d.head(top if top else len(d)).to_dict("records"):
        col = r["memory_column"]
        flags = []
        peak, limit = r.get(f"predicted_{col}"), r.get("memory_limit_mib")
        if r.get("fits") is False:
            mb = r.get("max_batch_size")
            flags.append("OOM" if _missing(mb) else f"OOM: batch <= {int(mb)} fits")
        elif r.get("fits") and peak > limit * (1.0 - MEMORY_HEADROOM[col]):
            flags.append(f"memory: {100 * peak / limit:.0f}% of the limit")
        req = r.get("slurm_requeues")
        if not _missing(req) and req > 0:
            flags.append(f"{int(req)} requeue(s)")
        if str(r["source"]).startswith("probe "):
            flags.append(r["source"])
        rows.append([f"{r['kind']} {r['label']}", r["source"], _num(r.get("predicted_step_time_ms_median"), "{:.2f}"),
                     _hms(r.get("predicted_epoch_s")), _hms(r.get("predicted_cell_wall_s")),
                     _num(r.get(f"predicted_{col}"), "{:.0f}"), _num(r.get("predicted_saved_for_backward_mib"), "{:.2f}"),
                     _num(r.get("predicted_energy_j"), "{:.0f}"), "; ".join(flags)])
    col = d["memory_column"].iloc[0] if len(d) else "peak_rss_mib"
    lines.append(tabulate(rows, headers=["cell", "from", "step ms", "epoch", "cell wall", col.replace("_mib", " MiB"),
                                         "saved MiB", "energy J", "flags"], tablefmt="github"))
    if top and len(d) > top:
        lines.append(f"... {len(d) - top} cheaper cell(s) more in {PLAN_FILE}")
    wall = d["predicted_cell_wall_s"].fillna(0) + d.get("predicted_time_start_s", 0).fillna(0)
    hours = float((wall * d["devices"]).sum()) / 3600
    energy = d["predicted_energy_j"].dropna() if "predicted_energy_j" in d else []
    unknown = int(d["predicted_cell_wall_s"].isna().sum())
    lines.append(f"\n{len(d)} cell(s): {_hms(float(wall.sum()))} of cell time, {hours:.2f} device-hour(s)"
                 + (f", {float(energy.sum()) / 3.6e6:.3f} kWh of training energy" if len(energy) else
                    ", energy: not measurable on this device")
                 + (f" ({unknown} cell(s) without a prediction: their probe failed)" if unknown else ""))
    oom = d[d["fits"] == False]  # noqa: E712 (a column of True/False/None)
    if len(oom):
        r = oom.iloc[0]
        lines.append(f"{len(oom)} cell(s) predicted not to fit in {r['memory_limit_mib']:.0f} MiB "
                     f"({r['memory_limit_from']})")
    req = d["slurm_requeues"].dropna() if "slurm_requeues" in d else []
    if len(req) and (req > 0).any():
        lines.append(f"{int((req > 0).sum())} cell(s) longer than one Slurm task's time limit: "
                     f"{int(req.sum())} requeue(s) in all")
    failed = d[d["source"].astype(str).str.startswith("probe ")]
    for r in failed.head(3).to_dict("records"):
        first = (str(r.get("probe_error") or "").strip().splitlines() or ["(no message)"])[0]
        lines.append(f"probe of {r['label']} failed: {first}")
    lines.append(f"plan: {_hms(float(d['plan_s'].iloc[0]))} to make")
    return "\n".join(lines)


# ---------------------------------------------------------------- Slurm sized from the plan


def plan_seconds(out: Path) -> dict[str, float]:
    """key -> predicted seconds (its start and its wall time) of each cell ``out``'s plan.parquet predicts; empty
    where there is none."""
    plan = read_plan(out)
    pred: dict[str, float] = {}
    for r in plan.to_dict("records") if plan is not None and "predicted_cell_wall_s" in plan else []:
        wall = r.get("predicted_cell_wall_s")
        if not _missing(wall):
            start = r.get("predicted_time_start_s")
            pred[r["key"]] = float(wall) + (0.0 if _missing(start) else float(start))
    return pred


def predicted_seconds(out: Path, cells: list[Cell]) -> dict[str, float]:
    """``plan_seconds`` of the cells; a UsageError where there is no plan or a cell has no prediction in it."""
    pred = plan_seconds(out)
    where = Path(out) / PLAN_FILE
    if not where.is_file():
        raise UsageError(f"timeout_min=auto and cells_per_task=auto size the tasks from {where}, which is not there: "
                         f"run `run_bench.py plan GRID --out {out}` with the same --filter and --set first, where the "
                         "tasks will run (a node of the partition)")
    missing = [c.label for c in cells if c.key not in pred]
    if missing:
        raise UsageError(f"{len(missing)} cell(s) have no prediction in {where} (planned with other settings, or their "
                         f"probe failed): {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; plan them again")
    return pred
