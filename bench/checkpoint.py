"""A train cell's checkpoint: everything needed to continue it exactly where it stopped.

``<results>/checkpoints/<key>.pt`` holds the model, the optimizer, the LR schedule, every RNG (python, numpy, torch
CPU and CUDA), the position in the epoch (epoch, next batch: the loaders rebuild the epoch's permutation from
the seed and the epoch, see bench/data.py), the step measurements and epoch rows so far and the resources spent
by earlier attempts (wall time, peak memory, CPU contention, memory samples). It is written atomically (a
temporary file, fsync, rename): a kill while writing leaves the previous checkpoint. It is removed when the cell
ends ok; the weights at the epochs a grid names in ``save_weights_at`` are kept in
``<results>/weights/<key>/epoch_<n>.pt``.

Every value is a tensor, number, string, list or dict, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from reports.results import CHECKPOINTS, write_atomic

WEIGHTS = "weights"
FORMAT = 1


def rng_state(device: torch.device) -> dict:
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


def weights_path(out: Path, key: str, epoch: int) -> Path:
    """Where a cell keeps its weights after ``epoch`` (``save_weights_at``); fidelity cells read them there."""
    return Path(out) / WEIGHTS / key / f"epoch_{epoch}.pt"


class CellCheckpoint:
    """The checkpoint file of one cell in a results folder."""

    def __init__(self, out: Path, key: str, writer: bool = True) -> None:
        self.out, self.key = Path(out), key
        self.writer = writer  # False: reads only (the ranks of a multi-device cell but rank 0)
        self.path = self.out / CHECKPOINTS / f"{key}.pt"
        self.write_s: list[float] = []  # the time each save took
        self.size_bytes: int | None = None  # of the last save

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT or state.get("key") != self.key:
            return None  # another layout, or another cell's file: start afresh rather than resume wrongly
        return state

    def save(self, state: dict) -> None:
        if not self.writer:
            return
        t0 = time.perf_counter()
        write_atomic(self.path, lambda f: torch.save({**state, "format": FORMAT, "key": self.key}, f))
        self.write_s.append(time.perf_counter() - t0)
        self.size_bytes = self.path.stat().st_size

    def remove(self) -> None:
        if self.writer:
            self.path.unlink(missing_ok=True)

    def save_weights(self, epoch: int, model: torch.nn.Module) -> Path | None:
        if not self.writer:
            return None
        path = weights_path(self.out, self.key, epoch)
        write_atomic(path, lambda f: torch.save(model.state_dict(), f))
        return path

    def remove_weights(self) -> None:
        shutil.rmtree(self.out / WEIGHTS / self.key, ignore_errors=True)
