"""The papers' datasets: miniature copies in exactly the real formats, read back through the real loaders."""

import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import UsageError
from bench.grid import Cell
from bench.realdata import CIFAR_STATS, IMAGENET_STATS, check_dataset, dataset
from bench.runner import run_cell

REPO = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(0)


def write_cifar(root: Path, name: str, n_train: int = 4, n_test: int = 3) -> dict:
    """Pickle batches as the CIFAR python version stores them: dict of bytes keys, data [N, 3072] uint8 (R, G, B planes)."""
    if name == "cifar10":
        folder, files, key, classes = root / "cifar-10-batches-py", {f"data_batch_{i}": n_train for i in range(1, 6)}, b"labels", 10
        files["test_batch"] = n_test
    else:
        folder, files, key, classes = root / "cifar-100-python", {"train": n_train * 5, "test": n_test}, b"fine_labels", 100
    folder.mkdir(parents=True)
    written = {}
    for f, n in files.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        with open(folder / f, "wb") as fh:
            pickle.dump({b"batch_label": f.encode(), key: labels, b"data": data, b"filenames": [b"x.png"] * n}, fh)
        written[f] = (data, labels)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, name):
    written = write_cifar(tmp_path, name)
    test = dataset(name, tmp_path, train=False)
    train = dataset(name, tmp_path, train=True)
    data, labels = written["test_batch" if name == "cifar10" else "test"]
    assert len(test) == 3 and len(train) == 20
    x, y = test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[1]
    mean, std = CIFAR_STATS[name]
    want = (data[1].reshape(3, 32, 32).astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert np.allclose(x.numpy(), want, atol=1e-5)
    xt, yt = train[0]
    assert xt.shape == (3, 32, 32) and xt.dtype == torch.float32
    first = written["data_batch_1" if name == "cifar10" else "train"][1][0]
    assert yt == first


def write_mnist(root: Path) -> dict:
    """IDX files: big-endian magic 2051 (images) / 2049 (labels), counts, rows, cols, then uint8 data."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = {}
    for split, n in (("train", 5), ("t10k", 3)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())
        imgs[split] = (x, y)
    return imgs


def test_mnist_idx_files(tmp_path):
    imgs = write_mnist(tmp_path)
    test = dataset("mnist", tmp_path, train=False)
    assert len(test) == 3 and len(dataset("mnist", tmp_path, train=True)) == 5
    x, y = test[2]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(imgs["t10k"][1][2])
    assert np.allclose(x.numpy()[0], imgs["t10k"][0][2] / 255.0, atol=1e-7)


def write_imagenet(root: Path, classes=("n01", "n02"), per_class=2, color=(200, 30, 90)):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            d = root / "imagenet" / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (300 + 10 * i, 260), color).save(d / f"{c}_{i}.JPEG", quality=95)


def test_imagenet_folder(tmp_path):
    color = (200, 30, 90)
    write_imagenet(tmp_path, color=color)
    val = dataset("imagenet", tmp_path, train=False)
    train = dataset("imagenet", tmp_path, train=True)
    assert len(val) == 4 and len(train) == 4 and val.classes == ["n01", "n02"]
    x, y = val[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    mean, std = IMAGENET_STATS
    want = (np.array(color) / 255.0 - np.array(mean)) / np.array(std)  # a flat image stays flat through resize and crop
    assert np.allclose(x.mean((1, 2)).numpy(), want, atol=3 / 255 / 0.224)
    assert train[0][0].shape == (3, 224, 224)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "imagenet"])
def test_train_cell_end_to_end(tmp_path, name):
    if name.startswith("cifar"):
        write_cifar(tmp_path, name)
    elif name == "mnist":
        write_mnist(tmp_path)
    else:
        write_imagenet(tmp_path)
    cell = Cell(method="rate_m", arch="cnn_digits", dataset=name, T=2, epochs=1, batch_size=4, eval_batch_size=8,
                warmup_steps=0, arch_options={"widths": [4, 4, 4]})
    res = run_cell(cell, data_root=str(tmp_path))
    assert res.status == "ok", res.row["error"]
    assert 0 <= res.row["acc_top1"] <= 100 and res.row["measured_steps"] >= 0


@pytest.mark.parametrize("name,what", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                       ("mnist", "MNIST/raw"), ("imagenet", "imagenet")])
def test_missing_data_message(tmp_path, name, what):
    with pytest.raises(UsageError, match=f"expected .*{what}.*missing: .*snnbench never downloads"):
        check_dataset(name, tmp_path)
    with pytest.raises(UsageError, match="needs --data-root"):
        check_dataset(name, None)


@pytest.mark.parametrize("grid_data_root", ["empty", "none"])
def test_missing_data_exits_2(tmp_path, grid_data_root):
    g = tmp_path / "g.toml"
    g.write_text('[axes]\nmethod = ["bptt_m"]\narch = ["cnn_digits"]\ndataset = ["cifar10"]\nT = [1]\n')
    args = [sys.executable, str(REPO / "run_bench.py"), "run", str(g), "--out", str(tmp_path / "r")]
    if grid_data_root == "empty":
        (tmp_path / "data").mkdir()
        args += ["--data-root", str(tmp_path / "data")]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("missing: data_batch_1" in r.stderr) if grid_data_root == "empty" else ("needs --data-root" in r.stderr)
    assert "cs.toronto.edu" in r.stderr
