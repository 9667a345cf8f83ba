"""The LIF backends (torch, triton, compile) measured side by side, interleaved, in one process.

    python benchmarks/backends.py neuron --device cuda                 # LIF forward+backward, 64x64x32x32 neurons,
                                                                       # T 4,8,16,32: time and bandwidth vs peak
    python benchmarks/backends.py step --device cuda                   # resnet18, batch 128, T 1,4,8, every method
    python benchmarks/backends.py step --device cpu --arch cnn_digits --batch 32 --backends torch,compile

``neuron``: one multi-step LIF layer (the rbp preset), forward and backward of ``[T, 64, 64, 32, 32]``. The bytes
it must move at least: the input, the spikes and the kept membrane written, then the spikes' gradient and the
membrane read and the input's gradient written: 6 T N 4 bytes; achieved bandwidth = those bytes / time, beside
the device's peak (NVML: memory clock x bus width x 2). With ``--spikingjelly`` (the optional extra
``pip install -e ".[sj]"``), SpikingJelly's multi-step LIFNode with its torch, cupy and triton backends where
they load, in the same rounds.

``step``: one training step of each method (``Method.train_step``, SGD; by default every method whose neurons the
fused backends run, i.e. all but those with ``Method.torch_only``) with each backend, a fresh model per
backend from the same seed; each round runs every backend once (the order rotates), ``--rounds`` rounds after
``--warmup``; prints the median step time and its ratio to the torch backend's (at the first ``--precision``; ``--precision
fp32,bf16`` measures both, with convs and linears in bf16 as a cell's ``precision = "bf16"``).

On a CPU, Triton runs only through its interpreter (``TRITON_INTERPRET=1``, set here when there is no GPU), which
checks results and is not performance: its times are printed marked "interpreter" and mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bandwidth_gbs(device) -> float | None:
    """The GPU's peak memory bandwidth from NVML, GB/s; None on a CPU or without NVML."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        return clock_mhz * 1e6 * bus_bits / 8 * 2 / 1e9
    except Exception:
        return None


def _interleaved(fns: dict, rounds: int, warmup: int, device) -> dict[str, list[float]]:
    """Each round calls every function once, in an order that rotates; returns milliseconds per call."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return times


def _lif_call(backend: str, T: int, x, g):
    from methods.layers import LIF
    from methods.neuron import get_preset

    lif = LIF(get_preset("rbp"))
    lif.backend, lif.mode, lif.T = backend, "multi", T

    def run():
        xx = x.detach().requires_grad_()
        lif(xx).backward(g)
    return run


def _sj_calls(T: int, x, g) -> dict:
    """SpikingJelly's multi-step LIFNode with each backend that loads here (decay 0.2 as the rbp preset: tau 1.25)."""
    out = {}
    try:
        from spikingjelly.activation_based import neuron
    except ImportError:
        return out
    for backend in ("torch", "cupy", "triton"):
        try:
            node = neuron.LIFNode(tau=1.25, decay_input=False, v_threshold=1.0, v_reset=None, detach_reset=True,
                                  step_mode="m", backend=backend).to(x.device)
            xs = x.view(T, -1, *x.shape[1:])

            def run(node=node, xs=xs):
                node.reset()
                xx = xs.detach().requires_grad_()
                node(xx).backward(g.view_as(xs))
            run()
            out[f"spikingjelly-{backend}"] = run
        except Exception as e:  # a backend that does not load here (cupy without CUDA, say)
            print(f"  spikingjelly {backend}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    return out


def neuron_bench(a) -> None:
    import torch

    device = torch.device(a.device)
    peak = peak_bandwidth_gbs(device)
    interp = device.type == "cpu"
    print(f"LIF forward+backward, [{a.batch}, {a.channels}, {a.size}, {a.size}] neurons per step, device {device}"
          + (f", peak bandwidth {peak:.0f} GB/s" if peak else "") + (" (triton: interpreter, not performance)" if interp else ""))
    print(f"{'T':>3} {'backend':<22} {'median ms':>10} {'GB/s':>8} {'% peak':>7}")
    for T in a.T:
        n = a.batch * a.channels * a.size * a.size
        x = torch.randn(T * a.batch, a.channels, a.size, a.size, device=device) * 1.5
        g = torch.randn_like(x)
        fns = {b: _lif_call(b, T, x, g) for b in a.backends}
        if a.spikingjelly:
            fns.update(_sj_calls(T, x, g))
        times = _interleaved(fns, a.rounds, a.warmup, device)
        for name, ts in times.items():
            ms = statistics.median(ts)
            gbs = 6 * T * n * 4 / (ms / 1e3) / 1e9
            note = " (interpreter)" if interp and name == "triton" else ""
            print(f"{T:>3} {name:<22} {ms:>10.3f} {gbs:>8.1f} {(100 * gbs / peak) if peak else float('nan'):>7.1f}{note}")


def step_bench(a) -> None:
    import torch

    from methods import METHODS, MethodConfig
    from methods.layers import set_backend, set_precision

    device = torch.device(a.device)
    interp = device.type == "cpu"
    print(f"one training step, {a.arch}, batch {a.batch}, device {device}" + (" (triton: interpreter)" if interp else ""))
    print(f"{'method':<8} {'T':>3} {'backend':<8} {'prec':<5} {'median ms':>10} {'x torch':>8}")
    shape = (3, 32, 32) if a.arch not in ("cnn_digits",) else (1, 8, 8)
    for name in a.methods:
        for T in a.T:
            torch.manual_seed(0)
            x = torch.rand(a.batch, *shape, device=device)
            y = torch.randint(0, 10, (a.batch,), device=device)
            fns = {}
            for b in a.backends:
                for prec in a.precision:
                    m = METHODS[name](MethodConfig(T=T))
                    torch.manual_seed(0)
                    model = m.build(a.arch, 10, shape[0], input_shape=shape).to(device)
                    set_backend(model, b)
                    set_precision(model, prec, device.type)
                    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                    fns[b, prec] = (lambda m=m, model=model, opt=opt: m.train_step(model, x, y, opt))
            times = _interleaved(fns, a.rounds, a.warmup, device)
            base = statistics.median(times["torch", a.precision[0]]) if ("torch", a.precision[0]) in times else None
            for (b, prec), ts in times.items():
                ms = statistics.median(ts)
                print(f"{name:<8} {T:>3} {b:<8} {prec:<5} {ms:>10.2f} {ms / base if base else float('nan'):>8.2f}"
                      + (" (interpreter)" if interp and b == "triton" else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("neuron", "step"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="cuda")
        s.add_argument("--backends", default="torch,triton,compile")
        s.add_argument("--rounds", type=int, default=20)
        s.add_argument("--warmup", type=int, default=3)
    n = sub.choices["neuron"]
    n.add_argument("--T", default="4,8,16,32")
    n.add_argument("--batch", type=int, default=64)
    n.add_argument("--channels", type=int, default=64)
    n.add_argument("--size", type=int, default=32)
    n.add_argument("--spikingjelly", action="store_true", help="also SpikingJelly's LIFNode (optional extra 'sj')")
    s = sub.choices["step"]
    s.add_argument("--T", default="1,4,8")
    s.add_argument("--arch", default="resnet18")
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--methods", default="all", help="comma-separated, or 'all': every method the backends run")
    s.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (ratios are to torch at the first)")
    a = p.parse_args(argv)
    a.T = [int(t) for t in a.T.split(",")]
    a.backends = [b for b in a.backends.split(",") if b]
    if a.cmd == "step":
        a.methods = [m for m in a.methods.split(",") if m]
    if not a.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before methods.triton_lif is imported
    if a.cmd == "step":
        from methods import METHODS

        from methods.layers import PRECISIONS

        a.precision = [p for p in a.precision.split(",") if p]
        if not a.precision or set(a.precision) - set(PRECISIONS):
            print(f"error: --precision {','.join(a.precision)}: each one of {', '.join(PRECISIONS)}", file=sys.stderr)
            return 2
        if a.methods == ["all"]:
            a.methods = [n for n in sorted(METHODS) if METHODS[n].torch_only is None and METHODS[n].bf16 is None]
        bad = [n for n in a.methods if n not in METHODS or METHODS[n].torch_only is not None]
        if bad:
            print(f"error: --methods {','.join(bad)}: unknown, or run on the torch backend only", file=sys.stderr)
            return 2
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device here (use --device cpu)", file=sys.stderr)
        return 2
    from methods.layers import BACKENDS

    bad = [b for b in a.backends if b not in BACKENDS]
    if bad:
        print(f"error: unknown backend(s) {bad}; valid: {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    (neuron_bench if a.cmd == "neuron" else step_bench)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
