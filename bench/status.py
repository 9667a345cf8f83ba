"""``run_bench.py status DIR``: every cell of a results folder as ok / stale / running / pending / requeued /
preempted / cancelled / failed / missing.

The cells a folder should hold are those its runs asked for (``manifest.json``) and those stored in it.
A stored ok cell is stale when the code, torch version or device type that made it differs from this
checkout's (its code fingerprint, bench/fingerprint.py); running is the cell the live run holding the
folder's lock is on, or a cell whose Slurm job is running; pending a cell whose job waits in the queue, requeued
one that waits again after a preemption or a time limit (bench/slurm.py asks squeue). A preempted or cancelled
cell has a checkpoint: a rerun resumes it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from reports.results import CHECKPOINTS, TO_CONTINUE, load_results, lock_holder_alive, read_lock, read_manifest

from .fingerprint import is_current
from .slurm import ACTIVE, queue_states

# a cell's state: its stored status (the failures folded into "failed"), its freshness, or where Slurm has it
STATES = ("ok", "stale", "failed", "missing", "running", "pending", "requeued") + TO_CONTINUE


BASIC = ("ok", "stale", "failed", "missing", "running")  # always counted; the others when they occur


def _restarts(r: dict) -> str:
    n = r.get("restarts")
    return f" (restarts {int(n)})" if isinstance(n, (int, float)) and n == n and n > 0 else ""


def _label(cfg: dict) -> str:
    return f"{cfg.get('method')} {cfg.get('arch')} {cfg.get('dataset')} T={cfg.get('T')} seed={cfg.get('seed', 0)}"


def cell_states(folder: Path) -> pd.DataFrame:
    """One row per cell: key, label, state, detail."""
    folder = Path(folder)
    expected = read_manifest(folder).get("cells") or {}
    stored = load_results(folder, "cells")
    rows: dict[str, dict] = {}
    for key, cfg in expected.items():
        if isinstance(cfg, dict):
            rows[key] = {"key": key, "label": _label(cfg), "state": "missing", "detail": "not run yet"}
    for r in stored.to_dict("records"):
        label = _label(r)
        if r["status"] != "ok":
            first = str(r.get("error") or "").strip().splitlines()
            if r["status"] in TO_CONTINUE:  # a checkpoint stands: a rerun resumes it
                state, detail = r["status"], (first[0][:120] if first else "") + _restarts(r)
            else:
                state, detail = "failed", r["status"] + (f": {first[0][:100]}" if first else "")
            rows[r["key"]] = {"key": r["key"], "label": label, "state": state, "detail": detail}
            continue
        fp = r.get("code_fingerprint")
        if is_current(fp, r.get("device")):
            rows[r["key"]] = {"key": r["key"], "label": label, "state": "ok", "detail": ""}
        else:
            why = "no code fingerprint (an older schema)" if not isinstance(fp, str) else \
                "code, torch version or device type changed since it ran"
            rows[r["key"]] = {"key": r["key"], "label": label, "state": "stale", "detail": why}
    holder = read_lock(folder)
    if lock_holder_alive(holder) and holder.get("cell"):
        now = holder["cell"] if isinstance(holder["cell"], list) else [holder["cell"]]
        for row in rows.values():
            if row["label"] in now and row["state"] != "ok":
                row.update(state="running", detail=f"host {holder.get('host')}, pid {holder.get('pid')}")
    queue = queue_states(folder)
    for key, (job, st) in (queue or {}).items():
        row = rows.get(key)
        if row is None or st not in ACTIVE or row["state"] == "ok":
            continue
        if st == "COMPLETING" and row["state"] != "missing":  # its processes are ending: the row it stored stands
            continue
        if st == "PENDING" or st.startswith("REQUEUE"):
            again = row["state"] in TO_CONTINUE or (folder / CHECKPOINTS / f"{key}.pt").exists()
            row.update(state="requeued" if again else "pending",
                       detail=f"Slurm job {job} {st.lower()}" + (" (resumes from its checkpoint)" if again else ""))
        else:
            row.update(state="running", detail=f"Slurm job {job} {st.lower()}")
    df = pd.DataFrame(list(rows.values()), columns=["key", "label", "state", "detail"])
    df.attrs["scheduler"] = "unreachable" if queue is None else ("slurm" if queue else None)
    order = {s: i for i, s in enumerate(STATES)}
    return df.sort_values(["state", "label"], key=lambda c: c.map(order) if c.name == "state" else c).reset_index(drop=True)


def format_states(df: pd.DataFrame) -> str:
    from tabulate import tabulate

    n = Counter(df["state"])
    head = f"{len(df)} cell(s): " + ", ".join(f"{n.get(s, 0)} {s}" for s in STATES if n.get(s) or s in BASIC)
    if df.attrs.get("scheduler") == "unreachable":
        head += "\n(cells were submitted to Slurm but squeue cannot be asked here: pending and running jobs are not shown)"
    if df.empty:
        return head
    return head + "\n\n" + tabulate(df[["state", "label", "detail", "key"]], headers="keys", tablefmt="simple",
                                    showindex=False)
