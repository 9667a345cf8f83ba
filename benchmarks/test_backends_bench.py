"""The backends benchmark runs and prints its figures (sizes shrunk; on a CPU Triton's times are the
interpreter's, which the output says)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("backends.py")


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_neuron_benchmark_prints_every_backend_and_t():
    r = _run("neuron", "--device", "cpu", "--T", "2,4", "--batch", "2", "--channels", "4", "--size", "4",
             "--rounds", "2", "--warmup", "1", "--backends", "torch,triton")
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert {(row[0], row[1]) for row in rows} == {(t, b) for t in ("2", "4") for b in ("torch", "triton")}
    assert all(float(row[2]) > 0 for row in rows) and "(interpreter)" in r.stdout


def test_step_benchmark_gives_ratios_to_torch():
    r = _run("step", "--device", "cpu", "--arch", "cnn_digits", "--batch", "8", "--T", "2", "--methods", "rate_m",
             "--backends", "torch,triton", "--precision", "fp32,bf16", "--rounds", "2", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("rate_m")]
    assert [(row[2], row[3]) for row in rows] == [("torch", "fp32"), ("torch", "bf16"), ("triton", "fp32"),
                                                  ("triton", "bf16")]
    assert rows[0][5] == "1.00" and all(float(row[4]) > 0 for row in rows)


def test_bad_backend_is_exit_2():
    r = _run("neuron", "--device", "cpu", "--backends", "torch,cuda_graphs")
    assert r.returncode == 2 and "unknown backend" in r.stderr and "Traceback" not in r.stderr
