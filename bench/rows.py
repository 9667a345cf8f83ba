"""A cell's result and the rows it stores: ``Result`` (the row, epoch rows, memory samples, per-step series and
analyses), the configuration columns of a row, and the row of a cell that failed before it measured anything.

Between the runner (bench/runner.py), which makes a Result, and those that combine or store one (the ranks of a
multi-device cell, bench/distributed.py; the worker and the launcher), so none of them imports another's
internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from methods import METHODS

from reports.results import MEASURE_COLUMNS

from .cell import DICT_FIELDS, Cell
from .env import environment
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
