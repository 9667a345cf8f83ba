"""Samples per second of the CIFAR10-DVS loader, first epoch (recordings parsed and framed, the cache built) and
then from the frame cache.

    python benchmarks/event_loader.py                       # 200 recordings of 20000 events, T=10, batch 16
    python benchmarks/event_loader.py --per-class 50 --events 100000 --workers 2

Writes a miniature CIFAR10-DVS (real AEDAT-2 files, random events over the 128x128 sensor, the sizes given)
into a temporary folder and reads it through the real loader (bench.data.get_loaders: reader, count frames,
resize to 48x48, augmentation, time-major batches), with the frame cache in a temporary folder too. Real
recordings hold ~200k events each on average; pass --events to match.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_miniature(root: Path, per_class: int, events: int, seed: int = 0) -> None:
    """AEDAT-2 files as jAER writes them: a '#' header, then big-endian (address, timestamp) words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / "CIFAR10-DVS" / c).mkdir(parents=True)
        for i in range(per_class):
            x, y, p = rng.integers(0, 128, events), rng.integers(0, 128, events), rng.integers(0, 2, events)
            t = np.cumsum(rng.integers(1, 50, events))
            addr = (x << 1) | (y << 8) | p  # jAER's DVS128 address: x in bits 1-7, y in 8-14, polarity bit 0
            words = np.empty(2 * events, dtype=">u4")
            words[0::2], words[1::2] = addr, t
            with open(root / "CIFAR10-DVS" / c / f"cifar10_{c}_{i}.aedat", "wb") as f:
                f.write(b"#!AER-DAT2.0\r\n# miniature for benchmarks/event_loader.py\r\n")
                f.write(words.tobytes())


def epoch_rate(loader) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for x, _ in loader:
        n += x.shape[1]
    return n / (time.perf_counter() - t0), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--events", type=int, default=20000, help="events per recording")
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the GPU setting uses up to 8)")
    a = p.parse_args(argv)
    old_cache = os.environ.get("SNNBENCH_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["SNNBENCH_CACHE"] = str(root / "cache")
        try:
            first, cached, again, n, files = measure(root, a)
        finally:
            if old_cache is None:
                os.environ.pop("SNNBENCH_CACHE", None)
            else:
                os.environ["SNNBENCH_CACHE"] = old_cache
    print(f"CIFAR10-DVS miniature: {n} training recordings of {a.events} events, T={a.T}, 48x48, batch "
          f"{a.batch_size}, {a.workers} loader worker(s); {files} frame files cached")
    print(f"  first epoch (parse, frame, cache)  {first:8.1f} samples/s")
    print(f"  cached epoch                       {cached:8.1f} samples/s  ({cached / first:.1f}x)")
    print(f"  cached epoch, again                {again:8.1f} samples/s  ({again / first:.1f}x)")
    return 0


def measure(root: Path, a) -> tuple[float, float, float, int, int]:
    """(first-epoch, cached, cached-again samples/s, samples, cached files) of a miniature written under root."""
    write_miniature(root / "data", a.per_class, a.events)
    import torch

    from bench.data import get_loaders

    train, _ = get_loaders("cifar10_dvs", a.batch_size, a.batch_size, 0, data_root=str(root / "data"), T=a.T)
    if a.workers:
        train.loader = torch.utils.data.DataLoader(train.loader.dataset, a.batch_size, sampler=train.sampler,
                                                   collate_fn=train.loader.collate_fn, num_workers=a.workers)
    first, n = epoch_rate(train)
    cached, _ = epoch_rate(train)
    again, _ = epoch_rate(train)
    return first, cached, again, n, len(list((root / "cache").rglob("*.npy")))


if __name__ == "__main__":
    sys.exit(main())
