"""Reading a results folder: parquet files only (no torch, no bench)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

KINDS = ("cells", "epochs", "samples")


def _read_folder(folder: Path) -> pd.DataFrame:
    frames = []
    for p in sorted(folder.glob("*.parquet")):
        try:
            frames.append(pd.read_parquet(p))
        except Exception as e:  # a truncated or foreign file: skip it, say so
            msg = f"skipping unreadable results file {p}: {type(e).__name__}: {e}"
            log.warning(msg)
            warnings.warn(msg, stacklevel=3)
    frames = [f.dropna(axis=1, how="all") for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def load_results(path: str | Path, kind: str = "cells") -> pd.DataFrame:
    """One DataFrame of every stored ``kind`` row under ``path`` (a grid folder, or a folder of grid folders).
    A file that cannot be read is skipped with a warning."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    path = Path(path)
    if (path / kind).is_dir():
        folders = [path / kind]
    elif path.is_dir():
        folders = sorted(p / kind for p in path.iterdir() if (p / kind).is_dir())
    else:
        folders = []
    frames = [f for f in (_read_folder(d) for d in folders) if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def method_options_label(row: pd.Series) -> str:
    opts = row.get("method_options")
    try:
        d = json.loads(opts) if isinstance(opts, str) else (opts or {})
    except ValueError:
        d = {}
    return ",".join(f"{k}={v}" for k, v in sorted(d.items()) if v not in (False, None))
