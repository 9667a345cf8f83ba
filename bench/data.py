"""Datasets by name, each from its real on-disk format, and synthetic input of any dataset's shape.

``digits``: the 8x8 digits set that scikit-learn ships (1797 images, 10 classes), scaled to [0, 1],
with a fixed stratified 1437/360 train/test split (random_state 0). No download.

``synthetic:<name>``: random inputs of dataset <name>'s shape (uniform [0, 1); for event datasets T frames of
0/1 events with probability 0.1; fixed seed) and random labels, for profile cells.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import UsageError


@dataclass(frozen=True)
class DatasetInfo:
    """Everything snnbench knows about one dataset: its shape and classes, where and in which files it lies under
    ``--data-root``, how to get it, and the function that opens it (``open(folder, T, encoding)`` -> train and test
    torch Datasets and a collate function, bench/realdata.py). Any dataset also has a synthetic variant
    (``synthetic:<name>``: random input of its shape)."""

    name: str
    shape: tuple[int, ...]  # one frame's shape, [C, H, W]
    num_classes: int
    events: bool = False  # event data: a sample is T frames [T, C, H, W] (T from the cell), batched as [T, B, ...]
    description: str = ""
    folder: str | None = None  # under --data-root (None: in memory, shipped with a dependency)
    expected: tuple[str, ...] = ()  # entries the folder must hold
    how_to_get: str = ""
    open: Callable | None = None  # (folder, T, encoding) -> (train Dataset, test Dataset, collate or None)
    listing: Callable | None = None  # event data: folder -> recordings by split (raises when a class has none)
    arrays: Callable | None = None  # in-memory data: () -> (x_train, y_train, x_test, y_test)


def _specs() -> list[DatasetInfo]:
    from . import realdata as r

    toronto = "https://www.cs.toronto.edu/~kriz/cifar.html"
    return [
        DatasetInfo("digits", (1, 8, 8), 10, description="scikit-learn's 8x8 digits, shipped with the package",
                    arrays=load_digits_split),
        DatasetInfo("cifar10", (3, 32, 32), 10, folder="cifar-10-batches-py",
                    expected=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                    how_to_get=f"the CIFAR-10 python version (cifar-10-python.tar.gz from {toronto}, "
                               "or torchvision.datasets.CIFAR10(root, download=True))", open=r.open_cifar10),
        DatasetInfo("cifar100", (3, 32, 32), 100, folder="cifar-100-python", expected=("train", "test"),
                    how_to_get=f"the CIFAR-100 python version (cifar-100-python.tar.gz from {toronto}, "
                               "or torchvision.datasets.CIFAR100(root, download=True))", open=r.open_cifar100),
        DatasetInfo("mnist", (1, 28, 28), 10, folder="MNIST/raw",
                    expected=("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                              "t10k-labels-idx1-ubyte"),
                    how_to_get="the MNIST IDX files, uncompressed (torchvision.datasets.MNIST(root, download=True) "
                               "puts them there)", open=r.open_mnist),
        DatasetInfo("imagenet", (3, 224, 224), 1000, folder="imagenet", expected=("train", "val"),
                    how_to_get="ILSVRC-2012 as an ImageFolder tree: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val "
                               "sorted into class folders, e.g. with the valprep.sh script)", open=r.open_imagenet),
        DatasetInfo("cifar10_dvs", (2, 48, 48), 10, events=True, folder="CIFAR10-DVS", expected=r.CIFAR10_CLASSES,
                    how_to_get="the ten class zips of CIFAR10-DVS (https://figshare.com/articles/dataset/CIFAR10-DVS_New/"
                               "4724671, airplane.zip ... truck.zip), each extracted to <class>/cifar10_<class>_<i>.aedat",
                    open=r.open_cifar10_dvs, listing=r.cifar10_dvs_files),
        DatasetInfo("nmnist", (2, 34, 34), 10, events=True, folder="NMNIST", expected=("Train", "Test"),
                    how_to_get="N-MNIST's Train.zip and Test.zip (https://www.garrickorchard.com/datasets/n-mnist), "
                               "extracted to Train/<digit>/*.bin and Test/<digit>/*.bin",
                    open=r.open_nmnist, listing=r.nmnist_files),
    ]


DATASETS: dict[str, DatasetInfo] = {}  # the registry, filled below (after load_digits_split is defined)


def dataset_names() -> list[str]:
    return sorted(DATASETS) + [f"synthetic:{n}" for n in sorted(DATASETS)]


def dataset_info(name: str) -> DatasetInfo:
    if name.startswith("synthetic:"):
        base = name.split(":", 1)[1]
        if base in DATASETS:
            s = DATASETS[base]
            return DatasetInfo(name, s.shape, s.num_classes, s.events, f"random input of {base}'s shape")
    elif name in DATASETS:
        return DATASETS[name]
    raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(dataset_names())}")


def check_dataset(name: str, root: str | os.PathLike | None) -> Path:
    """The dataset's folder under ``root``, or a UsageError saying what was expected, where, and how to get it
    (for event datasets also when a class folder holds no recordings)."""
    spec = dataset_info(name)
    if spec.folder is None:
        raise UsageError(f"dataset {name} is not read from a folder")
    if root is None:
        raise UsageError(f"dataset {name} needs --data-root DIR holding {spec.folder}/ ({', '.join(spec.expected)}); "
                         f"get {spec.how_to_get}")
    folder = Path(root) / spec.folder
    missing = [f for f in spec.expected if not (folder / f).exists()]
    if missing:
        raise UsageError(f"dataset {name}: expected {folder}/ with {', '.join(spec.expected)}; missing: "
                         f"{', '.join(missing)}. Get {spec.how_to_get} on a machine with internet and copy it there "
                         "(snnbench never downloads).")
    if spec.listing is not None:
        try:
            spec.listing(folder)
        except UsageError as e:
            raise UsageError(f"dataset {name}: {e}. Get {spec.how_to_get} on a machine with internet "
                             "(snnbench never downloads).") from None
    return folder


def open_dataset(name: str, root, train: bool, T: int = 1, encoding: str = "frames") -> torch.utils.data.Dataset:
    """One split of a dataset read from ``root``, with the paper's preprocessing."""
    spec = dataset_info(name)
    return spec.open(check_dataset(name, root), T, encoding)[0 if train else 1]


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
    if info.arrays is not None:
        xtr, ytr, xte, yte = info.arrays()
        if train_subset:
            xtr, ytr = xtr[:train_subset], ytr[:train_subset]
        return (TensorLoader(xtr, ytr, batch_size, True, seed, device),
                TensorLoader(xte, yte, eval_batch_size, False, device=device))
    train_ds, test_ds, collate = info.open(check_dataset(name, data_root), T, encoding)
    if train_subset:
        train_ds = torch.utils.data.Subset(train_ds, range(min(train_subset, len(train_ds))))
    g = torch.Generator().manual_seed(seed)
    kw = dict(loader_settings(device), collate_fn=collate)
    return (torch.utils.data.DataLoader(train_ds, batch_size, shuffle=True, generator=g, drop_last=False, **kw),
            torch.utils.data.DataLoader(test_ds, eval_batch_size, shuffle=False, **kw))


def loader_settings(device: str) -> dict:
    """DataLoader settings that keep a GPU busy: worker processes, pinned memory, persistent workers."""
    if str(device).startswith("cuda"):
        workers = min(8, os.cpu_count() or 1)
        return {"num_workers": workers, "pin_memory": True, "persistent_workers": workers > 0,
                **({"prefetch_factor": 4} if workers > 0 else {})}
    return {"num_workers": 0, "pin_memory": False}


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


DATASETS.update((d.name, d) for d in _specs())
