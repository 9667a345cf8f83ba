"""The result format: schema, atomic writes, reading with upgrades, the folder's manifest and lock.

One torch-free module, imported by bench/ to write rows and by reports/ to read them::

    results/<grid>/cells/<key>.parquet     one row per cell: config, status, measurements, environment
    results/<grid>/epochs/<key>.parquet    one row per epoch (train cells)
    results/<grid>/samples/<key>.parquet   memory over time (RSS, NVML; mib) and power (w), by source
    results/<grid>/<detail>/<key>.parquet  a cell's analyses (DETAILS): gradient fidelity per layer, firing rate
                                           per layer, any-time and shuffled-input accuracy, saved bytes by part
    results/<grid>/manifest.json           the cells runs into this folder asked for, and the code fingerprint
                                           of the last run (what "stale" is measured against)
    results/<grid>/.lock                   host and pid of the run writing the folder now

Every cell row carries ``schema_version``. Reading upgrades rows of an older schema where a rule exists
(``UPGRADES``), and skips a file it cannot use with one warning that names the file and what is wrong
(unreadable, a newer schema, a missing column, a value of the wrong type). Readers never raise on a
results file.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


SCHEMA_VERSION = 2
# a cell's analyses, one file per cell and kind: what each row holds
DETAILS: dict[str, str] = {
    "fidelity": "gradient fidelity (fidelity cells): per weights epoch, batch and layer (-1: all weights), the cosine "
                "and norm ratio of the method's scaled gradient against its reference's",
    "layers": "per spiking layer (in order), its firing rate over the evaluation set after training",
    "anytime": "accuracy over the evaluation set after training: with the first t steps (analysis 'anytime') and "
               "with the input frames permuted in time (analysis 'shuffle', one row per permutation)",
    "saved": "the bytes saved for backward at their peak, by the module that saved them and the kind of tensor",
    "ops": "per conv and linear layer (in order), operations per evaluation sample over all T steps: dense MACs, "
           "effective MACs (real-valued input) or ACs (spikes) driven by the non-zero inputs, input sparsity",
}
KINDS = ("cells", "epochs", "samples") + tuple(DETAILS)
MANIFEST = "manifest.json"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"  # <results>/checkpoints/<key>.pt: a train cell's state to resume from (bench/checkpoint.py)

# a cell row's status, worst first (a cell on several devices takes its worst rank's)
STATUSES = ("oom", "error", "cancelled", "preempted", "ok")
# statuses of a cell that is to be continued (a rerun resumes it from its checkpoint), not a failure
TO_CONTINUE = ("preempted", "cancelled")
# the phases of a training step that the runner times (a method marks them with probe.phase(name))
PHASES = ("forward", "backward", "optimizer")
# where a cell's wall time goes (bench.rows.PartClock): one column time_<part>_s each, which add up to cell_wall_s
# (what is in none of them: progress reports, the row's own bookkeeping). The start (time_start_s: from the
# launcher's request to the cell's start in its worker) is outside cell_wall_s.
TIME_PARTS: dict[str, str] = {
    "device": "device set-up and environment",
    "data": "data: datasets, loaders, waiting for batches",
    "model": "model, optimizer and schedule built",
    "warmup": "warm-up steps",
    "steps": "measured steps (fidelity cells: the gradients compared)",
    "meters": "meters: samplers, energy idle, the saved-tensors step, the row's measurements",
    "eval": "evaluation and its analyses",
    "checkpoint": "checkpoints: resume, writes, kept weights",
    "store": "storing the epochs, samples and details",
}

# columns a row of each kind must have to be used at all
REQUIRED: dict[str, tuple[str, ...]] = {
    "cells": ("key", "status", "method", "arch", "dataset", "T"),
    "epochs": ("key", "epoch"),
    "samples": ("key", "source", "t_s", "mib"),
    "fidelity": ("key", "epoch", "batch", "layer", "name", "cosine", "norm_ratio"),
    "layers": ("key", "layer", "name", "firing_rate"),
    "anytime": ("key", "analysis", "t", "acc"),
    "saved": ("key", "module", "tensor", "bytes"),
    "ops": ("key", "layer", "name", "dense_macs"),
}

@dataclass(frozen=True)
class Metric:
    """One measured column of a cell row, declared once: the runner fills it, the gate, the figures, the tables
    and the command line's summary read its unit, direction, tolerance and label from here."""

    name: str
    unit: str  # "ms", "s", "MiB", "%", "samples/s", "" (a plain number)
    better: str  # "lower" | "higher" | "none" (not a quality: a count, a baseline, a context figure)
    tolerance: float | None  # the gate's default tolerance in percent; None: not gated unless asked
    label: str  # for axes, table headers and notes
    summary: bool = False  # a column of the command line's summary table
    series: str | None = None  # a statistic of a series the runner records (SERIES); None: measured directly
    stat: str | None = None  # of that series: "median", "mean", "min", "max" or a percentile "p<q>"

    @property
    def axis_label(self) -> str:
        return f"{self.label} [{self.unit}]" if self.unit else self.label


# The series the runner records in every cell: one value per measured step (whole and per phase) or per epoch.
# A metric that is a statistic of one of them is one line below; summarise() computes it.
SERIES = {
    "step_ms": "time of each measured step [ms]",
    **{f"{ph}_ms": f"{ph} time of each measured step [ms]" for ph in PHASES},
    "epoch_s": "time of each epoch's training steps [s]",
    "data_wait_ms": "time each measured step of a train cell waited for its batch [ms]",
}

METRICS: tuple[Metric, ...] = (
    Metric("step_time_ms_median", "ms", "lower", 10.0, "time per step", summary=True, series="step_ms", stat="median"),
    Metric("step_time_ms_p10", "ms", "lower", None, "time per step, 10th percentile", series="step_ms", stat="p10"),
    Metric("step_time_ms_p90", "ms", "lower", None, "time per step, 90th percentile", series="step_ms", stat="p90"),
    Metric("forward_ms", "ms", "lower", None, "forward time per step", series="forward_ms", stat="median"),
    Metric("backward_ms", "ms", "lower", None, "backward time per step", series="backward_ms", stat="median"),
    Metric("optimizer_ms", "ms", "lower", None, "optimizer time per step", series="optimizer_ms", stat="median"),
    Metric("epoch_time_s", "s", "lower", None, "time per epoch", summary=True, series="epoch_s", stat="median"),
    Metric("throughput_samples_per_s", "samples/s", "higher", None, "throughput"),
    Metric("data_wait_ms", "ms", "lower", None, "time a step waited for its batch (mean)", series="data_wait_ms",
           stat="mean"),
    Metric("peak_alloc_mib", "MiB", "lower", 5.0, "peak memory, torch allocator", summary=True),
    Metric("peak_reserved_mib", "MiB", "lower", 5.0, "peak memory reserved, torch allocator"),
    Metric("peak_nvml_mib", "MiB", "lower", 5.0, "peak memory, NVML", summary=True),
    Metric("peak_nvml_process_mib", "MiB", "lower", None, "GPU memory of the process, NVML"),
    Metric("nvml_baseline_mib", "MiB", "none", None, "GPU memory in use before the cell, NVML"),
    Metric("peak_rss_mib", "MiB", "lower", 5.0, "peak resident memory (RSS)", summary=True),
    Metric("footprint_mib", "MiB", "lower", None, "RSS footprint of training"),
    # a cell on several devices: the columns above are its largest rank's; these add up its ranks
    Metric("peak_alloc_mib_sum", "MiB", "lower", None, "peak memory, torch allocator, sum over the ranks"),
    Metric("peak_reserved_mib_sum", "MiB", "lower", None, "peak memory reserved, sum over the ranks"),
    Metric("peak_nvml_mib_sum", "MiB", "lower", None, "peak memory, NVML, sum over the ranks"),
    Metric("peak_rss_mib_sum", "MiB", "lower", None, "peak resident memory, sum over the ranks"),
    Metric("footprint_mib_sum", "MiB", "lower", None, "RSS footprint of training, sum over the ranks"),
    Metric("saved_for_backward_mib", "MiB", "lower", 1.0, "bytes saved for backward", summary=True),
    Metric("acc_top1", "%", "higher", None, "test accuracy", summary=True),
    Metric("acc_top1_best", "%", "higher", None, "best test accuracy over epochs"),
    Metric("train_loss", "", "lower", None, "training loss"),
    Metric("firing_rate_mean", "", "none", None, "mean firing rate"),
    Metric("acc_shuffled", "%", "higher", None, "test accuracy, input frames permuted in time (mean)"),
    # training energy (bench/energy.py): NVML's counter or integrated power on a GPU, RAPL on a CPU; the source is
    # the row's energy_source, and where none could be read energy_null_reason says why
    Metric("energy_per_step_j", "J", "lower", None, "energy per training step", summary=True),
    Metric("energy_epoch_j", "J", "lower", None, "energy per epoch (training steps)"),
    Metric("energy_above_idle_per_step_j", "J", "lower", None, "energy per training step above idle power"),
    Metric("power_mean_w", "W", "none", None, "mean power over the training steps"),
    Metric("idle_power_w", "W", "none", None, "idle power before the cell"),
    # operations per evaluation sample over all T steps (bench/ops.py, DETAILS["ops"])
    Metric("ops_dense_macs", "", "lower", None, "dense MACs per sample"),
    Metric("ops_effective_macs", "", "lower", None, "effective MACs per sample (real-valued inputs)"),
    Metric("ops_effective_acs", "", "lower", None, "effective ACs per sample (spike inputs)"),
    # fidelity cells: the all-weights gradient against the reference's, mean over the batches (DETAILS["fidelity"])
    Metric("grad_cosine_init", "", "none", None, "gradient cosine to the reference, at initialisation", summary=True),
    Metric("grad_norm_ratio_init", "", "none", None, "gradient norm ratio to the reference, at initialisation"),
    Metric("grad_cosine_trained", "", "none", None, "gradient cosine to the reference, trained weights", summary=True),
    Metric("grad_norm_ratio_trained", "", "none", None, "gradient norm ratio to the reference, trained weights"),
    Metric("measured_steps", "", "none", None, "measured steps"),
    Metric("num_params", "", "lower", 0.0, "parameters"),
    Metric("cell_wall_s", "s", "none", None, "wall time of the cell"),
    Metric("time_start_s", "s", "none", None, "from the launcher's request to the cell's start"),
    *(Metric(f"time_{part}_s", "s", "none", None, f"time in the cell: {label}") for part, label in TIME_PARTS.items()),
    Metric("restarts", "", "none", None, "restarts from a checkpoint"),
    Metric("concurrent_cells", "", "none", None, "cells run side by side"),
    Metric("checkpoint_s", "s", "lower", None, "time to write a checkpoint (mean, this attempt)"),
    Metric("checkpoint_mib", "MiB", "none", None, "size of a checkpoint"),
    Metric("contention_cpu_s", "s", "none", None, "CPU time used by other processes"),
    Metric("contention_cpu_frac", "", "none", None, "share of the CPUs used by other processes"),
    Metric("contention_window_s", "s", "none", None, "contention window"),
    Metric("contention_gpu_processes", "", "none", None, "other processes on the GPU"),
)
METRIC: dict[str, Metric] = {m.name: m for m in METRICS}


def _statistic(stat: str) -> Callable[[np.ndarray], float]:
    named = {"median": np.median, "mean": np.mean, "min": np.min, "max": np.max}
    if stat in named:
        return named[stat]
    if stat.startswith("p") and stat[1:].replace(".", "", 1).isdigit() and 0 <= float(stat[1:]) <= 100:
        return lambda xs: np.percentile(xs, float(stat[1:]))
    raise ValueError(f"unknown statistic {stat!r}: median, mean, min, max or p<q> with 0 <= q <= 100")


def summarise(series: dict[str, list[float]]) -> dict[str, float | None]:
    """The value of every metric that is a statistic of one of the given series (None where it is empty); metrics
    of series not given are left out, so a caller can summarise step series and epoch series separately."""
    out: dict[str, float | None] = {}
    for m in METRICS:
        if m.series is not None and m.series in series:
            xs = np.asarray(series[m.series], dtype=float)
            out[m.name] = float(_statistic(m.stat or "median")(xs)) if xs.size else None
    return out


for _m in METRICS:  # a misspelt series or statistic fails at import, not in the middle of a grid
    if _m.series is not None:
        assert _m.series in SERIES, f"metric {_m.name}: unknown series {_m.series!r}"
        _statistic(_m.stat or "median")
# what the runner measures, per cell row; null where it cannot be measured (a GPU column on a CPU, say)
MEASURE_COLUMNS = tuple(METRIC)
# a cell row's configuration: the fields of bench.cell.Cell as stored (a table as a JSON object, a list of epochs as
# a JSON list), each with its type. Stated here because this module reads results without bench or torch; a test
# holds it to the Cell's fields (tests/test_check.py), so neither can move without the other.
CONFIG_TYPES: dict[str, str] = {
    "method": "text", "arch": "text", "dataset": "text", "T": "int", "seed": "int", "kind": "text",
    "batch_size": "int", "eval_batch_size": "int", "epochs": "int", "warmup_steps": "int", "steps": "int",
    "optimizer": "text", "lr": "float", "momentum": "float", "weight_decay": "float", "schedule": "text",
    "neuron": "text", "method_options": "object", "arch_options": "object", "train_subset": "int", "device": "text",
    "precision": "text", "grid": "text", "checkpoint_minutes": "float", "save_weights_at": "list", "devices": "int",
    "reference": "text", "trained_by": "text", "weights_at": "list", "backend": "text",
}
CONFIG_NUMERIC = tuple(c for c, t in CONFIG_TYPES.items() if t in ("int", "float"))
NUMERIC: dict[str, tuple[str, ...]] = {
    "cells": CONFIG_NUMERIC + MEASURE_COLUMNS + ("schema_version",),
    "epochs": ("epoch", "train_loss", "test_acc", "epoch_time_s", "lr", "firing_rate_mean", "steps", "energy_j"),
    "samples": ("t_s", "mib", "w"),
    "fidelity": ("epoch", "batch", "layer", "numel", "cosine", "norm_ratio"),
    "layers": ("layer", "firing_rate"),
    "anytime": ("t", "permutation", "acc"),
    "saved": ("bytes",),
    "ops": ("layer", "dense_macs", "effective_macs", "effective_acs", "input_sparsity"),
}

# a cell's timings count as measured under contention when other processes used more than this share of the CPUs
CONTENTION_LIMIT = 0.10


def _upgrade_1_to_2(df: pd.DataFrame) -> pd.DataFrame:
    """Schema 1 (no ``schema_version``) had no code fingerprint: such a row's code is unknown, so it reads as stale."""
    return df.assign(code_fingerprint=None, schema_version=2)


# schema version N -> the function that turns a frame of version N into version N + 1
UPGRADES: dict[int, Callable[[pd.DataFrame], pd.DataFrame]] = {1: _upgrade_1_to_2}


class ResultsFileProblem(Exception):
    """A results file that cannot be used as it is; the message names the file and the problem."""


# --------------------------------------------------------------------------- writing


def _file_mode() -> int:
    """0o666 less the process umask: result files are created as any other file of the user's would be."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename, fsync the folder: a reader sees the
    old file or the new one, never half of one."""
    write_atomic(path, lambda f: df.to_parquet(f, index=False))


def write_atomic(path: Path, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_cell(out: Path, key: str, row: dict, epochs: list[dict] | None = None, samples: list[dict] | None = None,
               details: dict[str, list[dict]] | None = None) -> None:
    """Store a cell. Epochs, samples and details (``DETAILS`` kind -> rows) first, the cell row last: a cell row
    marks a complete cell. A detail kind this result lacks is removed (an earlier run's would not be this one's)."""
    write_cell_parts(out, key, epochs, samples, details)
    write_cell_row(out, key, row)


def write_cell_row(out: Path, key: str, row: dict) -> None:
    """The cell row alone: write it after the cell's other tables (``write_cell_parts``)."""
    atomic_write_parquet(pd.DataFrame([{**row, "schema_version": SCHEMA_VERSION}]), Path(out) / "cells" / f"{key}.parquet")


def write_cell_parts(out: Path, key: str, epochs: list[dict] | None = None, samples: list[dict] | None = None,
                     details: dict[str, list[dict]] | None = None) -> None:
    """What ``write_cell`` stores before the row: epochs, samples and details."""
    out = Path(out)
    details = details or {}
    unknown = set(details) - set(DETAILS)
    if unknown:
        raise ValueError(f"unknown detail kind(s) {sorted(unknown)}; valid: {sorted(DETAILS)}")
    if epochs:
        atomic_write_parquet(pd.DataFrame(epochs).assign(key=key), out / "epochs" / f"{key}.parquet")
    if samples:
        atomic_write_parquet(pd.DataFrame(samples).assign(key=key), out / "samples" / f"{key}.parquet")
    for kind in DETAILS:
        if details.get(kind):
            atomic_write_parquet(pd.DataFrame(details[kind]).assign(key=key), out / kind / f"{key}.parquet")
        else:
            (out / kind / f"{key}.parquet").unlink(missing_ok=True)


def remove_stray_temp_files(out: Path) -> list[Path]:
    """Temporary files a killed writer left behind (only call it while holding the folder's lock)."""
    gone = []
    for kind in KINDS:
        for p in (Path(out) / kind).glob(".*.tmp"):
            try:
                p.unlink()
                gone.append(p)
            except OSError:
                pass
    return gone


# --------------------------------------------------------------------------- reading


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=4)  # the CLI prints it as one line; a library user can filter or raise it


def upgrade(df: pd.DataFrame, source: str = "frame", kind: str = "cells") -> pd.DataFrame:
    """A frame of any known schema as the current schema, its numeric columns as numbers.

    Raises ResultsFileProblem (naming ``source``) when no rule reaches the current schema or a required
    column is missing. A value of the wrong type (text where a number belongs) becomes null with a warning;
    a row without its identity (a null method, arch, dataset or T) is dropped with a warning."""
    missing = [c for c in REQUIRED[kind] if c not in df.columns]
    if missing:
        raise ResultsFileProblem(f"{source}: not a snnbench {kind} file of any known schema: column(s) "
                                 f"{', '.join(missing)} missing")
    if kind == "cells":
        versions = pd.to_numeric(df["schema_version"], errors="coerce") if "schema_version" in df else None
        v = 1 if versions is None or versions.isna().all() else int(versions.max())
        if v > SCHEMA_VERSION:
            raise ResultsFileProblem(f"{source}: schema version {v} is newer than this snnbench's ({SCHEMA_VERSION}); "
                                     "upgrade snnbench to read it")
        while v < SCHEMA_VERSION:
            if v not in UPGRADES:
                raise ResultsFileProblem(f"{source}: no upgrade from schema version {v} to {SCHEMA_VERSION}")
            df = UPGRADES[v](df)
            v += 1
    df = df.copy()
    for col in NUMERIC[kind]:
        if col not in df.columns:
            continue
        raw = df[col]
        if raw.dtype.kind in "iuf":  # numbers already (the common case, and the cheap one)
            continue
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() & raw.notna()
        if bad.any():
            _warn(f"{source}: column {col!r} holds {int(bad.sum())} value(s) that are not numbers "
                  f"(e.g. {raw[bad].iloc[0]!r}); read as missing")
        df[col] = num
    if kind == "cells":
        for col in ("key", "status"):
            df[col] = df[col].map(lambda v: None if _isnull(v) else str(v))
        lost = df[["key", "status"]].isna().any(axis=1)
        if lost.any():
            _warn(f"{source}: {int(lost.sum())} row(s) without a key or status: skipped")
            df = df[~lost]
        df = _valid_config(df, source)
        if not df.empty:
            df["T"] = df["T"].astype("int64")
    return df


_CONFIG_KIND_NAMES = {"text": "text", "int": "a whole number", "float": "a number", "object": "a JSON object",
                      "list": "a JSON list"}


def _config_problem(kind: str, v) -> str | None:
    """The bad value as the warning shows it ("null", or its repr), or None where ``v`` is of type ``kind``."""
    if _isnull(v):
        return "null"
    if kind == "int":
        return None if float(v).is_integer() else repr(v)
    if kind == "float":
        return None
    if not isinstance(v, str):
        return repr(v)
    if kind in ("object", "list"):
        try:
            parsed = json.loads(v)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict if kind == "object" else list):
            return repr(v)
    return None


def _valid_config(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """The rows whose every configuration column holds a value of its type; each other row is skipped with a
    warning naming the file, the column and the value (a cell whose configuration is unknown cannot be matched,
    grouped or labelled). The numeric columns were made numbers before: text there is already null."""
    bad = pd.Series(False, index=df.index)
    for col, kind in CONFIG_TYPES.items():
        if col not in df.columns:
            continue  # written before the field existed: the upgrade rules decide what such a row means
        vals = df[col]
        if kind in ("int", "float") and vals.dtype.kind in "iuf" and not vals.isna().any() \
                and (kind == "float" or (vals % 1 == 0).all()):
            continue  # numbers of the right kind throughout: nothing to say (the cheap check first)
        problems = df[col].map(lambda v: _config_problem(kind, v))
        hit = problems.notna() & ~bad
        if hit.any():
            _warn(f"{source}: column {col!r} holds {problems[hit].iloc[0]} where {_CONFIG_KIND_NAMES[kind]} belongs: "
                  f"{int(hit.sum())} cell row(s) skipped")
            bad |= hit
    return df[~bad]


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _read_file(p: Path, kind: str, columns: tuple[str, ...] | None = None) -> pd.DataFrame | None:
    try:
        if columns is not None:  # those of them the file has, read alone (the schema is in the file's footer)
            have = set(pq.read_schema(p).names)
            columns = tuple(c for c in dict.fromkeys((*REQUIRED[kind], "schema_version", "code_fingerprint", *columns))
                            if c in have)
        df = pd.read_parquet(p, columns=list(columns) if columns is not None else None)
    except Exception as e:  # a truncated or foreign file
        _warn(f"skipping unreadable results file {p}: {type(e).__name__}: {e}")
        return None
    try:
        return upgrade(df, str(p), kind)
    except ResultsFileProblem as e:
        _warn(f"skipping results file {e}")
        return None


def _read_folder(grid_dir: Path, kind: str, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    frames = [f for f in (_read_file(p, kind, columns) for p in sorted((grid_dir / kind).glob("*.parquet")))
              if f is not None and not f.empty]
    frames = [f.dropna(axis=1, how="all") for f in frames]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if kind == "cells":
        df = mark_stale(df, read_manifest(grid_dir).get("code_fingerprints", {}))
    return df


def load_results(path: str | Path, kind: str = "cells", columns: list[str] | None = None) -> pd.DataFrame:
    """One DataFrame of every stored ``kind`` row under ``path`` (a grid folder, or a folder of grid folders),
    upgraded to the current schema. A file that cannot be used is skipped with a warning naming it. ``columns``:
    read only these (where a file has them) and those every row of the kind needs: for a caller that looks up a
    few fields in many files (a fidelity cell looking for its train cell: 55 files in 0.1 s instead of 0.6 s).

    Cell rows get a ``stale`` column: True where the row was measured by other code than the folder's last
    run (its ``code_fingerprint`` differs from the one that run recorded, or it has none)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    path = Path(path)
    if (path / kind).is_dir():
        folders = [path]
    elif path.is_dir():
        folders = sorted(p for p in path.iterdir() if (p / kind).is_dir())
    else:
        folders = []
    cols = tuple(columns) if columns is not None else None
    frames = [f for f in (_read_folder(d, kind, cols) for d in folders) if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_table(path: str | Path) -> pd.DataFrame:
    """Cell rows from one parquet file (a baseline), upgraded; ResultsFileProblem if it cannot be used."""
    try:
        df = pd.read_parquet(path)
    except Exception as e:
        raise ResultsFileProblem(f"{path} cannot be read as parquet ({type(e).__name__}: {e})") from None
    return upgrade(df, str(path), "cells")


def device_type(device) -> str:
    return str(device).split(":")[0] if not _isnull(device) else "cpu"


def mark_stale(cells: pd.DataFrame, fingerprints: dict[str, str]) -> pd.DataFrame:
    """``stale``: an ok row whose code fingerprint is not the current one for its device type (``fingerprints``:
    device type -> fingerprint). Without fingerprints to compare with, nothing is marked."""
    if cells.empty or not fingerprints:
        return cells.assign(stale=False) if not cells.empty else cells
    dev = cells["device"] if "device" in cells else pd.Series("cpu", index=cells.index)
    fp = cells["code_fingerprint"] if "code_fingerprint" in cells else pd.Series(None, index=cells.index)
    want = dev.map(lambda d: fingerprints.get(device_type(d)))
    stale = want.notna() & (fp.isna() | (fp != want)) & (cells["status"] == "ok")
    return cells.assign(stale=stale.astype(bool))


# --------------------------------------------------------------------------- the manifest


def read_manifest(grid_dir: Path) -> dict:
    p = Path(grid_dir) / MANIFEST
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def update_manifest(grid_dir: Path, grid: str, configs: dict[str, dict], fingerprints: dict[str, str]) -> None:
    """Add the cells a run asks for (key -> config) and record the run's code fingerprints."""
    m = read_manifest(grid_dir)
    cells = m.get("cells") if isinstance(m.get("cells"), dict) else {}
    cells.update(configs)
    fps = m.get("code_fingerprints") if isinstance(m.get("code_fingerprints"), dict) else {}
    fps.update(fingerprints)
    body = json.dumps({"grid": grid, "schema_version": SCHEMA_VERSION, "code_fingerprints": fps, "cells": cells},
                      indent=1, sort_keys=True, default=str)
    write_atomic(Path(grid_dir) / MANIFEST, lambda f: f.write(body.encode()))


# --------------------------------------------------------------------------- the lock


class FolderBusy(Exception):
    """Another live run holds the folder; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class FolderLock:
    """One run writes a results folder at a time: ``.lock`` holds the host, pid, start time and current cell
    of the run that writes it. A lock left by a dead process on this host is taken over; one from another
    host is respected (its process cannot be checked from here)."""

    folder: Path
    taken_over: dict | None = None

    @property
    def path(self) -> Path:
        return Path(self.folder) / LOCK

    def acquire(self) -> "FolderLock":
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _file_mode())
            except FileExistsError:
                holder = read_lock(self.folder)
                if holder and holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and not _pid_alive(holder["pid"]):
                    self.taken_over = holder
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                if holder is None:  # being written right now, or garbage: look again
                    time.sleep(0.2)
                    holder = read_lock(self.folder) or {}
                raise FolderBusy(f"results folder {self.folder} is being written by another run "
                                 f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                                 f"started {holder.get('started', '?')}); wait for it to end, or use another --out. "
                                 f"If that run is dead, remove {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._me = me
            return self
        raise FolderBusy(f"could not take the lock {self.path}")

    def note_cell(self, label: str | list[str] | None) -> None:
        """Record the cell(s) running now (``status`` shows them)."""
        body = json.dumps({**self._me, "cell": label})
        try:
            write_atomic(self.path, lambda f: f.write(body.encode()))
        except OSError:
            pass  # the lock file itself still holds the folder

    def release(self) -> None:
        try:
            holder = read_lock(self.folder)
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == self._me["host"]:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(folder: Path) -> dict | None:
    try:
        d = json.loads((Path(folder) / LOCK).read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def lock_holder_alive(holder: dict | None) -> bool:
    """Whether the run named in a lock is still running (assumed so for another host)."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    return isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"])


def method_options_label(row: pd.Series) -> str:
    """The non-default method options, and a non-default backend or precision, as ``k=v,k=v``."""
    opts = row.get("method_options")
    try:
        d = json.loads(opts) if isinstance(opts, str) else (opts or {})
    except ValueError:
        d = {}
    if not isinstance(d, dict):
        d = {}
    label = ",".join(f"{k}={v}" for k, v in sorted(d.items()) if v is not False and v is not None)  # 0.0 is not False
    # how the method ran, where not the default: a fused backend or bf16 is a different curve, never averaged in
    ran = [f"{k}={row.get(k)}" for k, default in (("backend", "torch"), ("precision", "fp32"))
           if isinstance(row.get(k), str) and row.get(k) != default]
    return ",".join([label] * bool(label) + ran)



PLAN_FILE = "plan.parquet"  # a results folder's plan (bench/plan.py writes it, reports read it)


def read_plan(folder) -> pd.DataFrame | None:
    """A results folder's plan.parquet, or None where there is none or it cannot be read."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception:
        return None

__all__ = ["CONTENTION_LIMIT", "PLAN_FILE", "read_plan", "FolderBusy", "FolderLock", "KINDS", "MEASURE_COLUMNS", "METRIC", "METRICS", "Metric", "ResultsFileProblem", "SERIES", "TIME_PARTS", "summarise",
           "SCHEMA_VERSION", "atomic_write_parquet", "load_results", "mark_stale", "read_lock", "read_manifest",
           "read_table", "remove_stray_temp_files", "update_manifest", "upgrade", "write_cell", "write_cell_parts",
           "write_cell_row"]
