"""A cell's result and the rows it stores: ``Result`` (the row, epoch rows, memory samples, per-step series and
analyses), the configuration columns of a row, and the row of a cell that failed before it measured anything.

Between the runner (bench/runner.py), which makes a Result, and those that combine or store one (the ranks of a
multi-device cell, bench/distributed.py; the worker and the launcher), so none of them imports another's
internals.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from methods import METHODS

from reports.results import MEASURE_COLUMNS, TIME_PARTS, write_cell_parts, write_cell_row

from .cell import DICT_FIELDS, Cell
from .env import environment
from .errors import StoreFailed
from .fingerprint import fingerprint

Progress = Callable[[dict], None]


@dataclass
class Result:
    row: dict
    epochs: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)  # per measured step, in order (reports.SERIES)
    details: dict[str, list[dict]] = field(default_factory=dict)  # the cell's analyses (reports.results.DETAILS)

    @property
    def status(self) -> str:
        return self.row["status"]


class PartClock:
    """Where a cell's wall time goes: seconds per part of ``TIME_PARTS`` (``with clock.part("data"): ...``). A part
    opened inside another pauses it, so no second is counted twice; what no part covers (progress reports, the
    row's bookkeeping) is in none."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(TIME_PARTS, 0.0)
        self._open: list[list] = []  # [part, since] of the parts open, innermost last

    @contextlib.contextmanager
    def part(self, name: str):
        if name not in self.seconds:
            raise ValueError(f"unknown part {name!r}: one of {', '.join(TIME_PARTS)}")
        now = time.perf_counter()
        if self._open:
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[name] += now - self._open.pop()[1]
            if self._open:
                self._open[-1][1] = now

    def add(self, name: str, seconds: float) -> None:
        """Seconds measured elsewhere (a batch's wait, timed by the loop)."""
        self.seconds[name] += seconds


def store_result(out: Path, cell: Cell, res: Result) -> None:
    """Store a Result: its epochs, samples and details, then its row, which counts the storing in
    ``time_store_s`` and ``cell_wall_s`` (from the cell's start to its row). Raises StoreFailed where it cannot."""
    t0 = time.perf_counter()
    try:
        write_cell_parts(out, cell.key, res.epochs, res.samples, res.details)
        spent = time.perf_counter() - t0
        if res.row.get("cell_wall_s") is not None:
            res.row["cell_wall_s"] += spent
            res.row["time_store_s"] = (res.row.get("time_store_s") or 0.0) + spent
        write_cell_row(out, cell.key, res.row)
    except OSError as e:
        raise StoreFailed(f"cannot store the result of {cell.label} in {out}: {e}") from None


def config_columns(cell: Cell) -> dict:
    cfg = cell.config()
    for k in DICT_FIELDS:
        cfg[k] = json.dumps(cfg[k], sort_keys=True)
    for k in Cell.EPOCH_LISTS:
        cfg[k] = json.dumps(list(cfg[k]))
    return cfg


def base_row(cell: Cell, status: str, error: str | None = None) -> dict:
    method = METHODS[cell.method]
    row = {"key": cell.key, "status": status, "error": error, **config_columns(cell),
           "code_fingerprint": fingerprint(cell.device), "restarts": 0, "resumed_at": None,
           "memory_in_T": method.memory_in_T, "time_reference_method": method.faster_than}
    for c in MEASURE_COLUMNS:
        row.setdefault(c, None)
    return row


def failure_row(cell: Cell, status: str, error: str) -> dict:
    """The row of a cell whose worker died before it could write one."""
    row = base_row(cell, status, error)
    try:
        row.update(environment(torch.device("cpu")))
    except Exception:  # pragma: no cover - environment capture never stops a failure row
        pass
    return row
