"""Parquet store: one file per cell (plus its epoch rows and memory samples), written atomically.

    results/<grid>/cells/<key>.parquet     one row: config, status, measurements, environment
    results/<grid>/epochs/<key>.parquet    one row per epoch (train cells)
    results/<grid>/samples/<key>.parquet   memory samples over time (RSS, NVML)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from reports.io import KINDS, load_results  # one reader for bench and reports (reports imports neither)

__all__ = ["KINDS", "atomic_write_parquet", "load_results", "stored_ok_keys", "write_cell"]


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            df.to_parquet(f, index=False)
            f.flush()
            os.fsync(f.fileno())
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


def write_cell(out: Path, key: str, row: dict, epochs: list[dict] | None = None, samples: list[dict] | None = None) -> None:
    """Store a cell. Epochs and samples first, the cell row last: a cell row marks a complete cell."""
    out = Path(out)
    if epochs:
        atomic_write_parquet(pd.DataFrame(epochs).assign(key=key), out / "epochs" / f"{key}.parquet")
    if samples:
        atomic_write_parquet(pd.DataFrame(samples).assign(key=key), out / "samples" / f"{key}.parquet")
    atomic_write_parquet(pd.DataFrame([row]), out / "cells" / f"{key}.parquet")


def stored_ok_keys(out: Path) -> set[str]:
    df = load_results(out, "cells")
    if df.empty or "status" not in df:
        return set()
    return set(df.loc[df["status"] == "ok", "key"])
