"""benchmarks/rounding.py: its emulated fused multiply-add rounds once (never farther from the exact value than
eager torch's two roundings, and sometimes nearer), and the benchmark prints its figures."""

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("rounding.py")
sys.path.insert(0, str(SCRIPT.parent))


def test_the_emulated_fma_rounds_once():
    from rounding import eager_charge, fused_charge

    from methods.neuron import get_preset

    cfg = get_preset("rbp")
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(200_000, generator=g) * 2, torch.randn(200_000, generator=g) * 2
    exact = torch.tensor(cfg.decay, dtype=torch.float32).double() * v.double() + x.double()  # exact to 2^-53
    fused, eager = fused_charge(v, x, cfg), eager_charge(v, x, cfg)
    e_fused, e_eager = (fused.double() - exact).abs(), (eager.double() - exact).abs()
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(1e-30)
    assert bool((e_fused <= 0.5 * ulp + 1e-30).all())  # the nearest float32: one rounding
    assert bool((e_fused <= e_eager).all()) and int((fused != eager).sum()) > 0  # two roundings sometimes lose


def test_rounding_benchmark_prints_its_figures():
    r = subprocess.run([sys.executable, str(SCRIPT), "--batch", "8", "--T", "2", "--methods", "bptt_m,rate_m"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "neuron-steps" in r.stdout and "fire differently" in r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("bptt_m", "rate_m"))]
    assert [row[0] for row in rows] == ["bptt_m", "rate_m"] and all(float(row[1]) >= 0 for row in rows)
    bad = subprocess.run([sys.executable, str(SCRIPT), "--methods", "nosuch"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown method(s) nosuch" in bad.stderr and "Traceback" not in bad.stderr
