"""Step cost of every method: median step time, bytes saved for backward and peak RSS.

    python benchmarks/step_cost.py                       # resnet18, CIFAR-shaped input, batch 16, T in {1,2,4,8}
    python benchmarks/step_cost.py --arch cnn_digits --batch 64 --T 1 2 4 8 16

Each (method, T) runs in a fresh process so that its peak RSS is its own. Prints one table and, with
``--json``, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

INPUT = {"resnet18": (3, 32), "resnet19": (3, 32), "vgg11": (3, 32), "vgg13": (3, 32), "vggsnn_cifar": (3, 32),
         "vggsnn_dvs": (2, 48), "sew_resnet34": (3, 224), "preact_resnet34": (3, 224), "cnn_digits": (1, 8), "mlp": (1, 8)}


def measure(method_name: str, arch: str, T: int, batch: int, warmup: int, steps: int, threads: int, options: dict | None = None) -> dict:
    import torch

    from bench.profile import SavedTensorsMeter
    from methods import METHODS, MethodConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cin, hw = INPUT[arch]
    method = METHODS[method_name](MethodConfig(T=T, options=dict(options or {})))
    model = method.build(arch, num_classes=10, in_channels=cin)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, cin, hw, hw)
    y = torch.randint(0, 10, (batch,))
    for _ in range(warmup):
        method.train_step(model, x, y, opt)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        method.train_step(model, x, y, opt)
        times.append(time.perf_counter() - t0)
    with SavedTensorsMeter(exclude=model.parameters()) as meter:
        method.train_step(model, x, y, opt)
    return {
        "method": method_name + (f"[{','.join(f'{k}={v}' for k, v in options.items())}]" if options else ""),
        "arch": arch, "T": T, "batch": batch,
        "step_time_ms_median": 1e3 * statistics.median(times),
        "saved_for_backward_mib": meter.peak_mib,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def _worker(q, args):
    try:
        q.put(measure(*args))
    except Exception as e:  # the row says what failed; the other cells go on
        q.put({"method": args[0], "arch": args[1], "T": args[2], "error": f"{type(e).__name__}: {e}"})


def main(argv=None) -> int:
    from methods import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=sorted(INPUT))
    p.add_argument("--methods", nargs="+", default=None, help="default: every method")
    p.add_argument("--T", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--options", action="append", default=[], metavar="JSON",
                   help='method options, e.g. \'{"k": 2}\' for sltt_k; repeat to sweep them')
    a = p.parse_args(argv)
    a.methods = a.methods or list(METHODS)
    bad = [m for m in a.methods if m not in METHODS]
    if bad or any(t < 1 for t in a.T):
        print(f"error: unknown method(s) {bad} (valid: {sorted(METHODS)}) or T < 1", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    rows = []
    try:
        sweeps = [json.loads(o) for o in a.options] or [{}]
    except json.JSONDecodeError as e:
        print(f"error: --options must be JSON objects: {e}", file=sys.stderr)
        return 2
    for name, T, opts in ((n, T, o) for n in a.methods for o in sweeps for T in a.T):
        q = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(q, (name, a.arch, T, a.batch, a.warmup, a.steps, a.threads, opts)))
        proc.start()
        proc.join()
        row = q.get() if not q.empty() else {"method": name, "T": T, "error": f"worker exit code {proc.exitcode}"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    from tabulate import tabulate

    ok = [r for r in rows if "error" not in r]
    base = {r["T"]: r for r in ok if r["method"] == "bptt_m"}  # ratios need bptt_m in the run
    table = []
    for r in ok:
        b = base.get(r["T"])
        b1 = base.get(1)
        table.append([r["method"], r["T"], f"{r['step_time_ms_median']:.1f}",
                      f"{r['step_time_ms_median'] / b['step_time_ms_median']:.2f}" if b else "",
                      f"{r['saved_for_backward_mib']:.2f}",
                      f"{r['saved_for_backward_mib'] / b1['saved_for_backward_mib']:.3f}" if b1 else "",
                      f"{r['peak_rss_mib']:.0f}"])
    print(f"\n{a.arch}, batch {a.batch}, {a.steps} measured steps after {a.warmup} warm-up, {a.threads} threads")
    print(tabulate(table, headers=["method", "T", "step ms (median)", "x bptt_m same T", "saved MiB",
                                   "x bptt_m T=1", "peak RSS MiB"], tablefmt="github"))
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['method']} T={r['T']}: {r['error']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
