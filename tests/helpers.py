"""Small helpers shared by the tests."""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _triton_devices() -> list:
    """Where a Triton kernel test runs: on a CPU through Triton's interpreter (where there is no CUDA: Triton picks
    the interpreter once, when first imported, and tests/conftest.py turns it on only then), and compiled on a
    CUDA device (marker gpu, skipped without one)."""
    import pytest
    import torch

    cuda = torch.cuda.is_available()
    return [pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(cuda, reason="Triton runs compiled here: no "
                                                                               "interpreter for CPU tensors")),
            pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


TRITON_DEVICES = _triton_devices()


def cpu_baseline_rows() -> list[dict]:
    """The 20 real cell rows of the committed CPU baseline (ci_cpu on the CI machine)."""
    import pandas as pd

    return pd.read_parquet(REPO / "baselines" / "cpu.parquet").to_dict("records")


def write_rows(out: Path, rows) -> Path:
    """Cell rows into a results folder, one file a cell (as `run` stores them; written without torch)."""
    from reports.results import write_cell

    for row in rows:
        row = dict(row)
        row.pop("schema_version", None)
        write_cell(out, row["key"], row)
    return out


def cli(*args, env=None, timeout=300, cwd=REPO):
    """run_bench.py in a fresh interpreter, as a user runs it (from the repository, unless ``cwd`` says where)."""
    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


class NoOpOptimizer:
    """Stands in for an optimizer so that a test can read the gradients a step produced."""

    def zero_grad(self, set_to_none: bool = True):
        pass

    def step(self):
        pass


def landed(folder: Path, pattern: str) -> bool:
    """A file of ``pattern`` renamed into ``folder``: the atomic writer's temporary (``.NAME.XXXX.tmp``) is in the
    folder before the file is, and does not count."""
    return folder.is_dir() and any(folder.glob(pattern))


def wait_for(pred, timeout=120, what="", poll_s=0.1):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _toml_list(xs) -> str:
    return "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in xs) + "]"


def tiny_grid(name="tiny", methods=("bptt_m",), T=(1,), train_subset=128, dataset="digits", extra="") -> str:
    """A train grid of a 16-unit MLP on a slice of the digits: the smallest cells the real CLI can run."""
    return (f'name = "{name}"\n[axes]\nmethod = {_toml_list(methods)}\narch = ["mlp"]\ndataset = ["{dataset}"]\n'
            f"T = {_toml_list(T)}\n[fixed]\nepochs = 1\nbatch_size = {min(128, train_subset)}\n"
            f"train_subset = {train_subset}\nwarmup_steps = 0\narch_options = {{ widths = [16] }}\n" + extra)


def tiny_profile_grid(name="tiny_profile", methods=("bptt_m",), T=(1, 2), batch_size=8, steps=2, width=8) -> str:
    """A profile grid of a narrow cnn_digits on synthetic CIFAR-10-shaped input: what the gates measure, small."""
    return (f'name = "{name}"\n[axes]\nmethod = {_toml_list(methods)}\narch = ["cnn_digits"]\n'
            f'dataset = ["synthetic:cifar10"]\nT = {_toml_list(T)}\n[fixed]\nkind = "profile"\n'
            f"batch_size = {batch_size}\nwarmup_steps = 1\nsteps = {steps}\n"
            f"arch_options = {{ widths = [{width}, {width}, {width}] }}\n")
