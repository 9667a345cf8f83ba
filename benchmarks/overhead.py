"""The harness's own overhead: one training step with the profilers on and off.

    python benchmarks/overhead.py                     # cnn_digits and resnet18 cells, this machine's device
    python benchmarks/overhead.py --arch resnet18 --method rate_m --T 4 --batch 16

"On" is what the runner does around a measured step: the TimingProbe (per-phase timers, CUDA events
and one synchronisation per step on GPU), the RSS sampler thread and, on GPU, the NVML sampler process. "Off" is the bare step with the null probe, timed the same way (with a
synchronisation on GPU). Rounds alternate off/on so that drift hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(arch: str, method_name: str, T: int, batch: int, rounds: int, steps: int, device: str, only: str = "all") -> dict:
    import torch

    from bench.data import dataset_info
    from bench.profile import NvmlProcessSampler, Sampler, TimingProbe, nvml_device, rss_reader, sync
    from bench.runner import RSS_INTERVAL_S, SAMPLE_INTERVAL_S
    from methods import METHODS, NULL_PROBE, MethodConfig

    torch.manual_seed(0)
    dev = torch.device(device)
    ds = "digits" if arch in ("cnn_digits", "mlp") else "cifar10"
    info = dataset_info(ds if ds == "digits" else "synthetic:cifar10")
    method = METHODS[method_name](MethodConfig(T=T))
    model = method.build(arch, info.num_classes, info.shape[0]).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, *info.shape, device=dev)
    y = torch.randint(0, info.num_classes, (batch,), device=dev)
    for _ in range(3):
        method.train_step(model, x, y, opt)
    sync(dev)
    nvml, _ = nvml_device(dev)
    off, off2, on = [], [], []

    def bare(into):
        for _ in range(steps):
            t0 = time.perf_counter()
            method.train_step(model, x, y, opt, NULL_PROBE)
            sync(dev)
            into.append(time.perf_counter() - t0)

    for i in range(rounds):  # off, on, off2 -- then off2, on, off: "on" always sits between the two bare arms
        bare(off if i % 2 == 0 else off2)
        probe = TimingProbe(dev) if only in ("all", "probe") else NULL_PROBE
        samplers = [Sampler(rss_reader(), RSS_INTERVAL_S, baseline=0)] if only in ("all", "samplers") else []
        if nvml and only in ("all", "samplers"):
            samplers.append(NvmlProcessSampler(nvml.uuid, SAMPLE_INTERVAL_S))
        for s in samplers:
            s.start()
        for _ in range(steps):
            t0 = time.perf_counter()
            method.train_step(model, x, y, opt, probe)
            if probe is NULL_PROBE:
                sync(dev)
            else:
                probe.end_step()
            on.append(time.perf_counter() - t0)
        for s in samplers:
            s.stop()
        bare(off2 if i % 2 == 0 else off)  # an A/A control: the same bare step again shows the noise floor
    m_off, m_off2, m_on = (statistics.median(v) * 1e3 for v in (off, off2, on))
    m_bare = statistics.median(off + off2) * 1e3
    # what the profilers cost, accounted directly: a probe's phases and step end, and each sampler reading
    probe = TimingProbe(dev)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        for ph in ("forward", "backward", "optimizer"):
            with probe.phase(ph):
                pass
        probe.end_step()
    probe_ms = (time.perf_counter() - t0) * 1e3 / n
    readers = [(rss_reader(), RSS_INTERVAL_S)]  # NVML is read in its own process: no cost to this one
    accounted = probe_ms
    for r, interval in readers:
        t0 = time.perf_counter()
        for _ in range(200):
            r()
        accounted += (time.perf_counter() - t0) * 1e3 / 200 * (m_off / 1e3) / interval
    return {"arch": arch, "method": method_name, "T": T, "batch": batch, "device": device + ("" if only == "all" else f" ({only} only)"),
            "off_ms": m_bare, "on_ms": m_on, "overhead_pct": 100.0 * (m_on - m_bare) / m_bare,
            "noise_pct": 100.0 * (m_off2 - m_off) / m_off, "accounted_pct": 100.0 * accounted / m_off, "steps": len(on)}


def main(argv=None) -> int:
    import torch
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch")
    p.add_argument("--method", default="bptt_m")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["all", "probe", "samplers"], default="all",
                   help="switch on only the timing probe or only the memory samplers")
    a = p.parse_args(argv)
    cases = [(a.arch, a.method, a.T, a.batch or 16)] if a.arch else [
        ("cnn_digits", "bptt_m", 4, 32), ("cnn_digits", "rate_m", 4, 32), ("resnet18", "rate_m", 4, 16)]
    rows = [measure(arch, m, T, b, a.rounds, a.steps, a.device, a.only) for arch, m, T, b in cases]
    print(tabulate([[r["arch"], r["method"], r["T"], r["batch"], r["device"], f"{r['off_ms']:.2f}", f"{r['on_ms']:.2f}",
                     f"{r['overhead_pct']:+.2f}%", f"{r['noise_pct']:+.2f}%", f"{r['accounted_pct']:.3f}%", r["steps"]] for r in rows],
                   headers=["arch", "method", "T", "batch", "device", "off ms (median)", "on ms (median)", "on vs off",
                            "off vs off (noise)", "accounted cost", "steps each"], tablefmt="github"))
    print(f"largest measured on-vs-off: {max(r['overhead_pct'] for r in rows):+.2f}%; largest A/A noise: "
          f"{max(abs(r['noise_pct']) for r in rows):.2f}%; largest accounted cost: {max(r['accounted_pct'] for r in rows):.3f}% "
          "(target < 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
