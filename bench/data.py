"""Datasets by name, each from its real on-disk format, and synthetic input of any dataset's shape.

``digits``: the 8x8 digits set that scikit-learn ships (1797 images, 10 classes), scaled to [0, 1],
with a fixed stratified 1437/360 train/test split (random_state 0). No download.

``synthetic:<name>``: random inputs of dataset <name>'s shape (uniform [0, 1); for event datasets T frames of
0/1 events with probability 0.1; fixed seed) and random labels, for profile cells.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import UsageError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    shape: tuple[int, ...]  # one frame's shape, [C, H, W]
    num_classes: int
    events: bool = False  # event data: a sample is T frames [T, C, H, W] (T from the cell), batched as [T, B, ...]
    description: str = ""


# shapes of every dataset the papers use (synthetic input can take any of them)
SHAPES: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", (1, 8, 8), 10, 0, "scikit-learn's 8x8 digits, shipped with the package"),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10),
    "cifar100": DatasetInfo("cifar100", (3, 32, 32), 100),
    "imagenet": DatasetInfo("imagenet", (3, 224, 224), 1000),
    "cifar10_dvs": DatasetInfo("cifar10_dvs", (2, 48, 48), 10, True),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10),
    "nmnist": DatasetInfo("nmnist", (2, 34, 34), 10, True),
}

# datasets with a loader (digits ships with scikit-learn; the others are read from --data-root, bench/realdata.py)
DATASETS: dict[str, DatasetInfo] = {n: SHAPES[n] for n in
                                    ("digits", "cifar10", "cifar100", "mnist", "imagenet", "cifar10_dvs", "nmnist")}


def dataset_names() -> list[str]:
    return sorted(DATASETS) + [f"synthetic:{n}" for n in sorted(SHAPES)]


def dataset_info(name: str) -> DatasetInfo:
    if name.startswith("synthetic:"):
        base = name.split(":", 1)[1]
        if base in SHAPES:
            s = SHAPES[base]
            return DatasetInfo(name, s.shape, s.num_classes, s.events, f"random input of {base}'s shape")
    elif name in DATASETS:
        return DATASETS[name]
    raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(dataset_names())}")


class TensorLoader:
    """Batches of in-memory tensors: a seeded shuffle per epoch, no per-sample Python work."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.x.device)
        else:
            order = None
        self.epoch += 1
        for i in range(0, n, self.batch_size):
            if order is None:
                yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]
            else:
                idx = order[i:i + self.batch_size]
                yield self.x[idx], self.y[idx]


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits split, from a small cache after the first call (importing scikit-learn costs each fresh
    cell process ~1.4 s; the cache is keyed by scikit-learn's version, so the split is always its own)."""
    import numpy as np

    cache = _digits_cache_path()
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                return tuple(torch.from_numpy(z[k]) for k in ("xtr", "ytr", "xte", "yte"))  # type: ignore[return-value]
        except Exception:  # a damaged cache: rebuild it
            pass
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=360, random_state=0, stratify=d.target)
    out = x[idx_train], y[idx_train], x[idx_test], y[idx_test]
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **{k: v.numpy() for k, v in zip(("xtr", "ytr", "xte", "yte"), out)})
            os.replace(tmp, cache)
        except OSError:
            pass
    return out


def _digits_cache_path():
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        v = version("scikit-learn")
    except PackageNotFoundError:
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "snnbench"
    return root / f"digits_split_sklearn{v}.npz"


def synthetic(name: str, n: int, seed: int, T: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    info = dataset_info(name)
    g = torch.Generator().manual_seed(seed)
    shape = ((T, n) if info.events else (n,)) + info.shape
    x = torch.rand(shape, generator=g)
    if info.events:  # event data is sparse: 0/1 events, one input in ten per frame
        x = (x < 0.1).to(torch.float32)
    return x, torch.randint(0, info.num_classes, (n,), generator=g)


def get_loaders(name: str, batch_size: int, eval_batch_size: int, seed: int, device: str = "cpu",
                data_root: str | None = None, train_subset: int = 0, T: int = 1,
                encoding: str = "frames") -> tuple[TensorLoader, TensorLoader | None]:
    """(train loader, test loader) for a dataset name. Synthetic data has no test loader. Event data comes as
    T frames per sample; ``encoding`` picks count frames or binary spike trains (see bench/realdata.py)."""
    info = dataset_info(name)
    if name.startswith("synthetic:"):
        n = max(batch_size * 4, batch_size)
        x, y = synthetic(name, n, seed, T)
        if info.events:  # [T, N, ...] frames: batch along dim 1
            return FrameLoader(x, y, batch_size, device), None
        return TensorLoader(x, y, batch_size, shuffle=False, device=device), None
    if name == "digits":
        xtr, ytr, xte, yte = load_digits_split()
        if train_subset:
            xtr, ytr = xtr[:train_subset], ytr[:train_subset]
        return (TensorLoader(xtr, ytr, batch_size, True, seed, device),
                TensorLoader(xte, yte, eval_batch_size, False, device=device))
    from . import realdata

    return realdata.loaders(name, data_root, batch_size, eval_batch_size, seed, device, train_subset, T, encoding)


class FrameLoader(TensorLoader):
    """Synthetic event frames ``[T, N, ...]`` batched along N."""

    def __len__(self) -> int:
        return (self.x.shape[1] + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return self.x.shape[1]

    def __iter__(self):
        for i in range(0, self.x.shape[1], self.batch_size):
            yield self.x[:, i:i + self.batch_size], self.y[i:i + self.batch_size]
