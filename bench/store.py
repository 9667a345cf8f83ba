"""Parquet store: one file per cell (plus its epoch rows and memory samples), written atomically.

    results/<grid>/cells/<key>.parquet     one row: config, status, measurements, environment
    results/<grid>/epochs/<key>.parquet    one row per epoch (train cells)
    results/<grid>/samples/<key>.parquet   memory samples over time (RSS, NVML)
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

KINDS = ("cells", "epochs", "samples")


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


def _read_folder(folder: Path) -> pd.DataFrame:
    frames = []
    for p in sorted(folder.glob("*.parquet")):
        try:
            frames.append(pd.read_parquet(p))
        except Exception as e:  # a truncated or foreign file: skip it, say so
            msg = f"skipping unreadable results file {p}: {type(e).__name__}: {e}"
            log.warning(msg)
            warnings.warn(msg, stacklevel=3)
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def load_results(path: str | Path, kind: str = "cells") -> pd.DataFrame:
    """One DataFrame of every stored ``kind`` row under ``path`` (a grid folder, or a folder of grid folders)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    path = Path(path)
    folders = [path / kind] if (path / kind).is_dir() else sorted(p / kind for p in path.iterdir() if (p / kind).is_dir()) if path.is_dir() else []
    frames = [f for f in (_read_folder(d) for d in folders) if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def stored_ok_keys(out: Path) -> set[str]:
    df = load_results(out, "cells")
    if df.empty or "status" not in df:
        return set()
    return set(df.loc[df["status"] == "ok", "key"])
