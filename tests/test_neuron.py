"""LIF forward and surrogate backward against a brute-force float64 loop written here."""

import math

import pytest
import torch

from methods.layers import LIF, configure
from methods.neuron import PRESETS, NeuronConfig, get_preset


def sg_ref(name, x, alpha):
    if name == "sigmoid":
        s = 1.0 / (1.0 + math.exp(-alpha * x))
        return alpha * s * (1.0 - s)
    if name == "triangle":
        return max(0.0, alpha - alpha * alpha * abs(x))
    if name == "rectangle":
        return (1.0 / alpha) if abs(x) <= alpha / 2 else 0.0
    raise AssertionError(name)


def lif_ref(xs, w, cfg):
    """Per-neuron scalar loop: forward spikes, and dL/dx for L = sum_t w_t * s_t by reverse-mode by hand."""
    T, N = len(xs), len(xs[0])
    lam, th, vr = cfg.decay, cfg.threshold, cfg.v_reset
    spikes = [[0.0] * N for _ in range(T)]
    gx = [[0.0] * N for _ in range(T)]
    for n in range(N):
        v = vr if cfg.reset == "hard" else 0.0
        hs, ss = [], []
        for t in range(T):
            h = lam * v + xs[t][n] + ((1 - lam) * vr if cfg.reset == "hard" else 0.0)
            s = 1.0 if h - th >= 0 else 0.0
            v = h - th * s if cfg.reset == "soft" else h * (1 - s) + vr * s
            hs.append(h)
            ss.append(s)
            spikes[t][n] = s
        gv = 0.0  # dL/dV_t
        for t in reversed(range(T)):
            g = sg_ref(cfg.surrogate, hs[t] - th, cfg.alpha)
            if cfg.reset == "soft":
                dvdh = 1.0 if cfg.detach_reset else 1.0 - th * g
            else:
                dvdh = (1.0 - ss[t]) + (0.0 if cfg.detach_reset else (vr - hs[t]) * g)
            gh = w[t][n] * g + gv * dvdh
            gx[t][n] = gh
            gv = lam * gh
    return spikes, gx


CONFIGS = [
    NeuronConfig(),
    NeuronConfig(detach_reset=False),
    NeuronConfig(reset="hard"),
    NeuronConfig(reset="hard", detach_reset=False),
    NeuronConfig(reset="hard", v_reset=-0.3, detach_reset=False, decay=0.5),
    PRESETS["ottt"],
    PRESETS["sltt"],
    NeuronConfig(surrogate="triangle", alpha=1.5, decay=0.7),
    NeuronConfig(surrogate="rectangle", alpha=1.0, decay=0.9, detach_reset=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.reset}-{c.surrogate}-det{int(c.detach_reset)}-l{c.decay:.2f}")
@pytest.mark.parametrize("mode", ["multi", "single"])
def test_lif_forward_backward_matches_scalar_loop(cfg, mode):
    T, N = 7, 40
    x = (torch.randn(T, N, dtype=torch.float64) * 0.8 + 0.5).requires_grad_(True)
    w = torch.randn(T, N, dtype=torch.float64)
    lif = LIF(cfg)
    configure(lif, mode, T)
    if mode == "multi":
        s = lif(x.reshape(T * N)).view(T, N)
    else:
        s = torch.stack([lif(x[t]) for t in range(T)])
    (s * w).sum().backward()
    ref_s, ref_g = lif_ref(x.detach().tolist(), w.tolist(), cfg)
    assert s.detach().tolist() == ref_s
    assert torch.allclose(x.grad, torch.tensor(ref_g, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert s.detach().sum() > 0, "the test input must make neurons fire"


@pytest.mark.parametrize("name,alpha", [("sigmoid", 4.0), ("triangle", 1.0), ("rectangle", 1.0), ("rectangle", 0.5)])
def test_surrogate_derivative_values(name, alpha):
    cfg = NeuronConfig(surrogate=name, alpha=alpha)
    z = torch.linspace(-2, 2, 81, dtype=torch.float64).requires_grad_(True)
    out = cfg.spike_fn.apply(z, alpha)
    assert out.tolist() == [1.0 if v >= 0 else 0.0 for v in z.tolist()]
    out.sum().backward()
    ref = [sg_ref(name, v, alpha) for v in z.tolist()]
    assert torch.allclose(z.grad, torch.tensor(ref, dtype=torch.float64), atol=1e-14)


def test_presets():
    assert get_preset(None) == PRESETS["rbp"]
    rbp = PRESETS["rbp"]
    assert (rbp.decay, rbp.threshold, rbp.reset, rbp.detach_reset, rbp.surrogate, rbp.alpha) == (0.2, 1.0, "soft", True, "sigmoid", 4.0)
    assert PRESETS["ottt"].decay == 0.5
    sltt = PRESETS["sltt"]
    assert abs(1.0 / (1.0 - sltt.decay) - 1.1) < 1e-12 and sltt.surrogate == "triangle" and sltt.alpha == 1.0
    with pytest.raises(KeyError, match="valid"):
        get_preset("nope")
    with pytest.raises(ValueError):
        NeuronConfig(surrogate="atan")
