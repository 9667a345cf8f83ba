"""Profilers that a runner wraps around a method's step. The method never knows it is measured."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .sampler import PeakReadings, Sampler, norm_uuid  # noqa: F401  (Sampler re-exported: it lives in a module without torch)

MIB = float(2**20)


class _Saved:
    """What the pack hook leaves in the graph: the tensor plus a note to the meter when it is freed."""

    __slots__ = ("tensor", "meter", "key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorsMeter", key: int) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        self.meter._release(self.key)


MODULE_PARTS = ("conv", "bn", "lif", "linear", "other")
TENSOR_PARTS = ("activation", "spike", "rate", "membrane", "eligibility")


def module_part(module: torch.nn.Module | None) -> str:
    """The part of a network a module is, for the attribution of saved bytes."""
    from methods.layers import LIF, BatchNorm

    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (BatchNorm, torch.nn.modules.batchnorm._NormBase)):
        return "bn"
    if isinstance(module, LIF):
        return "lif"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "other"


class SavedTensorsMeter:
    """Bytes autograd saves for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``.

    Counts each storage once however often it is saved, and excludes the storages of the tensors
    given as ``exclude`` (the model's parameters: they are alive anyway). A saved tensor counts from
    the moment it is packed until its graph node is freed, so ``peak_bytes`` is the largest amount
    held at once: for BPTT the whole graph, for an online method one step's graph.

    Given the ``model``, each storage is also attributed (``peak_parts``: the bytes held at the peak by
    (module, tensor)) to the innermost module running when it was first saved (``module_part``: conv, bn, lif,
    linear, other: whatever a container's own forward, the loss or the readout saves) and to a kind of tensor:
    ``spike`` (a LIF layer's output in a spiking mode, saved by the layer after it), ``rate`` (its output in
    rate-BP's rate pass), ``membrane`` (saved inside a LIF layer's forward: the membrane potential the
    surrogate gradient needs), ``eligibility`` (saved inside a LIF layer in the rate pass), ``activation``
    (anything else: inputs, conv and BN outputs, logits).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), model: torch.nn.Module | None = None) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list] = {}
        self._lock = threading.Lock()
        self.current_bytes = 0
        self.peak_bytes = 0
        self.packed = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.model = model
        self.parts: dict[tuple[str, str], int] = {}
        self.peak_parts: dict[tuple[str, str], int] = {}
        self._stack: list[torch.nn.Module] = []
        self._outputs: dict[int, tuple[str, int]] = {}  # storage of a LIF output -> (tensor kind, its bytes)
        self._handles: list = []

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def __enter__(self) -> "SavedTensorsMeter":
        if self.model is not None:
            from methods.layers import LIF

            for m in self.model.modules():
                self._handles.append(m.register_forward_pre_hook(lambda mod, args: self._stack.append(mod)))
                self._handles.append(m.register_forward_hook(self._left(isinstance(m, LIF))))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _left(self, lif: bool):
        def hook(module, args, output) -> None:
            if self._stack and self._stack[-1] is module:
                self._stack.pop()
            if lif and torch.is_tensor(output) and torch.is_grad_enabled():
                st = output.untyped_storage()
                self._outputs[st.data_ptr()] = ("rate" if module.mode == "rate" else "spike", st.nbytes())
        return hook

    def _part(self, storage) -> tuple[str, str]:
        module = self._stack[-1] if self._stack else None
        mpart = module_part(module)
        out = self._outputs.get(storage.data_ptr())
        if out is not None and out[1] == storage.nbytes():
            return mpart, out[0]
        if mpart == "lif":
            return mpart, "eligibility" if module.mode == "rate" else "membrane"
        return mpart, "activation"

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._exclude or key == 0:
            return t
        with self._lock:
            self.packed += 1
            entry = self._live.get(key)
            if entry is None:
                part = self._part(storage) if self.model is not None else None
                self._live[key] = [1, storage.nbytes(), part]
                self.current_bytes += storage.nbytes()
                if part is not None:
                    self.parts[part] = self.parts.get(part, 0) + storage.nbytes()
                if self.current_bytes > self.peak_bytes:
                    self.peak_bytes = self.current_bytes
                    if part is not None:
                        self.peak_parts = dict(self.parts)
            else:
                entry[0] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._live[key]
                self.current_bytes -= entry[1]
                if entry[2] is not None:
                    self.parts[entry[2]] -= entry[1]

    def breakdown(self) -> list[dict]:
        """The bytes held at the peak, one row per (module, tensor) that held any."""
        return [{"module": m, "tensor": t, "bytes": b} for (m, t), b in sorted(self.peak_parts.items()) if b > 0]


# --------------------------------------------------------------------------- timing


class _Phase:
    __slots__ = ("probe", "name", "t0", "ev0")

    def __init__(self, probe: "TimingProbe", name: str) -> None:
        self.probe, self.name = probe, name

    def __enter__(self):
        p = self.probe
        if p.cuda:
            self.ev0 = p._event()
            self.ev0.record()
            if p.memory:
                torch.cuda.reset_peak_memory_stats(p.device)
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        p = self.probe
        if p.cuda:
            ev1 = p._event()
            ev1.record()
            p._events.append((self.name, self.ev0, ev1))
            if p.memory:
                stats = torch.cuda.memory_stats(p.device)
                for store, key in ((p.phase_peak_alloc, "allocated_bytes.all.peak"), (p.phase_peak_reserved, "reserved_bytes.all.peak")):
                    if stats.get(key, 0) > store.get(self.name, 0):
                        store[self.name] = stats[key]
        else:
            p._step[self.name] = p._step.get(self.name, 0.0) + (time.perf_counter() - self.t0) * 1e3
        return False


class TimingProbe:
    """Per-phase wall time of each step. On CUDA: events (from a reused pool) around each phase, read
    after one synchronisation at the end of the step (no sync inside a step). A phase entered several
    times in one step (online methods) is summed.

    With ``memory = True`` (the runner sets it for one step that it leaves out of the timings) each
    phase also resets the allocator's peak counters when it starts and reads them when it ends: the
    per-phase peaks. Reading allocator statistics costs far more than an event, so timed steps skip it.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.memory = False
        self._events: list = []
        self._pool: list = []
        self._used = 0
        self._step: dict[str, float] = {}
        self.phase_peak_alloc: dict[str, int] = {}  # phase -> allocator peak (bytes) while in that phase
        self.phase_peak_reserved: dict[str, int] = {}

    def _event(self):
        if self._used == len(self._pool):
            self._pool.append(torch.cuda.Event(enable_timing=True))
        ev = self._pool[self._used]
        self._used += 1
        return ev

    def phase(self, name: str):
        return _Phase(self, name)

    def end_step(self) -> dict[str, float]:
        """Close the step: (on CUDA, synchronise and) store its per-phase times."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for name, a, b in self._events:
                self._step[name] = self._step.get(name, 0.0) + a.elapsed_time(b)
            self._events, self._used = [], 0
        out, self._step = self._step, {}
        return out

    def discard(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._events, self._step, self._used = [], {}, 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- samplers


class NvmlProcessSampler(PeakReadings):
    """NVML used memory of one GPU, sampled by a :class:`Sampler` in its own process
    (``python -m bench.nvml_sampler``), so the sampling shares no interpreter lock with the training loop.
    Same interface as :class:`Sampler`: ``start``, ``stop``, ``baseline``, ``peak``, ``samples``."""

    def __init__(self, uuid: str, interval_s: float = 0.005) -> None:
        self.uuid, self.interval_s = uuid, interval_s
        self.baseline: int | None = None
        self.peak: int | None = None
        self.samples: list[tuple[float, int]] = []
        self.power_trace: list[tuple[float, float]] = []  # (time.perf_counter() here, watts), after stop()
        self.energy_sources: tuple[bool, bool, str | None] | None = None  # (counter, power, why neither), once started
        self._proc = None
        self._t0 = 0.0
        self._perf0 = 0.0

    def start(self) -> "NvmlProcessSampler":
        import json
        import subprocess
        import sys

        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": repo + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
        self._t0, self._perf0 = time.time(), time.perf_counter()
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.nvml_sampler", self.uuid, str(self.interval_s)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=repo)
        hello = json.loads(self._proc.stdout.readline() or "{}")
        if "baseline" not in hello:
            self._proc.kill()
            raise RuntimeError(f"the NVML sampler process did not start: {hello.get('error', 'no answer')}")
        self.baseline = hello["baseline"]
        self.energy_sources = (bool(hello.get("energy_counter")), bool(hello.get("energy_power")),
                               hello.get("energy_reason"))
        self._energy = {"counter": 0.0 if self.energy_sources[0] else None,
                        "power": 0.0 if self.energy_sources[1] else None}
        return self

    def energy(self) -> dict:
        """The sampler process's energy readings now: {"counter": joules, "power": joules} since it started (None
        where the GPU has no such source). A process that no longer answers leaves the last readings standing (as
        a failed reading ends the in-process meter's series: what was read stands)."""
        import json

        try:
            self._proc.stdin.write("energy\n")
            self._proc.stdin.flush()
            self._energy = json.loads(self._proc.stdout.readline())
        except (OSError, ValueError, AttributeError):
            pass
        return self._energy

    def cpu_seconds(self) -> float:
        """CPU time the sampler process used so far (it runs beside the cell: not contention)."""
        if self._proc is None:
            return 0.0
        try:
            import psutil

            t = psutil.Process(self._proc.pid).cpu_times()
            return t.user + t.system
        except Exception:
            return 0.0

    def stop(self) -> "NvmlProcessSampler":
        import json

        if self._proc is None:
            return self
        try:
            try:
                self._proc.stdin.write("stop\n")
                self._proc.stdin.flush()
                res = json.loads(self._proc.stdout.readline() or "{}")
            except (OSError, ValueError):  # the process died: no peak (the row says null), the cell goes on
                res = {}
            self.peak = res.get("peak")
            self.samples = [(t - self._t0, v) for t, v in res.get("samples", [])]
            self.power_trace = [(self._perf0 + t - self._t0, w) for t, w in res.get("power", [])]
        finally:
            try:
                self._proc.wait(timeout=10)
            except Exception:
                self._proc.kill()
            self._proc = None
        return self


def cpu_busy_seconds() -> float | None:
    """CPU time all processes of the machine used since boot (/proc/stat: user, nice, system, irq, softirq and
    steal, which a hypervisor gave to other guests); None where /proc/stat is not readable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]] + [0] * max(0, 8 - len(fields[1:9]))
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuContention:
    """How much CPU other processes used while a cell was timed: the machine's busy CPU time over the window
    minus this process's own (all its threads) and that of helper processes it started (``helper_cpu``).

    ``contention_cpu_frac`` is that time over the window's wall time times the CPU count: 0 on a quiet
    machine, 0.5 when another process kept one of two cores busy. Readers are injectable for tests."""

    def __init__(self, read_busy: Callable[[], float | None] = cpu_busy_seconds,
                 read_self: Callable[[], float] = time.process_time, helper_cpu: Callable[[], float] = lambda: 0.0,
                 n_cpus: int | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.read_busy, self.read_self, self.helper_cpu, self.clock = read_busy, read_self, helper_cpu, clock
        self.n_cpus = n_cpus or os.cpu_count() or 1
        self._start: tuple | None = None

    def start(self) -> "CpuContention":
        self._start = (self.read_busy(), self.read_self(), self.helper_cpu(), self.clock())
        return self

    def peek(self) -> dict:
        """What ``stop`` would give now ({} before ``start``): the window goes on."""
        return self.stop() if self._start is not None else {}

    def stop(self) -> dict:
        assert self._start is not None, "start() first"
        b0, s0, h0, t0 = self._start
        b1, s1, h1, t1 = self.read_busy(), self.read_self(), self.helper_cpu(), self.clock()
        wall = t1 - t0
        if b0 is None or b1 is None or wall <= 0:
            return {"contention_cpu_s": None, "contention_cpu_frac": None, "contention_window_s": wall}
        other = max(0.0, (b1 - b0) - (s1 - s0) - (h1 - h0))
        return {"contention_cpu_s": other, "contention_cpu_frac": other / (wall * self.n_cpus),
                "contention_window_s": wall}


class RssFootprint:
    """The memory a cell's training adds to its process: the resident high-water mark (VmHWM) over the training
    steps, reset at the start through /proc/self/clear_refs, minus the resident memory at the start (after the
    model and the data are set up). ``pause``/``resume`` leave a stretch out (evaluation, whose activations for a
    large evaluation batch are not training memory). ``None`` where the kernel offers no reset of the
    high-water mark (not Linux)."""

    def __init__(self) -> None:
        self.start_rss: int | None = None
        self.peak_before: int = 0
        self.resettable = False
        self._seg_peak = 0
        self._paused = False

    def _reset(self) -> bool:
        self.peak_before = max(self.peak_before, peak_rss_bytes())  # the process's peak so far; the reset forgets it
        return reset_rss_peak()

    def start(self) -> "RssFootprint":
        self.resettable = self._reset()
        self.start_rss = rss_reader()()
        return self

    def pause(self) -> None:
        if self.resettable and not self._paused:
            self._seg_peak = max(self._seg_peak, vm_hwm_bytes() or 0)
            self._paused = True

    def resume(self) -> None:
        if self.resettable and self._paused:
            self._reset()
            self._paused = False

    def stop(self) -> tuple[float | None, float]:
        """(footprint bytes or None, peak RSS bytes of the whole process)"""
        self.pause()
        return self.peek()

    def peek(self) -> tuple[float | None, float]:
        """What ``stop`` would give now, without stopping (a checkpoint records it)."""
        seg = self._seg_peak if self._paused or not self.resettable else max(self._seg_peak, vm_hwm_bytes() or 0)
        peak = max(self.peak_before, seg, peak_rss_bytes())
        if not self.resettable or self.start_rss is None:
            return None, peak
        return max(0, seg - self.start_rss), peak


def vm_hwm_bytes() -> int | None:
    """This process's resident high-water mark since its last ``reset_rss_peak`` (VmHWM in /proc/self/status);
    None where the kernel does not give it."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_reader() -> Callable[[], int]:
    import psutil

    proc = psutil.Process()
    return lambda: proc.memory_info().rss


def reset_rss_peak() -> bool:
    """Reset this process's resident high-water mark (VmHWM) to its resident set now, through /proc/self/clear_refs
    (Linux >= 4.0); False where the kernel offers no reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's resident memory (ru_maxrss is KiB on Linux)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


# --------------------------------------------------------------------------- NVML


@dataclass
class NvmlDevice:
    """The NVML handle of a torch CUDA device, matched by UUID, and what NVML says about the GPU."""

    handle: Any
    uuid: str
    name: str
    driver: str
    mig_mode: str
    other_processes: list[int]

    def other_pids(self) -> list[int]:
        """Processes other than this one with a compute context on the GPU now."""
        import pynvml

        try:
            return [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle) if p.pid != os.getpid()]
        except pynvml.NVMLError:
            return []

    def process_used_bytes(self, pid: int) -> int | None:
        import pynvml

        try:
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
        except pynvml.NVMLError:
            return None
        return None


def nvml_device(device: torch.device) -> tuple[NvmlDevice | None, str | None]:
    """(NVML device for this torch device, None) or (None, the reason there is none)."""
    if device.type != "cuda":
        return None, "not a CUDA device"
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, driver not loaded, ...
        return None, f"NVML unavailable: {e}"
    try:
        want = norm_uuid(torch.cuda.get_device_properties(device).uuid)
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            if norm_uuid(uuid) == want:
                name = pynvml.nvmlDeviceGetName(h)
                driver = pynvml.nvmlSystemGetDriverVersion()
                try:
                    cur, _pending = pynvml.nvmlDeviceGetMigMode(h)
                    mig = "enabled" if cur else "disabled"
                except pynvml.NVMLError:
                    mig = "not supported"
                try:
                    others = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid != os.getpid()]
                except pynvml.NVMLError:
                    others = []
                return NvmlDevice(h, uuid, name.decode() if isinstance(name, bytes) else name,
                                  driver.decode() if isinstance(driver, bytes) else driver, mig, others), None
        return None, f"no NVML device has the UUID of {device} ({want}); MIG instance or container without NVML access"
    except Exception as e:
        return None, f"NVML query failed: {e}"
