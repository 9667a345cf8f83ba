"""Trains (or profiles) one Cell and returns its Result: the cell row, epoch rows and memory samples."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import traceback
from typing import NamedTuple

import numpy as np
import torch

from methods import METHODS, MethodConfig
from methods.distributed import data_parallel
from methods.layers import LIF, count_parameters, set_backend, set_precision

from reports.results import PHASES, summarise

from .cell import LAST_EPOCH, Cell
from .checkpoint import CellCheckpoint, rng_state, set_rng_state
from .data import dataset_info, get_loaders
from .distributed import Ranks, agree, all_sum
from .distributed import init as init_ranks
from .energy import EnergyMeter, Span, energy_meter, pick
from .env import environment
from .fidelity import WeightsMissing, run_fidelity
from .ops import OpCounter
from .ops import totals as op_totals
from .profile import (MIB, CpuContention, NvmlProcessSampler, RssFootprint, Sampler, SavedTensorsMeter, TimingProbe,
                      nvml_device, rss_reader, sync)
from .rows import PartClock, Progress, Result, base_row, failure_row
from .stop import STOP

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 0.005  # NVML sampling period, in its own process (a reading every 5-6 ms)
RSS_INTERVAL_S = 0.05  # RSS series for the memory-over-time figure; the peak comes from the kernel (ru_maxrss)

def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cell: Cell, info, device: torch.device):
    """(the cell's method, its model on ``device`` with the cell's backend and precision); ``info``: the dataset's
    DatasetInfo."""
    method = METHODS[cell.method](MethodConfig(T=cell.T, neuron=cell.neuron, options=dict(cell.method_options)))
    model = method.build(cell.arch, num_classes=info.num_classes, in_channels=info.shape[0],
                         input_shape=info.shape, **cell.arch_options).to(device)
    set_backend(model, cell.backend)
    set_precision(model, cell.precision, device.type)
    return method, model


def make_optimizer(cell: Cell, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (parameters with more than one dim); BN and biases get 0."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cell.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cell.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cell.lr)
    return torch.optim.SGD(groups, lr=cell.lr, momentum=cell.momentum)


def make_schedule(cell: Cell, opt: torch.optim.Optimizer, n_epochs: int):
    """Per-epoch lr schedule: cosine to 0 over the epochs, invsqrt (lr / sqrt(epoch + 1), HM2-BP's), or none."""
    if not n_epochs or cell.schedule == "constant":
        return None
    if cell.schedule == "invsqrt":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / math.sqrt(epoch + 1))
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_epochs, 1))


class _FiringRate:
    """Spike rates of the LIF layers during evaluation (forward hooks, no host sync per batch): per layer, the mean
    over its calls of the mean of its output; over all layers, the mean over every layer call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LIF)]
        self.sums: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]
        self.counting = True  # False: forward passes that are not the evaluation proper (_not_counted)

    def _hook(self, i: int):
        def hook(module, inputs, output) -> None:
            if self.counting:
                self.sums[i].append(output.detach().float().mean())
        return hook

    def close(self) -> tuple[float | None, int]:
        """(the mean rate, how many layer calls it averages)."""
        for h in self.handles:
            h.remove()
        calls = [s for layer in self.sums for s in layer]
        return (float(torch.stack(calls).mean()) if calls else None), len(calls)

    def per_layer(self) -> list[tuple[str, float, int]]:
        """(module name, sum of the per-call means, calls) for each LIF layer, in the model's order."""
        return [(name, float(torch.stack(s).sum()) if s else 0.0, len(s)) for (name, _), s in zip(self.layers, self.sums)]


@contextlib.contextmanager
def _not_counted(*counters):
    """Forward passes that are not the evaluation proper (shuffled input) leave the counters' hooks alone."""
    for c in counters:
        c.counting = False
    try:
        yield
    finally:
        for c in counters:
            c.counting = True


SHUFFLES = 5  # permutations of the input frames in time for the shuffle analysis (event data)


def evaluate(method, model, loader, device, ranks: Ranks | None = None,
             analyses: bool = False) -> tuple[float, float | None, dict[str, list[dict]]]:
    """Top-1 accuracy (%), mean firing rate and, with ``analyses`` (after the last epoch), the behaviour over time
    steps (details "layers" and "anytime"): each LIF layer's firing rate; the accuracy with the first t = 1..T
    steps (the mean of the per-step outputs, ``Method.infer_steps``); for event data, the accuracy with the frames
    permuted in time, for ``SHUFFLES`` fixed permutations. The ranks of a multi-device cell each evaluate their
    part of the test set and add up their counts."""
    model.eval()
    fr = _FiringRate(model)
    ops = OpCounter(model) if analyses else None
    T = method.T
    perms = [torch.randperm(T, generator=torch.Generator().manual_seed(k)) for k in range(SHUFFLES)]
    correct = torch.zeros((), dtype=torch.long, device=device)
    at_t = torch.zeros(T, dtype=torch.long, device=device)
    shuffled = torch.zeros(SHUFFLES, dtype=torch.long, device=device)
    n, steps_readout, sequence = 0, analyses, False
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if steps_readout:
                try:
                    out = method.infer_steps(model, x)
                except NotImplementedError:
                    steps_readout = False
            if steps_readout:
                correct += (out.mean(0).argmax(1) == y).sum()
                for t in range(T):
                    at_t[t] += (out[: t + 1].mean(0).argmax(1) == y).sum()
            else:
                correct += (method.infer(model, x).argmax(1) == y).sum()
            if analyses and method.is_sequence(model, x):
                sequence = True
                with _not_counted(fr, ops):
                    for k, p in enumerate(perms):
                        shuffled[k] += (method.infer(model, x[p.to(x.device)]).argmax(1) == y).sum()
            n += len(y)
    finally:
        rate, layers = fr.close()
        if ops is not None:
            ops.close()
        model.train()
    per_layer = fr.per_layer()
    counts = [correct.item(), n, (rate or 0.0) * layers, layers] + at_t.tolist() + shuffled.tolist() \
        + [v for _, s, c in per_layer for v in (s, c)] + (ops.counts() if ops is not None else [])
    if ranks is not None:  # rates weighted by the calls each rank made
        counts = all_sum(counts, device)
    hits, n, rate_sum, calls = counts[:4]
    rate = rate_sum / calls if calls else None
    acc = 100.0 * hits / max(n, 1)
    details: dict[str, list[dict]] = {}
    if analyses:
        k = 4 + T + SHUFFLES + 2 * len(per_layer)
        at_t, shuffled, layer_sums = counts[4:4 + T], counts[4 + T:4 + T + SHUFFLES], counts[4 + T + SHUFFLES:k]
        details["ops"] = ops.rows(counts[k:], max(int(n), 1))
        details["layers"] = [{"layer": i, "name": name, "firing_rate": layer_sums[2 * i] / layer_sums[2 * i + 1]}
                             for i, (name, _, _) in enumerate(per_layer) if layer_sums[2 * i + 1]]
        rows = []
        if steps_readout:
            rows += [{"analysis": "anytime", "t": t + 1, "permutation": -1, "order": "", "acc": 100.0 * h / max(n, 1)}
                     for t, h in enumerate(at_t)]
        if sequence:
            rows += [{"analysis": "shuffle", "t": T, "permutation": k, "order": ",".join(map(str, p.tolist())),
                      "acc": 100.0 * h / max(n, 1)} for k, (p, h) in enumerate(zip(perms, shuffled))]
        details["anytime"] = rows
    return acc, rate, details


class Preempted(Exception):
    """A stop request (SIGTERM, SIGUSR1, SIGUSR2) ended the cell at a step boundary, after its checkpoint."""


def run_cell(cell: Cell, data_root: str | None = None, progress: Progress | None = None,
             out: str | os.PathLike | None = None, concurrent: int = 1, ranks: Ranks | None = None,
             requested_at: float | None = None) -> Result:
    """Run one cell; a failure becomes a row with status ``oom`` or ``error``, never an exception.

    With a results folder ``out``, a train cell checkpoints there (bench/checkpoint.py) at every epoch end (but
    the last), every ``checkpoint_minutes``, and when a stop signal arrives (then it ends with status
    ``preempted``); it resumes from that checkpoint when run again, and removes it when it ends ok.
    ``concurrent``: how many cells the launcher runs side by side (recorded; the contention columns say what
    that did to the timings). ``ranks``: this process is one rank of a multi-device cell (bench/distributed.py).
    ``requested_at``: when the launcher asked for this cell's worker (``time.time()``; the row's ``time_start_s``).

    The row says where the cell's time went (``reports.results.TIME_PARTS``, ``PartClock``)."""
    t_cell, started_at = time.perf_counter(), time.time()
    clock = PartClock()
    progress = progress or (lambda d: None)
    if cell.devices > 1 and ranks is None:  # in-process callers (compare's workers, tests) cannot start ranks
        return Result(failure_row(cell, "error", f"a cell on {cell.devices} devices runs through bench/worker.py, "
                                                 "which starts its ranks; this caller runs one process"))
    with clock.part("device"):
        device, failed = _set_up_device(cell, ranks)
    if failed:
        return Result(failure_row(cell, "error", failed))
    with clock.part("meters"):
        meters = Meters(device, energy=cell.kind != "fidelity")
    with clock.part("device"):
        row = _first_row(cell, device, meters, concurrent)
    epochs: list[dict] = []
    series: dict[str, list[float]] = {}
    details: dict[str, list[dict]] = {}
    attempt = Attempt(t_cell, meters.rss, meters.window, CellCheckpoint(out, cell.key, writer=ranks is None or ranks.main)
                      if out is not None and cell.kind == "train" else None, clock)
    try:
        with clock.part("meters"):
            meters.rss.start()
            meters.start(row)
        if cell.kind == "fidelity":
            _seed(cell.seed)  # as a train cell: the same initial weights
            details.update(run_fidelity(cell, device, data_root, row, out, progress, clock))
        else:
            series = _train_or_profile(cell, device, data_root, row, epochs, progress, meters.window, attempt, ranks,
                                       details, clock)
    except Exception as e:
        row.update(failure_status(e))
    finally:
        with clock.part("meters"):
            meters.stop()
    with clock.part("meters"):
        meters.columns(row, epochs)
    t_end = time.perf_counter()
    row["cell_wall_s"] = t_end - t_cell
    with clock.part("meters"):
        samples = attempt.merge_earlier(row, meters.samples())
    with clock.part("checkpoint"):
        _checkpoint_columns(attempt.checkpoint, row)
    if row["status"] == "preempted":  # its checkpoint holds the epochs and samples so far; the row says where
        epochs, samples = [], []
    row["cell_wall_s"] += time.perf_counter() - t_end  # the row's last measurements are the cell's time too
    row.update(attempt.time_columns())
    row["time_start_s"] = started_at - requested_at if requested_at is not None else None
    return Result(row, epochs, samples, series, details)


def _set_up_device(cell: Cell, ranks: Ranks | None) -> tuple[torch.device, str | None]:
    """(the device the cell computes on, None), or (the device, why it cannot be used)."""
    device = torch.device(cell.device)
    try:
        if ranks is not None:
            return init_ranks(ranks, device.type), None
        if device.type == "cuda" and device.index is not None:
            # what names no device goes to the current one: the timing probe's CUDA events (recorded on the
            # current stream) and Triton's launches would be on cuda:0 while a cell on cuda:1 computes on cuda:1
            torch.cuda.set_device(device)
    except Exception as e:
        where = f"rank {ranks.rank} of {ranks.world}: " if ranks is not None else f"device {device}: "
        return device, f"{where}{type(e).__name__}: {e}"
    return device, None


def _first_row(cell: Cell, device: torch.device, meters: "Meters", concurrent: int) -> dict:
    """The row before anything is measured: configuration, environment, the GPU as NVML names it."""
    row = base_row(cell, "ok")
    row.update(environment(device))
    row["gpu_null_reason"] = meters.gpu_reason
    row["concurrent_cells"] = concurrent
    nvml = meters.nvml
    if nvml:
        row.update(gpu_uuid=nvml.uuid, nvml_driver=nvml.driver, mig_mode=nvml.mig_mode,
                   gpu_other_processes=json.dumps(nvml.other_processes), gpu_name=nvml.name)
    return row


def failure_status(e: Exception) -> dict:
    """The status and error of a cell that ended with ``e`` (call it in the ``except`` block: the traceback is the
    one being handled): a stop request is ``preempted``, running out of memory (GPU or host) ``oom``, a missing
    input an ``error`` with its message alone, anything else an ``error`` with the traceback."""
    if isinstance(e, Preempted):
        return {"status": "preempted", "error": str(e)}
    if isinstance(e, WeightsMissing):  # an input the cell needs is not there: the message says which
        return {"status": "error", "error": str(e)}
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return {"status": "oom", "error": f"CUDA out of memory: {str(e).splitlines()[0]}"}
    if isinstance(e, MemoryError):
        return {"status": "oom", "error": f"host out of memory: {e}"}
    if is_host_oom(e):
        return {"status": "oom", "error": f"host out of memory: {str(e).strip().splitlines()[-1]}"}
    return {"status": "error", "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}


def _checkpoint_columns(ckpt: CellCheckpoint | None, row: dict) -> None:
    """What checkpointing cost (mean write time, size); the checkpoint of a cell that ended ok is removed."""
    if ckpt is None:
        return
    if ckpt.write_s:
        row["checkpoint_s"] = sum(ckpt.write_s) / len(ckpt.write_s)
        row["checkpoint_mib"] = ckpt.size_bytes / MIB
    if row["status"] == "ok":
        ckpt.remove()


class Meters:
    """The instruments that run beside a cell, from before its model is built to after its row's last step: the
    RSS sampler, on a GPU the NVML sampler process, the energy meter (idle power first; not for fidelity cells),
    and the window over the training loop (``MeasureWindow``). ``start`` and ``stop`` bracket the cell, whatever
    happens in it; ``columns`` writes what they saw into the row; ``samples`` gives their series."""

    def __init__(self, device: torch.device, energy: bool) -> None:
        self.device, self.energy = device, energy
        self.nvml, self.gpu_reason = nvml_device(device)
        self.nvml_sampler = NvmlProcessSampler(self.nvml.uuid, SAMPLE_INTERVAL_S) if self.nvml else None
        self.rss = Sampler(rss_reader(), RSS_INTERVAL_S, baseline=0)
        self.window = MeasureWindow(self.nvml, self.nvml_sampler)

    def start(self, row: dict) -> None:
        if self.nvml_sampler:  # its first reading, before this process allocates on the GPU, is the baseline
            try:
                self.nvml_sampler.start()
            except RuntimeError as e:
                row["gpu_null_reason"] = f"NVML sampler: {e}"
                self.nvml_sampler = None
        if self.energy:  # the sampler process reads the energy where it runs; idle power first
            self.window.energy, row["energy_null_reason"] = energy_meter(self.device, self.nvml, sampler=self.nvml_sampler)
            if self.window.energy is not None:
                self.window.energy.start()

    def stop(self) -> None:
        self.rss.stop()
        if self.nvml_sampler:
            self.nvml_sampler.stop()
        if self.window.energy is not None:
            self.window.energy.stop()

    def columns(self, row: dict, epochs: list[dict]) -> None:
        window = self.window
        energy_columns(window.energy, row, epochs, window.profile_energy)
        footprint, peak_rss = window.footprint.stop()
        row["peak_rss_mib"] = peak_rss / MIB
        row["footprint_mib"] = footprint / MIB if footprint is not None else None
        if footprint is None and window.footprint.start_rss is not None:
            row["footprint_null_reason"] = "the kernel offers no reset of the resident high-water mark (/proc/self/clear_refs)"
        sampler = self.nvml_sampler
        if sampler and sampler.peak is not None:
            row["peak_nvml_mib"] = sampler.peak_above_baseline / MIB
            row["nvml_baseline_mib"] = sampler.baseline / MIB
            proc = self.nvml.process_used_bytes(os.getpid())
            row["peak_nvml_process_mib"] = proc / MIB if proc is not None else None

    def samples(self) -> list[dict]:
        """RSS, GPU memory (above the sampler's baseline) and power over the cell, on the RSS sampler's clock."""
        samples = [{"source": "rss", "t_s": t, "mib": v / MIB} for t, v in self.rss.samples]
        if self.nvml_sampler:
            base = self.nvml_sampler.baseline
            samples += [{"source": "nvml", "t_s": t, "mib": (v - base) / MIB} for t, v in self.nvml_sampler.samples]
        if self.window.energy is not None:  # watts; the energy meter's clock is perf_counter too
            samples += [{"source": "power", "t_s": t - self.rss.started_at, "w": w} for t, w in self.window.energy.trace()]
        return samples


class Attempt:
    """One run of a cell in one process, and what earlier attempts of it (before a kill, a preemption or a
    requeue) left in its checkpoint: their wall time, peak memory, CPU contention and memory samples, which
    the final row adds up. Timings (step and epoch times) are the steps'; the gaps between attempts are in no
    column but ``cell_wall_s`` (which counts only time spent in attempts)."""

    def __init__(self, t0: float, rss: Sampler, window: "MeasureWindow", checkpoint: CellCheckpoint | None,
                 clock: PartClock | None = None) -> None:
        self.t0, self.rss, self.window, self.checkpoint = t0, rss, window, checkpoint
        self.clock = clock or PartClock()
        self.earlier: dict | None = None  # the resources of the attempts before this one
        self.restarts = 0
        self.resumed_at: list[dict] = []

    def resumed(self, state: dict) -> None:
        self.earlier = state["attempts"]
        self.restarts = state["restarts"] + 1
        self.resumed_at = state["resumed_at"] + [{"epoch": state["epoch"], "batch": state["batch"]}]

    def _this(self, wall_s: float, peak_rss: float, footprint: float | None, contention: dict) -> dict:
        """This attempt's resources in the checkpoint's form (bytes; RSS samples as a [n, 2] tensor)."""
        return {"wall_s": wall_s, "peak_rss": float(peak_rss), "footprint": None if footprint is None else float(footprint),
                "contention": contention, "parts": dict(self.clock.seconds),
                "rss_samples": torch.tensor(list(self.rss.samples), dtype=torch.float64).reshape(-1, 2)}

    def so_far(self) -> dict:
        """The resources of this attempt and the earlier ones up to now, for a checkpoint."""
        footprint, peak = self.window.footprint.peek()
        return _add_attempts(self.earlier, self._this(time.perf_counter() - self.t0, peak, footprint,
                                                      self.window.cpu.peek()))

    def time_columns(self) -> dict[str, float]:
        """Where the cell's time went (``time_<part>_s``), this attempt's and the earlier ones' added up."""
        earlier = (self.earlier or {}).get("parts") or {}
        return {f"time_{part}_s": s + earlier.get(part, 0.0) for part, s in self.clock.seconds.items()}

    def merge_earlier(self, row: dict, samples: list[dict]) -> list[dict]:
        """Fold the earlier attempts into this attempt's row and samples (by ``_add_attempts``, as a checkpoint
        does); returns the samples."""
        row["restarts"] = self.restarts
        row["resumed_at"] = json.dumps(self.resumed_at) if self.resumed_at else None
        e = self.earlier
        if not e:
            return samples
        fp = row.get("footprint_mib")
        total = _add_attempts(e, self._this(row["cell_wall_s"], row["peak_rss_mib"] * MIB,
                                            None if fp is None else fp * MIB, {k: row.get(k) for k in _CONTENTION}))
        row.update(cell_wall_s=total["wall_s"], peak_rss_mib=total["peak_rss"] / MIB, **total["contention"])
        if fp is not None and total["footprint"] is not None:  # none measured in this attempt: none stated
            row["footprint_mib"] = total["footprint"] / MIB
        rss = [{"source": "rss", "t_s": t, "mib": v / MIB} for t, v in total["rss_samples"].tolist()]
        return rss + [{**s, "t_s": s["t_s"] + e["wall_s"]} for s in samples if s["source"] != "rss"]


_CONTENTION = ("contention_cpu_s", "contention_cpu_frac", "contention_window_s")


def _add_contention(a: dict, b: dict) -> dict:
    """The contention over two windows: CPU seconds and window lengths add, the share is their weighted mean."""
    if not a or a.get("contention_window_s") is None:
        return b
    if not b or b.get("contention_window_s") is None:
        return a
    wa, wb = a["contention_window_s"], b["contention_window_s"]
    out = {"contention_window_s": wa + wb}
    if a.get("contention_cpu_s") is None or b.get("contention_cpu_s") is None:
        return {**out, "contention_cpu_s": None, "contention_cpu_frac": None}
    out["contention_cpu_s"] = a["contention_cpu_s"] + b["contention_cpu_s"]
    out["contention_cpu_frac"] = (a["contention_cpu_frac"] * wa + b["contention_cpu_frac"] * wb) / max(wa + wb, 1e-12)
    return out


def _add_attempts(earlier: dict | None, now: dict) -> dict:
    """Two stretches of a cell's resources as one: wall times add, peaks take the larger, contention adds
    (``_add_contention``), the later RSS samples follow the earlier ones in time."""
    if not earlier:
        return now
    shifted = now["rss_samples"].clone()
    shifted[:, 0] += earlier["wall_s"]
    fp = [f for f in (earlier["footprint"], now["footprint"]) if f is not None]
    parts = {k: earlier.get("parts", {}).get(k, 0.0) + now["parts"].get(k, 0.0) for k in now["parts"]}
    return {"wall_s": earlier["wall_s"] + now["wall_s"], "peak_rss": max(earlier["peak_rss"], now["peak_rss"]),
            "footprint": max(fp) if fp else None, "contention": _add_contention(earlier["contention"], now["contention"]),
            "parts": parts, "rss_samples": torch.cat([earlier["rss_samples"], shifted])}


def is_host_oom(e: BaseException) -> bool:
    """torch's CPU allocator reports a failed allocation as a RuntimeError ("DefaultCPUAllocator: can't allocate
    memory: you tried to allocate ...")."""
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "Cannot allocate memory" in str(e))


class MeasureWindow:
    """What is measured over the training loop as a whole: the memory it adds to the process (footprint) and how
    much CPU, and which GPU processes, other than this cell's were busy meanwhile (contention)."""

    def __init__(self, nvml, nvml_sampler) -> None:
        self.nvml = nvml
        self.footprint = RssFootprint()
        self.cpu = CpuContention(helper_cpu=nvml_sampler.cpu_seconds if nvml_sampler else (lambda: 0.0))
        self.gpu_pids: set[int] = set()
        self.energy: EnergyMeter | None = None  # bench/energy.py; None where nothing can be read
        self.profile_energy: dict | None = None  # a profile cell's energy over its timed steps (Span.end())

    def start(self) -> None:
        self.footprint.start()
        self.cpu.start()
        if self.nvml:
            self.gpu_pids.update(self.nvml.other_pids())

    def stop(self, row: dict) -> None:
        row.update(self.cpu.stop())
        if self.nvml:
            self.gpu_pids.update(self.nvml.other_pids())
            row["contention_gpu_processes"] = len(self.gpu_pids)


class StepMeasure:
    """Runs a method's training steps and measures them: the first ``warmup`` steps are neither timed nor
    measured, the next one measures the bytes saved for backward and the per-phase allocator peaks (its time is
    not counted), every later one is timed, whole and per phase. ``columns()`` gives the row's figures."""

    def __init__(self, method, model, optimizer, device: torch.device, warmup: int, batch_size: int,
                 clock: PartClock | None = None) -> None:
        self.method, self.model, self.optimizer, self.device = method, model, optimizer, device
        self.clock = clock or PartClock()  # each step's wall time goes to "warmup", "meters" (the memory step) or "steps"
        self.warmup, self.batch_size = warmup, batch_size
        self.probe = TimingProbe(device)
        self.params = list(model.parameters())
        self.steps = 0
        self.step_ms: list[float] = []
        self.phase_ms: dict[str, list[float]] = {}
        self.saved_bytes: int | None = None
        self.saved_parts: list[dict] = []  # the saved bytes at their peak by module and kind of tensor (details "saved")
        self.wait_ms: list[float] = []  # per timed step, the time it waited for its batch (train cells)
        self.rewarm = 0  # steps still to leave out of the timings after a resume (a fresh process warms up again)

    def state(self) -> dict:
        p = self.probe
        return {"steps": self.steps, "step_ms": list(self.step_ms), "wait_ms": list(self.wait_ms),
                "phase_ms": {k: list(v) for k, v in self.phase_ms.items()},
                "saved_bytes": self.saved_bytes, "saved_parts": [dict(p) for p in self.saved_parts],
                "phase_peak_alloc": dict(p.phase_peak_alloc),
                "phase_peak_reserved": dict(p.phase_peak_reserved)}

    def load_state(self, s: dict) -> None:
        self.steps, self.saved_bytes = s["steps"], s["saved_bytes"]
        self.saved_parts = [dict(p) for p in s.get("saved_parts", [])]
        self.step_ms, self.wait_ms = list(s["step_ms"]), list(s["wait_ms"])
        self.phase_ms = {k: list(v) for k, v in s["phase_ms"].items()}
        self.probe.phase_peak_alloc.update(s["phase_peak_alloc"])
        self.probe.phase_peak_reserved.update(s["phase_peak_reserved"])
        self.rewarm = self.warmup

    def step(self, x: torch.Tensor, y: torch.Tensor, wait_ms: float | None = None) -> torch.Tensor:
        """One training step on (x, y); ``wait_ms``: how long the loop waited for this batch (recorded with the
        step's time when the step is timed)."""
        t_step = time.perf_counter()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        part = "warmup"
        if self.steps == self.warmup:
            out = self._memory_step(x, y)
            part = "meters"
        else:
            t0 = time.perf_counter()
            out = self.method.train_step(self.model, x, y, self.optimizer, self.probe)
            phases = self.probe.end_step()
            dt = (time.perf_counter() - t0) * 1e3
            if self.rewarm > 0:
                self.rewarm -= 1
            elif self.steps > self.warmup:
                part = "steps"
                self.step_ms.append(dt)
                if wait_ms is not None:
                    self.wait_ms.append(wait_ms)
                for k, v in phases.items():
                    self.phase_ms.setdefault(k, []).append(v)
        self.steps += 1
        self.clock.add(part, time.perf_counter() - t_step)
        return out.loss

    def _memory_step(self, x, y):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.probe.memory = True
        with SavedTensorsMeter(exclude=self.params, model=self.model) as meter:
            out = self.method.train_step(self.model, x, y, self.optimizer, self.probe)
        self.probe.discard()
        self.probe.memory = False
        self.saved_bytes = meter.peak_bytes
        self.saved_parts = meter.breakdown()
        return out

    def series(self) -> dict[str, list[float]]:
        """The measured steps' times, in order: the whole step and each phase."""
        out = {"step_ms": list(self.step_ms),
               **{f"{ph}_ms": list(self.phase_ms.get(ph, [])) for ph in PHASES}}
        if self.wait_ms:
            out["data_wait_ms"] = list(self.wait_ms)
        return out

    def columns(self) -> dict:
        ms = self.step_ms
        row = {"measured_steps": len(ms), **summarise(self.series())}
        if ms:
            row["throughput_samples_per_s"] = self.batch_size * len(ms) / (sum(ms) / 1e3)
        row["saved_for_backward_mib"] = self.saved_bytes / MIB if self.saved_bytes is not None else None
        if self.device.type == "cuda":
            p, d = self.probe, self.device
            row["peak_alloc_mib"] = max([torch.cuda.max_memory_allocated(d)] + list(p.phase_peak_alloc.values())) / MIB
            row["peak_reserved_mib"] = max([torch.cuda.max_memory_reserved(d)] + list(p.phase_peak_reserved.values())) / MIB
            for ph, b in p.phase_peak_alloc.items():
                row[f"{ph}_peak_alloc_mib"] = b / MIB
        return row


def energy_columns(meter: EnergyMeter | None, row: dict, epochs: list[dict], prof: dict | None = None) -> None:
    """The row's energy columns and each epoch's ``energy_j``, from the source the meter settled on (the counter if
    it advanced, else integrated power); null with ``energy_null_reason`` where nothing was read."""
    for e in epochs:  # both sources were kept per epoch; the rows keep the chosen one
        both = {"counter": e.pop("energy_counter_j", None), "power": e.pop("energy_power_j", None)}
        e["energy_j"] = pick(meter, both) if meter is not None else None
    if meter is None:
        return
    row["energy_source"], row["idle_power_w"] = meter.source, meter.idle_power_w
    spent = [(e["energy_j"], e["epoch_time_s"], e["steps"]) for e in epochs if e.get("energy_j") is not None]
    if spent:
        joules, seconds, steps = (sum(x) for x in zip(*spent))
        row.update(energy_epoch_j=joules / len(spent), energy_per_step_j=joules / max(steps, 1),
                   power_mean_w=joules / seconds if seconds > 0 else None)
        if meter.idle_power_w is not None:  # what training added to what the device draws doing nothing
            row["energy_above_idle_per_step_j"] = (joules - meter.idle_power_w * seconds) / max(steps, 1)
    elif prof:
        joules = pick(meter, prof)
        if joules is not None:
            row["energy_per_step_j"] = joules / max(prof["steps"], 1)
    if row.get("energy_per_step_j") is None and row.get("energy_null_reason") is None:
        row["energy_null_reason"] = f"{meter.source or 'the meter'} gave no reading over the training steps"


def stop_requested(ranks: Ranks | None, device: torch.device, due: bool = False) -> tuple[bool, bool]:
    """(a stop was requested, a checkpoint is due): on every rank of a multi-device cell alike."""
    if ranks is None:
        return STOP.requested, due
    stop, due = agree([STOP.requested, due], device)
    return stop, due


def _stopped_by() -> str:
    return STOP.name or "a stop request to another rank"


def _train_or_profile(cell: Cell, device: torch.device, data_root, row: dict, epochs: list[dict], progress: Progress,
                      window: MeasureWindow, attempt: Attempt | None = None, ranks: Ranks | None = None,
                      details: dict | None = None, clock: PartClock | None = None) -> dict[str, list[float]]:
    clock = clock or PartClock()
    _seed(cell.seed)  # every rank alike: the same draws where a method draws (sltt_k's steps)
    with clock.part("data"):
        info = dataset_info(cell.dataset)
    with clock.part("model"):
        method, model = build_model(cell, info, device)
        row["num_params"] = count_parameters(model)
        opt = make_optimizer(cell, model)
        if ranks is not None:
            if method.data_parallel is not None:
                raise ValueError(f"{cell.method} cannot run on several devices: {method.data_parallel}")
            data_parallel(model, opt)
        n_epochs = cell.epochs if cell.kind == "train" else 0
        sched = make_schedule(cell, opt, n_epochs)
    with clock.part("data"):
        train, test = get_loaders(cell.dataset, cell.batch_size, cell.eval_batch_size, cell.seed, str(device),
                                  data_root, cell.train_subset, cell.T, method.event_encoding,
                                  shard=(ranks.rank, ranks.world) if ranks is not None else None)
    measure = StepMeasure(method, model, opt, device, cell.warmup_steps, cell.batch_size, clock)
    total = (len(train) * n_epochs) if cell.kind == "train" else (cell.warmup_steps + 1 + cell.steps)

    def tell(epoch: int) -> None:
        progress({"epoch": epoch, "epochs": n_epochs, "step": measure.steps, "steps": total})

    model.train()
    if cell.kind == "profile":
        with clock.part("data"):
            batches = list(train)
        with clock.part("meters"):
            window.start()  # model, optimizer and data are set up: what grows from here is the training's
        span = None
        for i in range(total):
            if i == cell.warmup_steps + 1 and window.energy is not None:  # the timed steps start here
                sync(device)
                span = Span(window.energy)
            measure.step(*batches[i % len(batches)])
            tell(0)
            if stop_requested(ranks, device)[0]:  # a profile cell is short: it starts afresh when run again
                raise Preempted(f"stopped by {_stopped_by()} at step {i + 1} of {total}; a rerun profiles it afresh")
        row["train_loss"] = None
        if span is not None:
            sync(device)
            window.profile_energy = {**span.end(), "steps": total - cell.warmup_steps - 1}
    else:
        _train(cell, device, model, method, opt, sched, train, test, measure, epochs, row, window, attempt, tell, ranks,
               details)
    with clock.part("meters"):
        window.stop(row)
        row.update(measure.columns())
    if details is not None and measure.saved_parts:
        details["saved"] = measure.saved_parts
    return measure.series()


def _train(cell: Cell, device, model, method, opt, sched, train, test, measure: StepMeasure, epochs: list[dict],
           row: dict, window: MeasureWindow, attempt: Attempt | None, tell, ranks: Ranks | None = None,
           details: dict | None = None) -> None:
    """The epochs of a train cell, resumed from its checkpoint when there is one, checkpointing as it goes."""
    clock = measure.clock
    saver = _Saver(cell, device, attempt, model, opt, sched, epochs, measure, len(train))
    with clock.part("checkpoint"):
        start = saver.resume()
    with clock.part("meters"):
        window.start()  # model, optimizer and data are set up: what grows from here is the training's
    saver.last_save = time.perf_counter()
    for epoch in range(start.epoch, cell.epochs + 1):
        first, losses, before_s = (start.batch, start.losses, start.epoch_s) if epoch == start.epoch else (0, [], 0.0)
        epoch_s, joules, losses = _train_epoch(epoch, first, losses, before_s, train, measure, window, saver, ranks,
                                               device, tell)
        lr = opt.param_groups[0]["lr"]
        if sched:
            sched.step()
        train_loss = float(torch.stack(losses).mean()) if losses else None
        with clock.part("eval"):
            acc, rate = _evaluate_epoch(method, model, test, device, ranks, epoch == cell.epochs, window, row, details)
        if acc is not None:
            saver.best = max(saver.best, acc)
        epochs.append({"epoch": epoch, "train_loss": train_loss, "test_acc": acc, "epoch_time_s": epoch_s,
                       "lr": lr, "firing_rate_mean": rate, "steps": len(train) - first,
                       **{f"energy_{k}_j": v for k, v in joules.items()}})
        if not math.isfinite(train_loss or 0.0):
            raise FloatingPointError(f"training loss is {train_loss} at epoch {epoch}")
        with clock.part("checkpoint"):
            saver.epoch_end(epoch, ranks)
    if epochs:
        last = epochs[-1]
        row.update(acc_top1=last["test_acc"], acc_top1_best=saver.best if saver.best > -math.inf else None,
                   train_loss=last["train_loss"], firing_rate_mean=last["firing_rate_mean"],
                   **summarise({"epoch_s": [e["epoch_time_s"] for e in epochs]}))


def _train_epoch(epoch: int, first: int, losses: list, before_s: float, train, measure: StepMeasure,
                 window: MeasureWindow, saver: "_Saver", ranks, device, tell) -> tuple[float, dict, list]:
    """The training steps of one epoch from batch ``first`` (a resumed epoch: its losses and seconds so far), with
    the checkpoints a stop request or ``checkpoint_minutes`` ask for. Returns (the epoch's training seconds, its
    energy per source, its losses)."""
    sync(device)
    t_epoch = time.perf_counter()
    span = Span(window.energy) if window.energy is not None else None
    paused = 0.0  # checkpoint writes inside the epoch: not training time
    for b, (wait_ms, (x, y)) in enumerate(_timed(train.batches(epoch - 1, first)), first + 1):
        measure.clock.add("data", wait_ms / 1e3)
        losses.append(measure.step(x, y, wait_ms))
        tell(epoch)
        if saver.ckpt is None:
            continue
        stopping, due = stop_requested(ranks, device, saver.due())
        if stopping or due:
            t0 = time.perf_counter()
            with measure.clock.part("checkpoint"):
                saver.save(epoch, b, before_s + t0 - t_epoch - paused, losses)
            paused += saver.last_save - t0
            if stopping:
                raise saver.stopped(epoch, b)
    sync(device)
    epoch_s = before_s + time.perf_counter() - t_epoch - paused
    return epoch_s, span.end() if span is not None else {}, losses


def _evaluate_epoch(method, model, test, device, ranks, last: bool, window: MeasureWindow, row: dict,
                    details: dict | None) -> tuple[float | None, float | None]:
    """(accuracy, firing rate) on the test set after an epoch; after the last, the analyses too (into ``details``
    and the row's operation counts and shuffled accuracy). Its memory is not the training's footprint."""
    window.footprint.pause()
    acc, rate, found = evaluate(method, model, test, device, ranks, analyses=last) if test is not None \
        else (None, None, {})
    if details is not None:
        details.update(found)
    row.update(op_totals(found.get("ops", [])))
    shuffles = [r["acc"] for r in found.get("anytime", []) if r["analysis"] == "shuffle"]
    if shuffles:
        row["acc_shuffled"] = sum(shuffles) / len(shuffles)
    window.footprint.resume()
    return acc, rate


class _Start(NamedTuple):
    epoch: int
    batch: int
    losses: list
    epoch_s: float


class _Saver:
    """A train cell's checkpoints: what it resumes from, and when and what it saves (at epoch ends but the last,
    every ``checkpoint_minutes``, on a stop request), with the weights it keeps (``save_weights_at``)."""

    def __init__(self, cell: Cell, device, attempt: Attempt | None, model, opt, sched, epochs: list[dict],
                 measure: StepMeasure, batches: int) -> None:
        self.cell, self.device, self.attempt = cell, device, attempt
        self.model, self.opt, self.sched, self.epochs, self.measure, self.batches = model, opt, sched, epochs, measure, batches
        self.ckpt = attempt.checkpoint if attempt is not None else None
        self.every_s = cell.checkpoint_minutes * 60.0
        self.best = -math.inf
        self.last_save = time.perf_counter()

    def resume(self) -> _Start:
        """Load the checkpoint into the model, optimizer, schedule, measure and RNGs; where the training goes on."""
        state = self.ckpt.load() if self.ckpt is not None else None
        if state is None:
            return _Start(1, 0, [], 0.0)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state["schedule"] is not None:
            self.sched.load_state_dict(state["schedule"])
        self.epochs[:] = state["epochs"]
        self.best = state["best"]
        self.measure.load_state(state["measure"])
        self.attempt.resumed(state)
        set_rng_state(state["rng"])  # last: building the model and the loaders drew from the RNGs too
        return _Start(state["epoch"], state["batch"], list(state["losses"].to(self.device).unbind()), state["epoch_s"])

    def due(self) -> bool:
        return bool(self.every_s) and time.perf_counter() - self.last_save >= self.every_s

    def save(self, epoch: int, batch: int, epoch_s: float, losses: list) -> None:
        """The whole state, to resume at ``batch`` of ``epoch`` (``epoch_s`` and ``losses``: that epoch's so far)."""
        sync(self.device)
        a = self.attempt
        self.ckpt.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                        "schedule": self.sched.state_dict() if self.sched is not None else None,
                        "rng": rng_state(self.device), "epoch": epoch, "batch": batch, "epoch_s": epoch_s,
                        "losses": torch.stack(losses).detach().cpu() if losses else torch.zeros(0),
                        "epochs": [dict(e) for e in self.epochs], "best": self.best, "measure": self.measure.state(),
                        "restarts": a.restarts, "resumed_at": a.resumed_at, "attempts": a.so_far()})
        self.last_save = time.perf_counter()

    def stopped(self, epoch: int, batch: int) -> Preempted:
        return Preempted(f"stopped by {_stopped_by()} at epoch {epoch}, batch {batch} of {self.batches}; "
                         "checkpointed, it resumes there when run again")

    def epoch_end(self, epoch: int, ranks) -> None:
        """After an epoch's evaluation: the weights the cell keeps; a checkpoint to resume at the next epoch (not
        after the last), and the stop a request asks for."""
        if self.ckpt is None:
            return
        keep = self.cell.save_weights_at
        if epoch in keep or epoch == self.cell.epochs and LAST_EPOCH in keep:
            self.ckpt.save_weights(epoch, self.model)
        if epoch < self.cell.epochs:
            self.save(epoch + 1, 0, 0.0, [])
            if stop_requested(ranks, self.device)[0]:
                raise self.stopped(epoch + 1, 0)


def _timed(batches):
    """(milliseconds waited for the batch, batch) for each batch of an iterable."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield (time.perf_counter() - t0) * 1e3, batch
