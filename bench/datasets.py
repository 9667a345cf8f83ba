"""Every dataset snnbench knows, one ``DatasetInfo`` each, registered beside the code that reads it: adding a
dataset is a reader (or a reused one), an opener and one ``register(DatasetInfo(...))`` in this file.

    digits     in memory: scikit-learn's 8x8 digits (1797 images, 10 classes), scaled to [0, 1], a fixed stratified
               1437/360 train/test split (random_state 0). No download.

The papers' datasets are read from a user's folder in their real on-disk formats. Nothing downloads.

    cifar10    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch}     (the python pickle batches)
    cifar100   <root>/cifar-100-python/{train, test}
    mnist      <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (torchvision's layout, IDX files)
    imagenet   <root>/imagenet/{train,val}/<class>/<image>                   (an ImageFolder tree)
    cifar10_dvs <root>/CIFAR10-DVS/<class>/cifar10_<class>_<i>.aedat         (the figshare zips, extracted)
    nmnist     <root>/NMNIST/{Train,Test}/<digit>/<id>.bin                   (Train.zip / Test.zip, extracted)

Preprocessing as the rate-BP paper (Yu et al., NeurIPS 2024) and its official code: CIFAR training: random crop 32 with
padding 4, horizontal flip, AutoAugment (CIFAR-10 policy), ToTensor, Cutout 16, Normalize; test: ToTensor,
Normalize. ImageNet: RandomResizedCrop 224 + flip / Resize 256 + CenterCrop 224, ImageNet mean and std.

Event data, as the rate-BP paper. CIFAR10-DVS: the jAER AEDAT-2 files (``#`` header lines, then big-endian
(address, timestamp) uint32 pairs; x = bits 1-7, y = bits 8-14, polarity = bit 0), oriented as SpikingJelly
does (x' = 127 - y, y' = 127 - x, p' = 1 - p) so frames match the ones the paper trained on; integrated into
T frames of equal event count (SpikingJelly's ``split_by='number'``: T-1 chunks of N//T events, the rest in the
last), counts per (polarity, y, x), resized to 48x48 (bilinear, antialiased), 9000/1000 train/test by a fixed
permutation (seed 42) of the sorted file list; training adds a horizontal flip (p=0.5) and a roll of up to 5
pixels in each direction. N-MNIST: 5-byte events (x, y, polarity bit 7 of byte 2, 23-bit microsecond
timestamp; y = 240 marks a timestamp overflow of 2^13), 34x34x2, given as T count frames of equal event count,
or — for methods that ask for spike trains (HM2-BP) — binary spikes in T bins of 600 us (an event beyond the
last bin is dropped; two events of one input in one bin are one spike). HM2-BP's saccade stabilisation is not
applied. tonic is not used: its current release reads a re-encoded CIFAR10-DVS (AEDAT4) rather than the
files most users hold, and pulls librosa, h5py and importRosbag for two ~20-line readers.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UsageError


@dataclass(frozen=True)
class DatasetInfo:
    """Everything snnbench knows about one dataset: its shape and classes, where and in which files it lies under
    ``--data-root``, how to get it, and the function that opens it (``open(folder, T, encoding)`` -> train and test
    torch Datasets and a collate function). Any dataset also has a synthetic variant (``synthetic:<name>``: random
    input of its shape, bench/data.py)."""

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
    sizes: tuple[int, int] = (0, 0)  # (train, test) samples of the whole set: what a plan counts steps from


DATASETS: dict[str, DatasetInfo] = {}  # the registry: filled by the register() calls below, one per dataset


def register(spec: DatasetInfo) -> DatasetInfo:
    if spec.name in DATASETS or ":" in spec.name:
        raise ValueError(f"dataset name {spec.name!r} is taken or contains ':'")
    DATASETS[spec.name] = spec
    return spec


# ---------------------------------------------------------------- in memory, shipped with a dependency
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


register(DatasetInfo("digits", (1, 8, 8), 10, sizes=(1437, 360), description="scikit-learn's 8x8 digits, shipped with the package",
                     arrays=load_digits_split))
TORONTO = "https://www.cs.toronto.edu/~kriz/cifar.html"


# ---------------------------------------------------------------- images

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR python batch holds (dicts, lists, bytes, numbers and numpy arrays) and nothing
    else: a pickle can name any callable, and a crafted batch file would otherwise run code when read."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only arrays, lists "
                                         "and bytes (is this file what it claims to be?)")
        return super().find_class(module, name)


def read_cifar(folder: Path, files: list[str], key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3] uint8 and labels [N] int64 from CIFAR python pickle batches."""
    xs, ys = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                d = _CifarUnpickler(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise UsageError(f"{folder / f}: {e}") from None
        if not isinstance(d, dict) or b"data" not in d or key not in d:
            raise UsageError(f"{folder / f} is not a CIFAR python batch (a dict with {b'data'!r} and {key!r})")
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


# ---------------------------------------------------------------- event data

Events = tuple  # (t, x, y, p): int64 arrays of one recording, in file order


def read_cifar10_dvs(path) -> Events:
    """One CIFAR10-DVS recording (jAER AEDAT-2), oriented as SpikingJelly orients it."""
    with open(path, "rb") as fh:
        raw = fh.read()
    start = 0
    while start < len(raw) and raw[start:start + 1] == b"#":  # header lines
        nl = raw.find(b"\n", start)
        start = len(raw) if nl < 0 else nl + 1
    body = raw[start:]
    words = np.frombuffer(body[:len(body) // 8 * 8], dtype=">u4").astype(np.int64)
    addr, t = words[0::2], words[1::2]
    x, y, p = (addr & 0xFE) >> 1, (addr & 0x7F00) >> 8, addr & 1
    return t, 127 - y, 127 - x, 1 - p


def read_nmnist(path) -> Events:
    """One N-MNIST recording: 5 bytes per event, overflow markers (y = 240) removed."""
    b = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    b = b[:len(b) // 5 * 5]
    x, y, p = b[0::5], b[1::5], (b[2::5] & 0x80) >> 7
    t = ((b[2::5] & 0x7F) << 16) | (b[3::5] << 8) | b[4::5]
    overflow = y == 240
    if overflow.any():
        t = t + np.cumsum(overflow) * 2 ** 13
    keep = ~overflow
    return t[keep], x[keep], y[keep], p[keep]


def count_frames(events: Events, T: int, H: int, W: int) -> np.ndarray:
    """[T, 2, H, W] float32 event counts, T frames of equal event count (the last takes the remainder)."""
    t, x, y, p = events
    n = len(t)
    frame = np.minimum(np.arange(n) // max(n // T, 1), T - 1) if n >= T else np.arange(n)
    flat = ((frame * 2 + p) * H + y) * W + x
    return np.bincount(flat, minlength=T * 2 * H * W).astype(np.float32).reshape(T, 2, H, W)


def spike_bins(events: Events, T: int, H: int, W: int, bin_us: int = 600) -> np.ndarray:
    """[T, 2, H, W] float32 binary spike trains: bins of ``bin_us`` from the first event, the first T kept."""
    t, x, y, p = events
    if len(t) == 0:
        return np.zeros((T, 2, H, W), np.float32)
    b = (t - t.min()) // bin_us
    keep = b < T
    flat = ((b[keep] * 2 + p[keep]) * H + y[keep]) * W + x[keep]
    out = np.zeros(T * 2 * H * W, np.float32)
    out[flat] = 1.0
    return out.reshape(T, 2, H, W)


class DVSAugment:
    """Training augmentation of OTTT/SLTT/rate-BP on [T, C, H, W] frames: flip the width with p=0.5, then roll
    by independent offsets in [-shift, shift] along H and W (the same for every frame of a sample)."""

    def __init__(self, shift: int = 5) -> None:
        self.shift = shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        dy, dx = (int(v) for v in torch.randint(-self.shift, self.shift + 1, (2,)))
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def cache_root() -> Path | None:
    """Where event frames are cached: $SNNBENCH_CACHE, else $XDG_CACHE_HOME/snnbench, else ~/.cache/snnbench;
    ``SNNBENCH_CACHE=off`` turns the cache off."""
    env = os.environ.get("SNNBENCH_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "snnbench"


def _describe(f) -> str:
    """A framing function's name and bound parameters (functools.partial), for the cache's key."""
    if isinstance(f, partial):
        return f"{f.func.__module__}.{f.func.__qualname__}{sorted(f.keywords.items())}{f.args}"
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"


class EventFolder(torch.utils.data.Dataset):
    """Event recordings on disk, turned into [T, C, H, W] frames per sample when read, then augmented.

    The frames (before augmentation) are cached, one ``.npy`` per sample, the first time a sample is read
    (as SpikingJelly caches its frame datasets): under ``cache_root()/frames/<name>-<hash>/``, where the hash
    covers every source file's name, size and modification time, the reader, the framing function and its
    parameters (T, resolution, encoding) and the output size. A changed recording or framing gives another
    folder, so a stale cache is never read. Each file is written atomically (a temporary file, then a rename),
    so builders running at once (DataLoader workers, other cells, other ranks) never read half a file."""

    FORMAT = 1

    def __init__(self, files: list[tuple[Path, int]], read, to_frames, size: int | None = None, augment=None,
                 name: str = "events") -> None:
        self.files, self.read, self.to_frames, self.size, self.augment = files, read, to_frames, size, augment
        root = cache_root()
        self.cache = root / "frames" / f"{name}-{self._key()}" if root is not None else None

    def _key(self) -> str:
        import hashlib

        h = hashlib.sha256(f"{self.FORMAT}|{_describe(self.read)}|{_describe(self.to_frames)}|{self.size}".encode())
        for path, label in self.files:
            st = Path(path).stat()
            h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.files)

    def frames(self, i: int) -> torch.Tensor:
        """Sample i's frames, unaugmented: from the cache, or computed (and cached)."""
        cached = self.cache / f"{i}.npy" if self.cache is not None else None
        if cached is not None:
            try:
                return torch.from_numpy(np.load(cached))
            except (OSError, ValueError):
                pass  # not built yet (or being replaced): compute it
        x = torch.from_numpy(self.to_frames(self.read(self.files[i][0])))
        if self.size is not None and x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                                antialias=True)
        if cached is not None:
            try:
                from reports.results import write_atomic

                write_atomic(cached, lambda f: np.save(f, x.numpy()))
            except OSError:
                pass  # a read-only or full cache: go on uncached
        return x

    def __getitem__(self, i: int):
        x = self.frames(i)
        if self.augment is not None:
            x = self.augment(x)
        return x, self.files[i][1]


def _class_files(folder: Path, classes, suffix: str) -> list[tuple[Path, int]]:
    files = []
    for label, c in enumerate(classes):
        found = sorted((folder / c).glob(f"*{suffix}"))
        if not found:
            raise UsageError(f"no *{suffix} files in {folder / c}; expected the extracted recordings")
        files += [(f, label) for f in found]
    return files


def dvs_split(n: int, seed: int = 42, test_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a fixed permutation, the last 10% for test (9000/1000 for the full set)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[:n - n_test]), np.sort(perm[n - n_test:])


def cifar10_dvs_files(folder: Path) -> dict[bool, list[tuple[Path, int]]]:
    """(path, label) of every recording, by split (True: train), from one listing of the folder."""
    files = _class_files(folder, CIFAR10_CLASSES, ".aedat")
    tr, te = dvs_split(len(files))
    return {True: [files[i] for i in tr], False: [files[i] for i in te]}


def nmnist_files(folder: Path) -> dict[bool, list[tuple[Path, int]]]:
    return {train: _class_files(folder / ("Train" if train else "Test"), [str(d) for d in range(10)], ".bin")
            for train in (True, False)}


def time_major(batch):
    """Collate [T, C, H, W] samples into ([T, B, C, H, W], labels), the layout methods take event frames in."""
    xs, ys = zip(*batch)
    return torch.stack(xs, 1), torch.tensor(ys, dtype=torch.long)


# ---------------------------------------------------------------- one opener and one spec per dataset
# open_<dataset>(folder, T, encoding) -> (train Dataset, test Dataset, collate or None)


def open_cifar10(folder: Path, T: int = 1, encoding: str = "frames"):
    train = read_cifar(folder, [f"data_batch_{i}" for i in range(1, 6)], b"labels")
    test = read_cifar(folder, ["test_batch"], b"labels")
    return ArrayImages(*train, cifar_transforms("cifar10", True)), ArrayImages(*test, cifar_transforms("cifar10", False)), None


register(DatasetInfo("cifar10", (3, 32, 32), 10, sizes=(50000, 10000), folder="cifar-10-batches-py",
                     expected=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
                     how_to_get=f"the CIFAR-10 python version (cifar-10-python.tar.gz from {TORONTO}, "
                                "or torchvision.datasets.CIFAR10(root, download=True))", open=open_cifar10))



def open_cifar100(folder: Path, T: int = 1, encoding: str = "frames"):
    train, test = (read_cifar(folder, [f], b"fine_labels") for f in ("train", "test"))
    return (ArrayImages(*train, cifar_transforms("cifar100", True)), ArrayImages(*test, cifar_transforms("cifar100", False)),
            None)


register(DatasetInfo("cifar100", (3, 32, 32), 100, sizes=(50000, 10000), folder="cifar-100-python", expected=("train", "test"),
                     how_to_get=f"the CIFAR-100 python version (cifar-100-python.tar.gz from {TORONTO}, "
                                "or torchvision.datasets.CIFAR100(root, download=True))", open=open_cifar100))



def open_mnist(folder: Path, T: int = 1, encoding: str = "frames"):
    from torchvision import datasets
    from torchvision import transforms as tv

    root = str(folder.parent.parent)  # torchvision reads <root>/MNIST/raw
    return (*(datasets.MNIST(root, train=tr, download=False, transform=tv.ToTensor()) for tr in (True, False)), None)


register(DatasetInfo("mnist", (1, 28, 28), 10, sizes=(60000, 10000), folder="MNIST/raw",
                     expected=("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                               "t10k-labels-idx1-ubyte"),
                     how_to_get="the MNIST IDX files, uncompressed (torchvision.datasets.MNIST(root, download=True) "
                                "puts them there)", open=open_mnist))



def open_imagenet(folder: Path, T: int = 1, encoding: str = "frames"):
    from torchvision import datasets

    return (*(datasets.ImageFolder(str(folder / sub), transform=imagenet_transforms(tr))
              for sub, tr in (("train", True), ("val", False))), None)


register(DatasetInfo("imagenet", (3, 224, 224), 1000, sizes=(1281167, 50000), folder="imagenet", expected=("train", "val"),
                     how_to_get="ILSVRC-2012 as an ImageFolder tree: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val "
                                "sorted into class folders, e.g. with the valprep.sh script)", open=open_imagenet))



def open_cifar10_dvs(folder: Path, T: int = 10, encoding: str = "frames"):
    splits = cifar10_dvs_files(folder)
    to_frames = partial(count_frames, T=T, H=128, W=128)  # picklable: DataLoader workers may be spawned
    return (EventFolder(splits[True], read_cifar10_dvs, to_frames, 48, DVSAugment(5), name="cifar10_dvs-train"),
            EventFolder(splits[False], read_cifar10_dvs, to_frames, 48, name="cifar10_dvs-test"), time_major)


register(DatasetInfo("cifar10_dvs", (2, 48, 48), 10, sizes=(9000, 1000), events=True, folder="CIFAR10-DVS", expected=CIFAR10_CLASSES,
                     how_to_get="the ten class zips of CIFAR10-DVS (https://figshare.com/articles/dataset/CIFAR10-DVS_New/"
                                "4724671, airplane.zip ... truck.zip), each extracted to <class>/cifar10_<class>_<i>.aedat",
                     open=open_cifar10_dvs, listing=cifar10_dvs_files))



def open_nmnist(folder: Path, T: int = 10, encoding: str = "frames"):
    splits = nmnist_files(folder)
    to_frames = partial(spike_bins if encoding == "spikes" else count_frames, T=T, H=34, W=34)
    return (EventFolder(splits[True], read_nmnist, to_frames, name="nmnist-train"),
            EventFolder(splits[False], read_nmnist, to_frames, name="nmnist-test"), time_major)


register(DatasetInfo("nmnist", (2, 34, 34), 10, sizes=(60000, 10000), events=True, folder="NMNIST", expected=("Train", "Test"),
                     how_to_get="N-MNIST's Train.zip and Test.zip (https://www.garrickorchard.com/datasets/n-mnist), "
                                "extracted to Train/<digit>/*.bin and Test/<digit>/*.bin",
                     open=open_nmnist, listing=nmnist_files))
