"""A plan's probe: one step configuration measured for a few steps, in a worker as a cell's
(``python -m bench.plan_probe --cell JSON --requested-at T``; the last stdout line is the measurement as JSON).

It goes through what a cell goes through, in the same order and with the runner's own pieces (``Meters``,
``StepMeasure``, ``evaluate``, ``CellCheckpoint``, ``store_result``), but briefly: the parts of the cell's set-up
once, its warm-up steps and memory step, then training steps until ``--timed-s`` seconds of them (at least
``--min-steps``), one evaluation batch cold, warm and with the last epoch's analyses, two checkpoints, and the
storing of a row. ``--memory-only`` stops at the memory reading after ``--min-steps`` timed steps: the plan runs
that at half the batch in a worker of its own, so the two points of the peak memory's line in the batch size are
read at the same point of two fresh processes (on a CPU the resident high-water mark only grows, and a process's
earlier steps leave their heap behind). The data is the dataset's own where it ships in memory (digits), else random input of its shape
(``synthetic:<name>``), so no dataset file is needed. bench/plan.py turns these figures into a cell's prediction.
"""

from __future__ import annotations

import sys

from .stop import STOP

STOP.install()  # as a worker: a stop signal during start-up is a request, not a kill

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def _peak_memory(device) -> float:
    """The peak of the cell's memory column since the last ``_reset_peak``: the CUDA allocator's, or the process's
    resident high-water mark (VmHWM); bytes."""
    import torch

    from .profile import peak_rss_bytes, vm_hwm_bytes

    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(vm_hwm_bytes() or peak_rss_bytes())


def _reset_peak(device) -> None:
    """Start a new stretch of ``_peak_memory``: the allocator's peak statistics, or the resident high-water mark
    (/proc/self/clear_refs; where the kernel offers no reset, the stretches run together, which only raises them)."""
    import torch

    from .profile import reset_rss_peak

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    reset_rss_peak()


def probe(cell, timed_s: float, min_steps: int, max_steps: int = 200, requested_at: float | None = None,
          memory_only: bool = False) -> dict:
    """The measurements of one step configuration (``cell``: any cell of it). Never raises: a failure is
    ``{"status": "oom" | "error", "error": ...}`` with what was measured before it.

    ``memory_reading``: [batch, the peak memory column] after ``min_steps`` timed steps, a point of the memory's
    line in the batch size that a probe of another batch size reads at the same point; ``memory_only`` stops there."""
    t_start = time.perf_counter()
    started_at = time.time()
    import torch

    from .checkpoint import CellCheckpoint
    from .fidelity import stored_cells
    from .plan import PROBE_WARMUP
    from .data import dataset_info, get_loaders, synthetic
    from .energy import Span, pick
    from .rows import PartClock, Result, store_result
    from .runner import (Meters, StepMeasure, _first_row, _set_up_device, _timed, build_model, evaluate,
                         failure_status, make_optimizer, make_schedule)

    clock = PartClock()
    got: dict = {"status": "ok", "start_s": started_at - requested_at if requested_at is not None else None}
    with clock.part("device"):
        device, failed = _set_up_device(cell, None)
    if failed:
        return {**got, "status": "error", "error": failed}
    with clock.part("meters"):
        meters = Meters(device, energy=True)
    with clock.part("device"):
        row = _first_row(cell, device, meters, 1)
    B = max(cell.batch_size // max(cell.devices, 1), 1)  # a rank's batch: a multi-device cell is probed on one device
    try:
        with clock.part("meters"):
            meters.rss.start()
            meters.start(row)
        torch.manual_seed(cell.seed)
        with clock.part("data"):
            info = dataset_info(cell.dataset)
        with clock.part("model"):
            method, model = build_model(cell, info, device)
            opt = make_optimizer(cell, model)
            make_schedule(cell, opt, cell.epochs)
        with clock.part("data"):
            name = cell.dataset if info.arrays is not None else f"synthetic:{cell.dataset}"
            train, test = get_loaders(name, B, cell.eval_batch_size, cell.seed, str(device), None, cell.train_subset,
                                      cell.T, method.event_encoding)
            if test is None:
                xe, ye = synthetic(name, cell.eval_batch_size, cell.seed + 1, cell.T)
                eval_batch = [(xe.to(device), ye.to(device))]
            else:
                eval_batch = [next(iter(test.batches(0)))]
        model.train()
        batches = train.batches(0)
        first = next(batches)
        # a cell's steps: its warm-up steps and memory step, the first evaluation (cold), then the steps that follow
        # one, as most of a cell's do, then evaluations warm. An evaluation can leave a process faster: freeing its
        # large buffers raises glibc's mmap and trim thresholds, after which steps stop handing memory back to the
        # system and faulting it in again (hm2bp on digits: 22 ms a step before, 14 after; 13 from the first with
        # MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ fixed high)
        measure = StepMeasure(method, model, opt, device, PROBE_WARMUP, B, clock)
        span = None
        peaks: dict[str, float] = {}  # the memory's peak by stretch: start, first evaluation, training, evaluation
        steps = _timed(_cycle(train, batches, first))
        while True:
            if measure.steps == measure.warmup + 1 and "start" not in peaks:
                peaks["start"] = _peak_memory(device)  # set-up, warm-up and memory steps: the batch's own
                _reset_peak(device)
                with clock.part("eval"):
                    t0 = time.perf_counter()
                    evaluate(method, model, eval_batch, device, None)
                    got["eval_cold_s"] = time.perf_counter() - t0
                peaks["eval_cold"] = _peak_memory(device)
                _reset_peak(device)
                if meters.window.energy is not None:
                    span = Span(meters.window.energy)
            wait_ms, (x, y) = next(steps)
            measure.step(x, y, wait_ms)
            timed = measure.step_ms
            if len(timed) == min_steps:
                got["memory_reading"] = [B, _peak_memory(device)]
                if memory_only:
                    break
            if len(timed) >= max_steps or (len(timed) >= min_steps and sum(timed) >= timed_s * 1e3):
                break
            if STOP.requested:
                raise RuntimeError(f"stopped by {STOP.name}")
        if memory_only:
            return {**got, "parts": dict(clock.seconds)}
        columns = measure.columns()
        if span is not None:
            joules = pick(meters.window.energy, span.end())
            got["energy_per_step_j"] = joules / len(measure.step_ms) if joules is not None else None
        peaks["train"] = _peak_memory(device)
        got.update(step_ms=list(measure.step_ms), data_wait_ms=list(measure.wait_ms), saved_bytes=measure.saved_bytes)
        # evaluation: one batch of eval_batch_size warm, and with the last epoch's analyses
        _reset_peak(device)
        with clock.part("eval"):
            for key, analyses in (("eval_batch_s", False), ("analyses_batch_s", True)):
                t0 = time.perf_counter()
                evaluate(method, model, eval_batch, device, None, analyses=analyses)
                got[key] = time.perf_counter() - t0
        peaks["eval"] = _peak_memory(device)
        got["peaks"] = peaks
        # two checkpoints (model, optimizer, schedule, RNGs) as a train cell writes at each epoch's end
        with tempfile.TemporaryDirectory(prefix="snnbench-probe-") as tmp:
            ckpt = CellCheckpoint(Path(tmp), cell.key)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                with clock.part("checkpoint"):
                    ckpt.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1,
                               "measure": measure.state()})
                times.append(time.perf_counter() - t0)
            got["checkpoint_s"] = times[-1]
            with clock.part("meters"):
                meters.stop()
                meters.columns(row, [])
            row.update(columns)
            row["cell_wall_s"] = time.perf_counter() - t_start
            t0 = time.perf_counter()
            store_result(Path(tmp), cell, Result(row, [{"epoch": 1, "train_loss": 0.0, "test_acc": 0.0,
                                                        "epoch_time_s": 0.0, "lr": 0.0, "firing_rate_mean": None,
                                                        "steps": 1, "energy_j": None}], meters.samples()))
            got["store_s"] = time.perf_counter() - t0
            # a fidelity cell's search for trained weights: every stored row read (the first read in a process
            # also pays for its start), then each weights file loaded
            for key in ("lookup_first_s", "lookup_row_s"):
                t0 = time.perf_counter()
                stored_cells(Path(tmp))
                got[key] = time.perf_counter() - t0
            weights = Path(tmp) / "weights.pt"
            torch.save(model.state_dict(), weights)
            t0 = time.perf_counter()
            torch.load(weights, map_location=device, weights_only=True)
            got["weights_load_s"] = time.perf_counter() - t0
    except Exception as e:
        got.update(failure_status(e))
        try:
            meters.stop()
        except Exception:  # pragma: no cover - the failure is what the probe reports
            pass
    got["parts"] = dict(clock.seconds)
    got["device_type"] = device.type
    return got


def _cycle(train, batches, first):
    """The training batches from the one already drawn on, epoch after epoch."""
    yield first
    yield from batches
    epoch = 1
    while True:
        yield from train.batches(epoch)
        epoch += 1


def main(argv=None) -> int:
    from .cell import Cell
    from .plan import MIN_STEPS, PROBE_PREFIX, TIMED_S

    p = argparse.ArgumentParser()
    p.add_argument("--cell", required=True)
    p.add_argument("--timed-s", type=float, default=TIMED_S)
    p.add_argument("--min-steps", type=int, default=MIN_STEPS)
    p.add_argument("--requested-at", type=float)
    p.add_argument("--memory-only", action="store_true", help="stop at the memory reading after --min-steps timed steps")
    a = p.parse_args(argv)
    got = probe(Cell(**json.loads(a.cell)), a.timed_s, a.min_steps, requested_at=a.requested_at,
                memory_only=a.memory_only)
    if got.get("error"):
        print(got["error"], file=sys.stderr)
    print(PROBE_PREFIX + json.dumps(got), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
