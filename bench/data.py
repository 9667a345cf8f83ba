"""Datasets by name (the registry of bench/datasets.py), their loaders, and synthetic input of any dataset's shape.

``synthetic:<name>``: random inputs of dataset <name>'s shape (uniform [0, 1); for event datasets T frames of
0/1 events with probability 0.1; fixed seed) and random labels, for profile cells.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .datasets import DATASETS, DatasetInfo
from .errors import UsageError


def dataset_names() -> list[str]:
    return sorted(DATASETS) + [f"synthetic:{n}" for n in sorted(DATASETS)]


def dataset_info(name: str) -> DatasetInfo:
    if name.startswith("synthetic:"):
        base = name.split(":", 1)[1]
        if base in DATASETS:
            s = DATASETS[base]
            return DatasetInfo(name, s.shape, s.num_classes, s.events, f"random input of {base}'s shape", sizes=s.sizes)
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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` (0-based) of a cell seeded ``seed``: its order and its samples' augmentation."""
    return seed * 100003 + epoch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch`` (0-based): a function of the seed and the epoch alone, so that a cell
    resumed in the middle of an epoch continues the same permutation."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


Shard = tuple[int, int]  # (rank, world): this rank's part of every global batch (a multi-device cell)


def shard_of(idx: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """This rank's part of one global batch of sample indices: every world-th from its rank on, after the batch is
    cut to a multiple of world (so every rank gets as many samples, and each rank's mean loss weighs alike; at
    most world - 1 samples of an epoch's last batch are left out)."""
    if shard is None:
        return idx
    rank, world = shard
    return idx[rank:len(idx) - len(idx) % world:world]


def global_batches(n: int, batch_size: int, shard: Shard | None) -> int:
    """The number of batches of an epoch of n samples: those that still hold a sample for every rank."""
    full, rest = divmod(n, batch_size)
    world = shard[1] if shard else 1
    return full + (1 if rest - rest % world > 0 else 0)


def test_share(n: int, shard: Shard | None) -> range:
    """The test samples a rank evaluates: every world-th, so the ranks cover the whole test set once."""
    return range(n) if shard is None else range(shard[0], n, shard[1])


class TensorLoader:
    """Batches of in-memory tensors: a seeded shuffle per epoch, no per-sample Python work. With ``shard``, each
    batch is this rank's part of the global batch of ``batch_size`` samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 device: str | torch.device = "cpu", shard: Shard | None = None) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.seed, self.shard = batch_size, shuffle, seed, shard
        self.epoch = 0

    def __len__(self) -> int:
        return global_batches(self.num_samples, self.batch_size, self.shard)

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def __iter__(self):
        self.epoch += 1
        return self.batches(self.epoch - 1)

    def batches(self, epoch: int, start: int = 0):
        """The batches of epoch ``epoch`` (0-based) from batch ``start`` on."""
        n = len(self.x)
        order = epoch_order(n, self.seed, epoch).to(self.x.device) if self.shuffle else None
        for i in range(start * self.batch_size, n, self.batch_size):
            if order is None and self.shard is None:  # a batch of its own, as a DataLoader's collate gives: a view
                # would hold the whole set's storage, which the saved-bytes meter would count for a saved input
                yield self.x[i:i + self.batch_size].clone(), self.y[i:i + self.batch_size].clone()
                continue
            idx = order[i:i + self.batch_size] if order is not None else torch.arange(i, min(i + self.batch_size, n))
            idx = shard_of(idx, self.shard)
            if len(idx):
                yield self.x[idx], self.y[idx]


class EpochSampler(torch.utils.data.Sampler):
    """A DataLoader's sample order: ``epoch_order`` of the epoch, from sample ``start`` on. Yields (index, seed of
    that sample's augmentation) pairs for ``SeededSamples``."""

    def __init__(self, n: int, seed: int, batch_size: int = 1, shard: Shard | None = None) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.batch_size, self.shard = batch_size, shard

    def _indices(self) -> torch.Tensor:
        order = epoch_order(self.n, self.seed, self.epoch)[self.start:]
        if self.shard is None:
            return order
        return torch.cat([shard_of(order[i:i + self.batch_size], self.shard)
                          for i in range(0, len(order), self.batch_size)] or [order[:0]])

    def __len__(self) -> int:
        """The samples ``__iter__`` yields (``start`` is a whole number of batches): no permutation drawn."""
        if self.shard is None:
            return self.n - self.start
        world = self.shard[1]
        full, rest = divmod(self.n - self.start, self.batch_size)
        return full * (self.batch_size // world) + (rest - rest % world) // world

    def __iter__(self):
        base = epoch_seed(self.seed, self.epoch) * self.n
        for i in self._indices().tolist():
            yield i, base + i


class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose random augmentation of a sample depends only on (seed, epoch, index): the same crops and
    flips whether the epoch runs whole, resumes from a checkpoint, or is read by any number of loader workers. In
    the main process the training RNG is left as it was."""

    def __init__(self, ds: torch.utils.data.Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        i, sample_seed = item
        if torch.utils.data.get_worker_info() is not None:  # a loader worker: its RNG is its own
            torch.manual_seed(sample_seed)
            return self.ds[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.ds[i]


class ResumableLoader:
    """A DataLoader over a dataset read from disk, shuffled by ``EpochSampler``, with ``batches(epoch, start)``
    as TensorLoader's."""

    def __init__(self, ds: torch.utils.data.Dataset, batch_size: int, seed: int, shard: Shard | None = None,
                 **kw) -> None:
        self.sampler = EpochSampler(len(ds), seed, batch_size, shard)
        self.batch_size, self.shard = batch_size, shard
        local = batch_size // shard[1] if shard else batch_size  # a rank's part of each global batch
        self.loader = torch.utils.data.DataLoader(SeededSamples(ds), local, sampler=self.sampler,
                                                  generator=torch.Generator().manual_seed(seed), **kw)
        self.epoch = 0

    def __len__(self) -> int:
        return global_batches(self.sampler.n, self.batch_size, self.shard)

    @property
    def num_samples(self) -> int:
        return self.sampler.n

    def __iter__(self):
        self.epoch += 1
        return self.batches(self.epoch - 1)

    def batches(self, epoch: int, start: int = 0):
        self.sampler.epoch, self.sampler.start = epoch, min(start * self.batch_size, self.sampler.n)
        return iter(self.loader)


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
                encoding: str = "frames", shard: Shard | None = None,
                ) -> tuple[TensorLoader | ResumableLoader, TensorLoader | torch.utils.data.DataLoader | None]:
    """(train loader, test loader) for a dataset name. Synthetic data has no test loader. Event data comes as
    T frames per sample; ``encoding`` picks count frames or binary spike trains (see bench/datasets.py).
    ``shard=(rank, world)``: a rank's loaders in a multi-device cell: its part of every global batch of
    ``batch_size`` samples (a multiple of world), and every world-th test sample."""
    if shard is not None and batch_size % shard[1]:
        raise ValueError(f"batch_size {batch_size} does not split over {shard[1]} devices")
    info = dataset_info(name)
    if name.startswith("synthetic:"):
        n = max(batch_size * 4, batch_size)
        x, y = synthetic(name, n, seed, T)
        if info.events:  # [T, N, ...] frames: batch along dim 1
            return FrameLoader(x, y, batch_size, device, shard), None
        return TensorLoader(x, y, batch_size, shuffle=False, device=device, shard=shard), None
    if info.arrays is not None:
        xtr, ytr, xte, yte = info.arrays()
        if train_subset:
            xtr, ytr = xtr[:train_subset], ytr[:train_subset]
        if shard is not None:
            part = torch.tensor(test_share(len(yte), shard))
            xte, yte = xte[part], yte[part]
        return (TensorLoader(xtr, ytr, batch_size, True, seed, device, shard),
                TensorLoader(xte, yte, eval_batch_size, False, device=device))
    train_ds, test_ds, collate = info.open(check_dataset(name, data_root), T, encoding)
    if train_subset:
        train_ds = torch.utils.data.Subset(train_ds, range(min(train_subset, len(train_ds))))
    if shard is not None:
        test_ds = torch.utils.data.Subset(test_ds, test_share(len(test_ds), shard))
    kw = dict(loader_settings(device), collate_fn=collate)
    return (ResumableLoader(train_ds, batch_size, seed, shard, drop_last=False, **kw),
            torch.utils.data.DataLoader(test_ds, eval_batch_size, shuffle=False, **kw))


def available_cpus() -> int:
    """The CPUs this process may use: a Slurm task's allocation, else its affinity mask, else the machine's."""
    n = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if n.isdigit() and int(n) > 0:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_settings(device: str) -> dict:
    """DataLoader settings that keep a GPU busy: worker processes, pinned memory, persistent workers."""
    if str(device).startswith("cuda"):
        workers = min(8, available_cpus())
        return {"num_workers": workers, "pin_memory": True, "persistent_workers": workers > 0,
                **({"prefetch_factor": 4} if workers > 0 else {})}
    return {"num_workers": 0, "pin_memory": False}


class FrameLoader(TensorLoader):
    """Synthetic event frames ``[T, N, ...]`` batched along N."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str | torch.device = "cpu",
                 shard: Shard | None = None) -> None:
        super().__init__(x, y, batch_size, False, 0, device, shard)

    @property
    def num_samples(self) -> int:
        return self.x.shape[1]

    def batches(self, epoch: int, start: int = 0):
        n = self.x.shape[1]
        for i in range(start * self.batch_size, n, self.batch_size):
            idx = shard_of(torch.arange(i, min(i + self.batch_size, n)), self.shard)
            if len(idx):
                yield self.x[:, idx], self.y[idx]

