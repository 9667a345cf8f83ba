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
from bench.data import check_dataset, open_dataset
from bench.datasets import CIFAR_STATS, IMAGENET_STATS
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
    test = open_dataset(name, tmp_path, train=False)
    train = open_dataset(name, tmp_path, train=True)
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
    test = open_dataset("mnist", tmp_path, train=False)
    assert len(test) == 3 and len(open_dataset("mnist", tmp_path, train=True)) == 5
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
    val = open_dataset("imagenet", tmp_path, train=False)
    train = open_dataset("imagenet", tmp_path, train=True)
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


@pytest.mark.parametrize("name,missing,how", [("cifar10", "data_batch_1", "cs.toronto.edu"),
                                              ("cifar10_dvs", "airplane", "figshare.com"),
                                              ("nmnist", "Train", "garrickorchard.com")])
@pytest.mark.parametrize("grid_data_root", ["empty", "none"])
def test_missing_data_exits_2(tmp_path, grid_data_root, name, missing, how):
    g = tmp_path / "g.toml"
    g.write_text(f'[axes]\nmethod = ["bptt_m"]\narch = ["cnn_digits"]\ndataset = ["{name}"]\nT = [1]\n')
    args = [sys.executable, str(REPO / "run_bench.py"), "run", str(g), "--out", str(tmp_path / "r")]
    if grid_data_root == "empty":
        (tmp_path / "data").mkdir()
        args += ["--data-root", str(tmp_path / "data")]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"missing: {missing}" in r.stderr) if grid_data_root == "empty" else ("needs --data-root" in r.stderr)
    assert how in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- event data

def write_aedat(path: Path, events: list[tuple[int, int, int, int]]) -> None:
    """A jAER AEDAT-2 file as CIFAR10-DVS ships it. ``events`` are (t, x, y, p) in SpikingJelly's orientation;
    the file holds the sensor's raw address: raw x = 127 - y, raw y = 127 - x, raw p = 1 - p."""
    words = []
    for t, x, y, p in events:
        raw_x, raw_y, raw_p = 127 - y, 127 - x, 1 - p
        words += [(raw_y << 8) | (raw_x << 1) | raw_p, t]
    header = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# Data format is int32 address, int32 timestamp\r\n"
    path.write_bytes(header + struct.pack(f">{len(words)}I", *words))


def random_events(n: int, size: int, t_step: int = 37) -> list[tuple[int, int, int, int]]:
    t = np.cumsum(rng.integers(1, t_step, size=n))
    return [(int(t[i]), int(rng.integers(size)), int(rng.integers(size)), int(rng.integers(2))) for i in range(n)]


def write_cifar10_dvs(root: Path, per_class: int = 2, n_events: int = 57) -> dict:
    written = {}
    for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
        (root / "CIFAR10-DVS" / c).mkdir(parents=True)
        for i in range(per_class):
            ev = random_events(n_events, 128)
            write_aedat(root / "CIFAR10-DVS" / c / f"cifar10_{c}_{i}.aedat", ev)
            written[(c, i)] = ev
    return written


def loop_count_frames(events, T: int, H: int, W: int) -> np.ndarray:
    """Frames by a loop over events: T chunks of n // T events, the remainder in the last chunk."""
    out = np.zeros((T, 2, H, W))
    per = len(events) // T
    for k, (_, x, y, p) in enumerate(events):
        out[min(k // per, T - 1), p, y, x] += 1
    return out


def pil_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of each channel through PIL's float images (an implementation independent of torch)."""
    from PIL import Image

    return np.stack([[np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
                      for ch in frame] for frame in frames])


def test_cifar10_dvs_aedat_files(tmp_path):
    from bench.datasets import dvs_split

    written = write_cifar10_dvs(tmp_path)
    train, test = open_dataset("cifar10_dvs", tmp_path, True, 10), open_dataset("cifar10_dvs", tmp_path, False, 10)
    assert len(train) == 18 and len(test) == 2
    order = [(c, i) for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
             for i in range(2)]
    _, test_idx = dvs_split(20)
    for k, idx in enumerate(test_idx):
        c, i = order[idx]
        x, y = test[k]
        assert x.shape == (10, 2, 48, 48) and x.dtype == torch.float32 and y == idx // 2
        want = pil_resize(loop_count_frames(written[(c, i)], 10, 128, 128), 48)
        assert np.allclose(x.numpy(), want, atol=1e-4, rtol=1e-3)
    # a training sample is the unaugmented frames flipped or not, then rolled by at most 5 pixels
    xt, yt = train[0]
    c, i = order[dvs_split(20)[0][0]]
    base = torch.from_numpy(pil_resize(loop_count_frames(written[(c, i)], 10, 128, 128), 48)).float()
    assert any(torch.allclose(xt, torch.roll(b, (dy, dx), (-2, -1)), atol=1e-4, rtol=1e-3)
               for b in (base, base.flip(-1)) for dy in range(-5, 6) for dx in range(-5, 6))


def test_dvs_split_is_9000_1000_and_fixed():
    from bench.datasets import dvs_split

    tr, te = dvs_split(10000)
    assert len(tr) == 9000 and len(te) == 1000 and not set(tr) & set(te)
    assert np.array_equal(dvs_split(10000)[1], te)


def write_nmnist_bin(path: Path, events, overflow_after: int | None = None) -> None:
    """N-MNIST's 40-bit events: x, y, then polarity in bit 7 and a 23-bit microsecond timestamp.
    An event with y = 240 marks a timestamp overflow (2^13 added to the following events)."""
    out = bytearray()
    for k, (t, x, y, p) in enumerate(events):
        if overflow_after is not None and k == overflow_after:
            out += bytes([0, 240, 0, 0, 0])
        ts = t - (2 ** 13 if overflow_after is not None and k >= overflow_after else 0)
        out += bytes([x, y, (p << 7) | (ts >> 16), (ts >> 8) & 0xFF, ts & 0xFF])
    path.write_bytes(bytes(out))


def write_nmnist(root: Path, n_events: int = 41) -> dict:
    written = {}
    for split in ("Train", "Test"):
        for d in range(10):
            (root / "NMNIST" / split / str(d)).mkdir(parents=True)
            ev = sorted(random_events(n_events, 34, t_step=400))
            ev = [(t + 2 ** 13 if k >= 20 else t, x, y, p) for k, (t, x, y, p) in enumerate(ev)]  # spans an overflow
            write_nmnist_bin(root / "NMNIST" / split / str(d) / f"{d:05d}.bin", ev, overflow_after=20)
            written[(split, d)] = ev
    return written


def test_nmnist_bin_files_frames_and_spikes(tmp_path):
    from bench.datasets import read_nmnist

    written = write_nmnist(tmp_path)
    ev = written[("Test", 3)]
    t, x, y, p = read_nmnist(tmp_path / "NMNIST" / "Test" / "3" / "00003.bin")
    assert [tuple(map(int, e)) for e in zip(t, x, y, p)] == ev
    frames = open_dataset("nmnist", tmp_path, False, 6)
    assert len(frames) == 10
    xf, yf = frames[3]
    assert xf.shape == (6, 2, 34, 34) and xf.dtype == torch.float32 and yf == 3
    assert np.array_equal(xf.numpy(), loop_count_frames(ev, 6, 34, 34))
    spikes = open_dataset("nmnist", tmp_path, False, 30, encoding="spikes")
    xs, _ = spikes[3]
    want = np.zeros((30, 2, 34, 34))
    for tt, xx, yy, pp in ev:
        b = (tt - ev[0][0]) // 600
        if b < 30:
            want[b, pp, yy, xx] = 1.0
    assert xs.shape == (30, 2, 34, 34) and np.array_equal(xs.numpy(), want) and 0 < want.sum() < len(ev) + 1


def test_event_datasets_pickle_for_spawned_workers(tmp_path):
    write_nmnist(tmp_path)
    write_cifar10_dvs(tmp_path)
    for ds in (open_dataset("nmnist", tmp_path, True, 4, "spikes"), open_dataset("cifar10_dvs", tmp_path, True, 4)):
        clone = pickle.loads(pickle.dumps(ds))
        torch.manual_seed(0)
        a = ds[0][0]
        torch.manual_seed(0)
        assert torch.equal(clone[0][0], a)


def test_event_batches_are_time_major(tmp_path):
    from bench.data import get_loaders

    write_nmnist(tmp_path)
    train, test = get_loaders("nmnist", 4, 8, 0, data_root=str(tmp_path), T=5)
    x, y = next(iter(train))
    assert x.shape == (5, 4, 2, 34, 34) and y.shape == (4,) and y.dtype == torch.long
    x, y = next(iter(test))
    assert x.shape == (5, 8, 2, 34, 34) and y.tolist() == list(range(8))


@pytest.mark.parametrize("name", ["cifar10_dvs", "nmnist"])
def test_event_train_cell_end_to_end(tmp_path, name):
    (write_cifar10_dvs if name == "cifar10_dvs" else write_nmnist)(tmp_path)
    cell = Cell(method="bptt_m", arch="cnn_digits", dataset=name, T=3, epochs=1, batch_size=4, eval_batch_size=8,
                warmup_steps=0, arch_options={"widths": [4, 4, 4]})
    res = run_cell(cell, data_root=str(tmp_path))
    assert res.status == "ok", res.row["error"]
    assert 0 <= res.row["acc_top1"] <= 100 and res.row["measured_steps"] >= 0


@pytest.mark.parametrize("name,what", [("cifar10_dvs", "CIFAR10-DVS/ with airplane"), ("nmnist", "NMNIST/ with Train, Test")])
def test_missing_event_data_message(tmp_path, name, what):
    with pytest.raises(UsageError, match=f"expected .*{what}.*snnbench never downloads"):
        check_dataset(name, tmp_path)
    # folders present but a class folder without recordings
    (write_cifar10_dvs if name == "cifar10_dvs" else write_nmnist)(tmp_path)
    victim = tmp_path / ("CIFAR10-DVS/ship" if name == "cifar10_dvs" else "NMNIST/Test/7")
    for f in victim.iterdir():
        f.unlink()
    with pytest.raises(UsageError, match=f"no \\*\\.(aedat|bin) files in .*{victim.name}.*never downloads"):
        check_dataset(name, tmp_path)


def test_digits_split_cache_equals_scikit_learn(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from bench.datasets import _digits_cache_path, load_digits_split

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = load_digits()
    tr, te = train_test_split(range(1797), test_size=360, random_state=0, stratify=d.target)
    first = load_digits_split()
    assert _digits_cache_path().exists()
    second = load_digits_split()  # from the cache
    for got in (first, second):
        xtr, ytr, xte, yte = got
        assert np.allclose(xtr.squeeze(1).numpy(), d.images[tr] / 16.0) and np.array_equal(ytr.numpy(), d.target[tr])
        assert np.allclose(xte.squeeze(1).numpy(), d.images[te] / 16.0) and np.array_equal(yte.numpy(), d.target[te])
        assert xtr.dtype == torch.float32 and ytr.dtype == torch.long
    _digits_cache_path().write_bytes(b"damaged")
    assert torch.equal(load_digits_split()[1], first[1])  # a damaged cache is rebuilt


def test_event_frames_are_cached_per_sample_and_rebuilt_when_a_recording_changes(tmp_path, monkeypatch):
    """The first read of a sample computes and caches its frames; later reads come from the cache (the reader is
    not called), equal to the computed ones; a changed recording or another T gives another cache."""
    monkeypatch.setenv("SNNBENCH_CACHE", str(tmp_path / "cache"))
    write_cifar10_dvs(tmp_path / "data")
    test = open_dataset("cifar10_dvs", tmp_path / "data", False, 10)
    first = [test[i][0] for i in range(len(test))]
    files = sorted(test.cache.glob("*.npy"))
    assert len(files) == len(test) == 2
    calls = []
    again = open_dataset("cifar10_dvs", tmp_path / "data", False, 10)
    again.read = lambda p: calls.append(p)  # a read would fail: the frames must come from the cache
    assert again.cache == test.cache and all(torch.equal(again[i][0], first[i]) for i in range(len(again)))
    assert calls == []
    assert open_dataset("cifar10_dvs", tmp_path / "data", False, 8).cache != test.cache  # other framing
    path, _ = test.files[0]
    write_aedat(path, random_events(99, 128))  # the recording changed: its size and mtime with it
    changed = open_dataset("cifar10_dvs", tmp_path / "data", False, 10)
    assert changed.cache != test.cache
    want = pil_resize(loop_count_frames(read_events_as_list(path), 10, 128, 128), 48)
    assert np.allclose(changed[0][0].numpy(), want, atol=1e-4, rtol=1e-3)


def read_events_as_list(path):
    from bench.datasets import read_cifar10_dvs

    t, x, y, p = read_cifar10_dvs(path)
    return list(zip(t.tolist(), x.tolist(), y.tolist(), p.tolist()))


def test_event_cache_built_by_two_processes_at_once_is_whole(tmp_path):
    """Two processes build one cache at the same time (as two cells, two ranks or loader workers may): every
    cached sample equals the frames computed without a cache."""
    import os
    import subprocess
    import sys

    write_cifar10_dvs(tmp_path / "data", per_class=3)
    code = ("import sys; from bench.data import open_dataset; d = open_dataset('cifar10_dvs', sys.argv[1], True, 10)\n"
            "for i in range(len(d)): d.frames(i)\nprint(d.cache)")
    env = {**os.environ, "SNNBENCH_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data")], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    os.environ["SNNBENCH_CACHE"], old = "off", os.environ.get("SNNBENCH_CACHE")
    try:
        plain = open_dataset("cifar10_dvs", tmp_path / "data", True, 10)
        assert plain.cache is None
        for i in range(len(plain)):
            assert np.array_equal(np.load(Path(outs[0]) / f"{i}.npy"), plain.frames(i).numpy())
    finally:
        os.environ["SNNBENCH_CACHE"] = old
    assert not list(Path(outs[0]).glob(".*.tmp"))  # no temporary file left behind
