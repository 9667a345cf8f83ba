"""What a train cell's checkpoint costs: its size and write time, as a fraction of a training epoch.

    python benchmarks/checkpoint_cost.py                          # resnet18, CIFAR-10 shaped input, T=2, batch 32, CPU
    python benchmarks/checkpoint_cost.py --arch resnet19 --T 4 --batch-size 64 --device cuda

A real train cell runs through the runner (synthetic CIFAR-10-shaped data, 4 steps per epoch, 3 epochs: the
checkpoints after epochs 1 and 2 are written exactly as in any grid, atomically into a results folder). Prints the
checkpoint's size, its mean write time, the median step time, and the write time over a CIFAR-10 epoch at that
batch size (50000 / batch steps of the median step time; data loading left out, so the fraction is an upper
bound). The checkpoint holds the model, the optimizer (SGD momentum buffers: as large as the model again), the
RNGs and the rows so far.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CIFAR10_TRAIN = 50000


def measure(arch: str, T: int, batch_size: int, device: str, method: str = "bptt_m") -> dict:
    from bench.grid import Cell
    from bench.runner import run_cell

    cell = Cell(method=method, arch=arch, dataset="synthetic:cifar10", T=T, epochs=3, batch_size=batch_size,
                warmup_steps=1, lr=0.01, device=device)
    with tempfile.TemporaryDirectory() as out:
        res = run_cell(cell, out=out)
    row = res.row
    if res.status != "ok":
        raise SystemExit(f"the cell failed: {row['error']}")
    steps = math.ceil(CIFAR10_TRAIN / batch_size)
    epoch_s = row["step_time_ms_median"] / 1e3 * steps
    return {"arch": arch, "T": T, "batch": batch_size, "params_m": row["num_params"] / 1e6,
            "checkpoint_mib": row["checkpoint_mib"], "write_s": row["checkpoint_s"],
            "step_s": row["step_time_ms_median"] / 1e3, "epoch_s": epoch_s, "fraction": row["checkpoint_s"] / epoch_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    r = measure(a.arch, a.T, a.batch_size, a.device)
    print(f"{r['arch']} ({r['params_m']:.2f} M parameters), T={r['T']}, batch {r['batch']}, {a.device}:")
    print(f"  checkpoint size          {r['checkpoint_mib']:.1f} MiB")
    print(f"  checkpoint write (mean)  {r['write_s'] * 1e3:.0f} ms")
    print(f"  training step (median)   {r['step_s'] * 1e3:.0f} ms")
    print(f"  CIFAR-10 epoch (steps)   {r['epoch_s']:.0f} s = {math.ceil(CIFAR10_TRAIN / r['batch'])} x the median step")
    print(f"  write / epoch            {r['fraction']:.2e} ({r['fraction'] * 100:.4f}% per checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
