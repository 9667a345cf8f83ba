"""Grid specs (TOML) -> Cells: the cartesian product of the axes, exclude rules, overrides, filters.

A grid file::

    name = "default"                 # optional; the file's stem otherwise
    description = "..."

    [axes]                           # every combination is a cell
    method = ["bptt_m", "rate_m"]
    arch = ["cnn_digits"]
    dataset = ["digits"]
    T = [1, 2, 4]
    seed = [0]

    [fixed]                          # every other Cell field (kind, epochs, batch_size, lr, ...)
    kind = "train"
    epochs = 3

    [[exclude]]                      # drop the cells that match every key (a value or a list of values)
    method = "bptt_s"
    T = [8]

    [[override]]                     # set fields on the cells that match
    match = { method = "rate_m" }
    set = { lr = 0.05 }

On the command line ``--filter method=rate_m,bptt_m`` keeps matching cells and ``--set epochs=3``
overrides a field of every cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from methods import ARCHS, METHODS
from methods.models import arch_options
from methods.neuron import PRESETS

from . import REPO
from .cell import CELL_DEFAULTS, CELL_FIELDS, DICT_FIELDS, KINDS, LAST_EPOCH, Cell, run_phases  # noqa: F401  (re-exported)
from .data import DATASETS, dataset_info
from .errors import UsageError

GRIDS_DIR = REPO / "grids"
T_MAX = 4096  # the largest T a cell may ask for (the papers use <= 540)
GRID_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


AXES_REQUIRED = ("method", "arch", "dataset", "T")


def _coerce(name: str, value: Any) -> Any:
    """A command-line or TOML value for a Cell field, converted to that field's type."""
    if name not in CELL_FIELDS:
        raise UsageError(f"unknown cell field {name!r}; valid: {', '.join(sorted(CELL_FIELDS))}")
    default = CELL_FIELDS[name].default
    if name in DICT_FIELDS:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise UsageError(f"{name} must be a JSON object, got {value!r}") from None
        if not isinstance(value, dict):
            raise UsageError(f"{name} must be a table/object, got {value!r}")
        return value
    if name in Cell.EPOCH_LISTS:
        items = value.replace(",", " ").split() if isinstance(value, str) else _as_list(value)
        try:
            epochs = tuple(int(v) for v in items)
        except (TypeError, ValueError):
            raise UsageError(f"{name} must be a list of epochs (e.g. [1, 10, 300]), got {value!r}") from None
        first = 0 if name == "weights_at" else 1  # weights_at: 0 is the weights at initialisation
        if any(e < first and e != LAST_EPOCH for e in epochs) or not epochs and name == "weights_at":
            raise UsageError(f"{name}: epochs count from {first}" + (" (0: at initialisation)" if first == 0 else "")
                             + f"; {LAST_EPOCH} is the train cell's last epoch; got {value!r}")
        return epochs
    typ = type(default) if default is not dataclasses.MISSING else (int if name == "T" else str)
    try:
        if typ is int and isinstance(value, str):
            return int(value)
        if typ is float and isinstance(value, (str, int)):
            return float(value)
        if typ is int and isinstance(value, float) and value.is_integer():
            return int(value)
    except ValueError:
        raise UsageError(f"{name} must be {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, typ) or isinstance(value, bool) != (typ is bool):
        raise UsageError(f"{name} must be {typ.__name__}, got {value!r}")
    return value


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _matches(cell: dict, rule: dict) -> bool:
    for k, want in rule.items():
        if k not in CELL_FIELDS:
            raise UsageError(f"rule names unknown field {k!r}; valid: {', '.join(sorted(CELL_FIELDS))}")
        if cell.get(k) not in [_coerce(k, w) for w in _as_list(want)]:
            return False
    return True


def load_grid(path_or_name: str | Path) -> tuple[str, dict]:
    """Read a grid file (a path, or a name in grids/). Returns (name, spec), the spec's structure checked."""
    p = Path(path_or_name)
    if not p.exists() and not p.suffix:
        p = GRIDS_DIR / f"{path_or_name}.toml"
    if not p.exists():
        raise UsageError(f"grid file {path_or_name!r} not found; grids here: {', '.join(list_grids())}")
    if p.is_dir():
        raise UsageError(f"grid {str(path_or_name)!r} is a directory, not a grid file (a TOML file, or a name in grids/)")
    try:
        spec = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"grid file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"grid file {p} cannot be read: {e.strerror}") from None
    known = {"name", "description", "axes", "fixed", "exclude", "override", "slurm"}
    unknown = set(spec) - known
    if unknown:
        raise UsageError(f"grid file {p}: unknown section(s) {sorted(unknown)}; valid: {sorted(known)}")
    if not isinstance(spec.get("axes"), dict):
        raise UsageError(f"grid file {p} has no [axes] table")
    if not isinstance(spec.get("fixed", {}), dict):
        raise UsageError(f"grid file {p}: 'fixed' must be a table ([fixed] with field = value lines)")
    for section in ("exclude", "override"):
        rules = spec.get(section, [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise UsageError(f"grid file {p}: '{section}' must be a list of tables ([[{section}]] blocks)")
    for o in spec.get("override", []):
        if not isinstance(o.get("set"), dict) or not isinstance(o.get("match", {}), dict):
            raise UsageError(f"grid file {p}: each [[override]] needs a 'set' table (and optionally a 'match' table)")
    if not isinstance(spec.get("slurm", {}), dict):
        raise UsageError(f"grid file {p}: 'slurm' must be a table ([slurm] with setting = value lines)")
    for k in ("name", "description"):
        if k in spec and not isinstance(spec[k], str):
            raise UsageError(f"grid file {p}: '{k}' must be a string")
    name = str(spec.get("name") or p.stem)
    check_grid_name(name, p)
    return name, spec


def check_grid_name(name: str, where: Path | str = "") -> str:
    """A grid's name names its results folder: a plain file name (letters, digits, '.', '_', '-'), never a path."""
    if not GRID_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"grid {where or name}: name {name!r} must be a plain file name of letters, digits, "
                         "'.', '_' and '-' (it names the results folder)")
    return name


def list_grids() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.toml"))


def check_value(name: str, value: Any) -> Any:
    """Refuse a name the registries do not know, or a T <= 0, naming the valid choices."""
    if name in ("method", "reference", "trained_by") and value and value not in METHODS:
        raise UsageError(f"unknown method {value!r}; valid: {', '.join(sorted(METHODS))}")
    if name == "arch" and value not in ARCHS:
        raise UsageError(f"unknown arch {value!r}; valid: {', '.join(sorted(ARCHS))}")
    if name == "dataset":
        dataset_info(value)
    if name == "neuron" and value not in PRESETS:
        raise UsageError(f"unknown neuron preset {value!r}; valid: {', '.join(sorted(PRESETS))}")
    if name == "T" and not 0 < value <= T_MAX:
        raise UsageError(f"T must be a positive integer up to {T_MAX}, got {value}")
    return value


def parse_filters(items: list[str]) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--filter expects FIELD=V1,V2, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        out.setdefault(k, []).extend(check_value(k, _coerce(k, s.strip())) for s in v.split(",") if s.strip())
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = check_value(k.strip(), _coerce(k.strip(), v.strip()))
    return out


def expand(spec: dict, name: str = "", filters: dict | None = None, sets: dict | None = None,
           device: str | None = None, default_device: str = "cpu") -> list[Cell]:
    """The cells of a grid spec, validated: an unknown name or a bad value raises UsageError. ``device`` (the
    command line's) overrides every cell's; ``default_device`` is used where the grid names none."""
    axes = spec["axes"]
    for a in AXES_REQUIRED:
        if a not in axes and a not in spec.get("fixed", {}):
            raise UsageError(f"grid {name!r}: axis {a!r} is missing")
    fixed = {k: _coerce(k, v) for k, v in spec.get("fixed", {}).items()}
    axis_values = {k: [_coerce(k, v) for v in _as_list(vals)] for k, vals in axes.items()}
    for k, vals in axis_values.items():
        if not vals:
            raise UsageError(f"grid {name!r}: axis {k!r} is empty")
    excludes = spec.get("exclude", [])
    overrides = spec.get("override", [])
    keys = list(axis_values)
    cells, seen = [], set()
    for combo in itertools.product(*(axis_values[k] for k in keys)):
        d = {**fixed, **dict(zip(keys, combo))}
        if any(_matches(d, ex) for ex in excludes):
            continue
        for o in overrides:
            if _matches(d, o.get("match", {})):
                d.update({k: _coerce(k, v) for k, v in o["set"].items()})
        if filters and not all(d.get(k, CELL_FIELDS[k].default) in vals for k, vals in filters.items()):
            continue
        if sets:
            d.update(sets)
        if device:
            d["device"] = device
        d.setdefault("device", default_device)
        d["grid"] = name
        cell = Cell(**d)
        validate(cell)
        if cell.key not in seen:
            seen.add(cell.key)
            cells.append(cell)
    return cells


def validate(cell: Cell) -> None:
    for name in ("method", "arch", "dataset", "T", "neuron", "reference", "trained_by"):  # names a registry must know
        check_value(name, getattr(cell, name))
    if cell.kind not in KINDS:
        raise UsageError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {cell.kind!r}")
    for f in ("batch_size", "eval_batch_size", "steps"):
        if getattr(cell, f) <= 0:
            raise UsageError(f"{f} must be > 0, got {getattr(cell, f)}")
    if cell.epochs < 0 or cell.warmup_steps < 0 or cell.train_subset < 0 or cell.seed < 0:
        raise UsageError("epochs, warmup_steps, train_subset and seed must be >= 0, got "
                         f"{cell.epochs}, {cell.warmup_steps}, {cell.train_subset}, {cell.seed}")
    if not isinstance(cell.devices, int) or isinstance(cell.devices, bool) or cell.devices < 1:
        raise UsageError(f"devices must be a whole number >= 1, got {cell.devices!r}")
    if cell.devices > 1:
        reason = METHODS[cell.method].data_parallel
        if reason is not None:
            raise UsageError(f"{cell.method} cannot run on {cell.devices} devices: {reason}")
        if cell.batch_size % cell.devices:
            raise UsageError(f"batch_size {cell.batch_size} is the global batch of a cell on {cell.devices} devices: "
                             f"it must be a multiple of {cell.devices}")
    if not (math.isfinite(cell.checkpoint_minutes) and cell.checkpoint_minutes >= 0):
        raise UsageError(f"checkpoint_minutes must be a finite number >= 0 (0: at epoch ends only), got {cell.checkpoint_minutes}")
    if not (math.isfinite(cell.lr) and cell.lr > 0):
        raise UsageError(f"lr must be a finite number > 0, got {cell.lr}")
    if not (math.isfinite(cell.momentum) and 0 <= cell.momentum < 1):
        raise UsageError(f"momentum must be in [0, 1), got {cell.momentum}")
    if not (math.isfinite(cell.weight_decay) and cell.weight_decay >= 0):
        raise UsageError(f"weight_decay must be a finite number >= 0, got {cell.weight_decay}")
    if cell.optimizer not in ("sgd", "adam"):
        raise UsageError(f"optimizer must be 'sgd' or 'adam', got {cell.optimizer!r}")
    if cell.schedule not in ("cosine", "constant", "invsqrt"):
        raise UsageError(f"schedule must be 'cosine', 'constant' or 'invsqrt', got {cell.schedule!r}")
    from methods.layers import PRECISIONS

    if cell.precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {cell.precision!r}")
    if not (cell.device == "cpu" or cell.device.startswith("cuda")):
        raise UsageError(f"device must be 'cpu' or 'cuda[:N]', got {cell.device!r}")
    method = METHODS[cell.method]
    try:
        m = method(T=cell.T, neuron=cell.neuron, options=dict(cell.method_options))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not m.supports(cell.arch):
        raise UsageError(f"method {cell.method} does not support arch {cell.arch!r}; it supports: "
                         + ", ".join(m.supported_archs()))
    if cell.kind == "fidelity":
        _validate_fidelity(cell, m)
    if cell.backend != "torch":
        _validate_backend(cell, m)
    if cell.precision != "fp32":
        if m.bf16 is not None:
            raise UsageError(f"{cell.label}: {cell.method} cannot run in {cell.precision}: {m.bf16}")
        if cell.kind == "fidelity":
            raise UsageError(f"{cell.label}: a fidelity cell compares gradients in fp32; precision must be 'fp32'")
    valid_opts = arch_options(cell.arch)
    unknown = sorted(set(cell.arch_options) - set(valid_opts))
    if unknown:
        raise UsageError(f"arch {cell.arch} has no option(s) {', '.join(map(repr, unknown))}; valid: "
                         + (", ".join(valid_opts) or "none"))


def _validate_backend(cell: Cell, method) -> None:
    import os

    from methods.layers import BACKENDS

    if cell.backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {cell.backend!r}")
    if method.torch_only is not None:
        raise UsageError(f"{cell.label}: {cell.method} runs on backend \"torch\" only: {method.torch_only}")
    if cell.backend == "triton":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise UsageError("backend 'triton' needs the triton package (it comes with torch's CUDA wheels on Linux)")
        if cell.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError(f"{cell.label}: backend 'triton' runs on a CUDA device; on a CPU only through Triton's "
                             "interpreter (TRITON_INTERPRET=1), which checks results and is not fast")


def _validate_fidelity(cell: Cell, method) -> None:
    reference = cell.reference or method.fidelity_reference
    if reference is None:
        raise UsageError(f"fidelity cell {cell.label}: {cell.method} names no reference method to compare its "
                         "gradient with; set reference = \"<method>\"")
    for role, name in (("reference", reference), ("trained_by", cell.trained_by or cell.method)):
        if not METHODS[name](T=cell.T, neuron=cell.neuron).supports(cell.arch):
            raise UsageError(f"fidelity cell {cell.label}: {role} {name} does not support arch {cell.arch!r}")
    if cell.devices != 1:
        raise UsageError(f"fidelity cell {cell.label}: it computes gradients on one device (devices = 1)")


__all__ = ["Cell", "T_MAX", "check_grid_name", "expand", "load_grid", "list_grids", "parse_filters", "parse_sets", "validate", "DATASETS"]
