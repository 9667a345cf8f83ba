"""The papers' datasets, read from a user's folder in their real on-disk formats. Nothing downloads.

    cifar10    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch}     (the python pickle batches)
    cifar100   <root>/cifar-100-python/{train, test}
    mnist      <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (torchvision's layout, IDX files)
    imagenet   <root>/imagenet/{train,val}/<class>/<image>                   (an ImageFolder tree)

Preprocessing as the rate-BP paper (shared/research/paper.md §3): CIFAR training: random crop 32 with
padding 4, horizontal flip, AutoAugment (CIFAR-10 policy), ToTensor, Cutout 16, Normalize; test: ToTensor,
Normalize. ImageNet: RandomResizedCrop 224 + flip / Resize 256 + CenterCrop 224, ImageNet mean and std.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                "the CIFAR-10 python version (cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
                "or torchvision.datasets.CIFAR10(root, download=True))"),
    "cifar100": ("cifar-100-python", ["train", "test"],
                 "the CIFAR-100 python version (cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
                 "or torchvision.datasets.CIFAR100(root, download=True))"),
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                            "t10k-labels-idx1-ubyte"],
              "the MNIST IDX files, uncompressed (torchvision.datasets.MNIST(root, download=True) puts them there)"),
    "imagenet": ("imagenet", ["train", "val"],
                 "ILSVRC-2012 as an ImageFolder tree: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val sorted into "
                 "class folders, e.g. with the valprep.sh script)"),
}


def check_dataset(name: str, root: str | os.PathLike | None) -> Path:
    """The dataset's folder, or a UsageError saying what was expected, where, and how to get it."""
    if name not in LAYOUT:
        raise UsageError(f"no on-disk layout for dataset {name!r}")
    sub, files, how = LAYOUT[name]
    if root is None:
        raise UsageError(f"dataset {name} needs --data-root DIR holding {sub}/ ({', '.join(files)}); get {how}")
    folder = Path(root) / sub
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise UsageError(f"dataset {name}: expected {folder}/ with {', '.join(files)}; missing: {', '.join(missing)}. "
                         f"Get {how} on a machine with internet and copy it there (snnbench never downloads).")
    return folder


def read_cifar(name: str, root, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3] uint8 and labels [N] int64 from the python pickle batches."""
    folder = check_dataset(name, root)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = b"labels"
    else:
        files = ["train" if train else "test"]
        key = b"fine_labels"
    xs, ys = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class Cutout:
    """One square hole of side ``size`` (zeros) at a uniformly random centre, clipped at the border
    (DeVries & Taylor; the rate-BP code applies it to the tensor before Normalize)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - self.size // 2, 0), min(cy + self.size // 2, h)
        x0, x1 = max(cx - self.size // 2, 0), min(cx + self.size // 2, w)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img


def cifar_transforms(name: str, train: bool):
    from torchvision import transforms as T

    mean, std = CIFAR_STATS[name]
    if not train:
        return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                      T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.ToTensor(), Cutout(16), T.Normalize(mean, std)])


def imagenet_transforms(train: bool):
    from torchvision import transforms as T

    mean, std = IMAGENET_STATS
    if train:
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])


class ArrayImages(torch.utils.data.Dataset):
    """uint8 HWC images in memory, given to a torchvision transform as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def dataset(name: str, root, train: bool) -> torch.utils.data.Dataset:
    """The torch Dataset of a real dataset, with the paper's preprocessing."""
    if name in ("cifar10", "cifar100"):
        x, y = read_cifar(name, root, train)
        return ArrayImages(x, y, cifar_transforms(name, train))
    if name == "mnist":
        from torchvision import datasets
        from torchvision import transforms as T

        check_dataset(name, root)
        return datasets.MNIST(str(root), train=train, download=False, transform=T.ToTensor())
    if name == "imagenet":
        from torchvision import datasets

        folder = check_dataset(name, root)
        return datasets.ImageFolder(str(folder / ("train" if train else "val")), transform=imagenet_transforms(train))
    raise UsageError(f"no reader for dataset {name!r}")


def loader_settings(device: str) -> dict:
    """DataLoader settings that keep a GPU busy: worker processes, pinned memory, persistent workers."""
    if str(device).startswith("cuda"):
        workers = min(8, os.cpu_count() or 1)
        return {"num_workers": workers, "pin_memory": True, "persistent_workers": workers > 0,
                **({"prefetch_factor": 4} if workers > 0 else {})}
    return {"num_workers": 0, "pin_memory": False}


def loaders(name: str, root, batch_size: int, eval_batch_size: int, seed: int, device: str, train_subset: int = 0):
    train_ds, test_ds = dataset(name, root, True), dataset(name, root, False)
    if train_subset:
        train_ds = torch.utils.data.Subset(train_ds, range(min(train_subset, len(train_ds))))
    g = torch.Generator().manual_seed(seed)
    kw = loader_settings(device)
    return (torch.utils.data.DataLoader(train_ds, batch_size, shuffle=True, generator=g, drop_last=False, **kw),
            torch.utils.data.DataLoader(test_ds, eval_batch_size, shuffle=False, **kw))
