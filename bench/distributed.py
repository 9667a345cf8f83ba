"""A cell on several devices (``devices = N``): N ranks started by PyTorch's launcher, one result.

The cell's worker (bench/worker.py) sees ``devices > 1`` and runs itself again under ``torch.distributed.run``
(``--standalone --nproc-per-node N``): N rank processes, each with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set, NCCL
on GPUs (rank r on ``cuda:r`` of what the worker sees), gloo on CPUs (the worker's CPUs split between them). Every
rank runs the cell (bench/runner.py) on its share of each global batch (``batch_size`` is the global batch, so a
cell means the same training on 1 or N devices) with the model made data parallel by methods/distributed.py; the
test set is split between the ranks and their counts added, so accuracy is over the whole test set, once.

Each rank writes its Result to the folder ``SNNBENCH_RANK_DIR``; the worker, once the launcher is done, makes the
cell's one row (``combine``): step and phase times are the slowest rank's, step by step (every step ends in the
gradient all-reduce, so the ranks keep pace); memory columns are the largest rank's, with ``<column>_sum`` over the
ranks beside them; a rank that failed makes the cell fail with its error (out of memory over error over preempted).
Only rank 0 writes checkpoints; every rank reads them, and a stop request (or a checkpoint falling due) is agreed
on by an all-reduce at each step boundary, so all ranks stop at the same step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

RANK_DIR_ENV = "SNNBENCH_RANK_DIR"
# memory columns that are per rank: the row keeps the largest rank's, and the sum over the ranks as <name>_sum
PER_RANK_MEMORY = ("peak_alloc_mib", "peak_reserved_mib", "peak_nvml_mib", "peak_rss_mib", "footprint_mib")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Ranks | None:
    """This process's place in a multi-device cell, or None outside one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "LOCAL_RANK" not in os.environ or RANK_DIR_ENV not in os.environ:
        return None
    return Ranks(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))


def init(ranks: Ranks, device_type: str) -> torch.device:
    """Join the process group: NCCL on GPUs (this rank's GPU), gloo on CPUs (this rank's share of the threads)."""
    import torch.distributed as dist

    from .data import available_cpus

    if device_type == "cuda":
        if torch.cuda.device_count() < ranks.world:
            raise RuntimeError(f"a cell on {ranks.world} devices needs {ranks.world} GPUs; this worker sees "
                               f"{torch.cuda.device_count()}")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, available_cpus() // ranks.world))
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on any (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank_file(rank: int) -> str:
    return os.path.join(os.environ[RANK_DIR_ENV], f"rank{rank}.pt")


def combine(results: list, world: int):
    """The cell's Result from its ranks' (bench.runner.Result, or None for a rank that left none)."""
    from reports.results import STATUSES, summarise

    from .rows import Result

    present = [(i, r) for i, r in enumerate(results) if r is not None]
    missing = [i for i, r in enumerate(results) if r is None]
    if not present:
        raise RuntimeError(f"none of the {world} ranks left a result")
    failed = [(i, r) for i, r in present if r.row["status"] != "ok"]
    if missing and not failed:
        raise RuntimeError(f"rank(s) {', '.join(map(str, missing))} of {world} ended without a result")
    if failed:  # the cell fails as its worst rank; the others were stopped, or stopped with it
        worst = min((r.row["status"] for _, r in failed), key=STATUSES.index)  # the worst
        row = dict(present[0][1].row)
        errors = [f"rank {i}: {r.row.get('error') or worst}" for i, r in failed if r.row["status"] == worst]
        if missing:
            errors.append(f"rank(s) {', '.join(map(str, missing))}: stopped by the launcher when a rank failed")
        row.update(status=worst, error="\n".join(errors), devices=world)
        return Result(row)  # a preempted cell's row says where; its checkpoint holds the rest
    main = results[0]
    row = dict(main.row)
    series = {}
    for name in main.series:
        runs = [r.series.get(name) or [] for r in results]
        n = min(len(s) for s in runs)
        series[name] = [max(s[i] for s in runs) for i in range(n)]  # each step: the slowest rank
    if series:
        row.update(summarise(series))
        ms = series.get("step_ms") or []
        if ms:
            row["throughput_samples_per_s"] = row["batch_size"] * len(ms) / (sum(ms) / 1e3)
    for col in PER_RANK_MEMORY:
        vals = [r.row.get(col) for r in results]
        if all(v is not None for v in vals):
            row[col], row[f"{col}_sum"] = max(vals), sum(vals)
    row["devices"] = world
    return Result(row, main.epochs, main.samples, series, main.details)
