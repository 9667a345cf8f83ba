"""Small helpers shared by the tests."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=300):
    """run_bench.py in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "run_bench.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


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
