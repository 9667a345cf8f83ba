"""Small helpers shared by the tests."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_grid(name="tiny", methods=("bptt_m",), T=(1,), train_subset=128, dataset="digits", extra="") -> str:
    """A train grid of a 16-unit MLP on a slice of the digits: the smallest cells the real CLI can run."""
    q = lambda xs: "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in xs) + "]"  # noqa: E731
    return (f'name = "{name}"\n[axes]\nmethod = {q(methods)}\narch = ["mlp"]\ndataset = ["{dataset}"]\nT = {q(T)}\n'
            f"[fixed]\nepochs = 1\nbatch_size = {min(128, train_subset)}\ntrain_subset = {train_subset}\n"
            "warmup_steps = 0\narch_options = { widths = [16] }\n" + extra)
