"""A Cell: one fully specified run, and the facts about its fields that the rest of bench/ derives from it.

Torch-free (no import of ``methods``, ``bench`` or torch at module level), so the gate, ``status`` and the
reports' callers can read what a cell's configuration is without importing the training code: its fields are
the configuration columns of every stored row, and the gate matches cells on them (``MEASURED_FIELDS``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

KINDS = ("train", "profile", "fidelity")
LAST_EPOCH = -1  # in save_weights_at and weights_at: the train cell's last epoch, whatever its epochs


@dataclass(frozen=True)
class Cell:
    """One fully specified run."""

    method: str
    arch: str
    dataset: str
    T: int
    seed: int = 0
    kind: str = "train"  # "train" | "profile" | "fidelity" (bench/fidelity.py)
    batch_size: int = 64
    eval_batch_size: int = 256
    epochs: int = 1  # train cells
    warmup_steps: int = 2  # steps excluded from step-time statistics
    steps: int = 10  # profile cells: measured steps; fidelity cells: batches
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # conv/linear weights only
    schedule: str = "cosine"  # "cosine" | "constant" | "invsqrt" (lr / sqrt(epoch + 1))
    neuron: str = "rbp"
    method_options: dict = field(default_factory=dict, hash=False)
    arch_options: dict = field(default_factory=dict, hash=False)
    train_subset: int = 0  # 0: the whole training set
    device: str = "cpu"
    precision: str = "fp32"
    grid: str = field(default="", compare=False)
    checkpoint_minutes: float = 0.0  # train cells: a checkpoint also every so many minutes (0: at epoch ends only)
    save_weights_at: tuple = field(default=(), hash=False)  # train cells: keep the weights after these epochs (-1: last)
    devices: int = 1  # ranks of one data-parallel cell (bench/distributed.py); batch_size is the global batch
    # fidelity cells (bench/fidelity.py)
    reference: str = ""  # the method whose gradient is the reference ("": the method's Method.fidelity_reference)
    trained_by: str = ""  # the method whose train cell saved the weights compared at epochs > 0 ("": this method)
    weights_at: tuple = field(default=(0,), hash=False)  # the epochs whose weights are compared (0: init, -1: last)
    backend: str = "torch"  # the multi-step LIF loops: "torch" | "triton" | "compile" (methods.layers.set_backend)

    # fields that do not change a result, so are left out of the key
    NOT_IN_KEY = ("grid", "checkpoint_minutes", "save_weights_at")
    # fields added after cells were stored: in the key only when not at their default, so older keys still hold
    KEY_IF_SET = ("devices", "reference", "trained_by", "weights_at", "backend")
    EPOCH_LISTS = ("save_weights_at", "weights_at")

    def __post_init__(self) -> None:
        for name in self.EPOCH_LISTS:  # JSON and TOML give a list
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def config(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def key(self) -> str:
        cfg = {k: v for k, v in self.config().items() if k not in self.NOT_IN_KEY
               and not (k in self.KEY_IF_SET and v == CELL_DEFAULTS[k])}
        from methods import __version__  # here, not at the top: reading a Cell's fields needs no torch

        cfg["version"] = __version__
        blob = json.dumps(cfg, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.method} {self.arch} {self.dataset} T={self.T} seed={self.seed}"


CELL_FIELDS = {f.name: f for f in fields(Cell)}
CELL_DEFAULTS = {f.name: f.default for f in fields(Cell)}
DICT_FIELDS = ("method_options", "arch_options")
# the fields that change what a cell measures: every field but those left out of its key (Cell.NOT_IN_KEY: the
# grid's name, how often it checkpoints, which weights it keeps). The gate matches a result to a baseline cell on
# these (bench/check.py), with the device's type in place of the device (cuda:0 and cuda:1 measure alike).
MEASURED_FIELDS = tuple(f.name for f in fields(Cell) if f.name not in Cell.NOT_IN_KEY)


def run_phases(cells: list[Cell]) -> list[list[Cell]]:
    """The cells in the order they may run: every other cell, then the fidelity cells (which read the weights train
    cells keep), each phase in the grid's order; a phase starts when the one before has ended."""
    phases = [[c for c in cells if c.kind != "fidelity"], [c for c in cells if c.kind == "fidelity"]]
    return [p for p in phases if p]
