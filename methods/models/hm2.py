"""HM2-BP's networks (Jin, Zhang, Li, NeurIPS 2018): spiking layers with a first-order synaptic current, driven
by bias-free linear ops; the forward simulation. The learning rule is methods/hm2bp.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class HM2Neuron:
    tau_m: float = 64.0
    tau_s: float = 8.0
    refractory: int = 2


# ---------------------------------------------------------------- forward dynamics

def simulate(current: torch.Tensor, threshold: float, n: HM2Neuron = HM2Neuron()) -> torch.Tensor:
    """Spike trains [T, B, ...] (0/1, the dtype of ``current``) of neurons driven by input responses
    ``current`` [T, B, ...]; current[t] enters the synaptic state at step t + 1."""
    T = current.shape[0]
    v = torch.zeros_like(current[0])
    c = torch.zeros_like(current[0])
    ref = torch.zeros_like(current[0])
    out = torch.empty_like(current)
    dm, ds = 1.0 - 1.0 / n.tau_m, 1.0 - 1.0 / n.tau_s
    for t in range(T):
        v.mul_(dm)
        c.mul_(ds)
        if t >= 1:
            c.add_(current[t - 1])
        v.add_(c, alpha=1.0 / n.tau_s)
        refractory = ref > 0
        v.masked_fill_(refractory, 0.0)
        ref.sub_(refractory.to(ref.dtype))
        s = v > threshold - 1e-6
        out[t] = s
        v.masked_fill_(s, 0.0)
        ref.masked_fill_(s, float(n.refractory))
    return out


class SumPool2d(nn.Module):
    """Spiking pooling synapses: each output sums its k x k inputs (fixed weights 1, not trained)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return nn.functional.avg_pool2d(x, self.k) * (self.k * self.k)


class HM2Net(nn.Module):
    """A stack of (synaptic op, spiking layer) pairs; ``thresholds[l]`` is layer l's V_th. Ops are bias-free
    linear maps of the spikes below (Linear after a Flatten, Conv2d, SumPool2d)."""

    sample_ndim = 3

    def __init__(self, ops: Sequence[nn.Module], thresholds: Sequence[float], neuron: HM2Neuron = HM2Neuron(),
                 init_scale: float = 1.0) -> None:
        super().__init__()
        if len(ops) != len(thresholds):
            raise ValueError(f"{len(ops)} layers but {len(thresholds)} thresholds")
        self.ops = nn.ModuleList(ops)
        self.thresholds = [float(t) for t in thresholds]
        self.neuron = neuron
        for m in self.modules():  # the official code draws weights uniformly in [-1, 1]
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.uniform_(m.weight, -init_scale, init_scale)

    def run(self, spikes_in: torch.Tensor) -> list[torch.Tensor]:
        """Spike trains of every layer, input first: [S_0 (input), S_1, ..., S_L], each [T, B, ...]."""
        trains = [spikes_in]
        T, B = spikes_in.shape[:2]
        for op, th in zip(self.ops, self.thresholds):
            prev = trains[-1]
            cur = op(prev.reshape(T * B, *prev.shape[2:]))
            trains.append(simulate(cur.reshape(T, B, *cur.shape[1:]), th, self.neuron))
        return trains

    def forward(self, spikes_in: torch.Tensor) -> torch.Tensor:
        return self.run(spikes_in)[-1].sum(0)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def hm2_mlp(num_classes: int = 10, in_channels: int = 1, neuron=None, widths: Sequence[int] = (800,),
            input_hw=(28, 28), thresholds: Sequence[float] | None = None, init_scale: float = 1.0) -> HM2Net:
    """784-800-10 (MNIST) / 2312-800-10 (N-MNIST, 2 x 34 x 34); thresholds default to MNIST's (20 hidden, 8 out)."""
    h, w = _pair(input_hw)
    sizes = [in_channels * h * w, *widths, num_classes]
    ops = [nn.Sequential(nn.Flatten(1), nn.Linear(a, b, bias=False)) if i == 0 else nn.Linear(a, b, bias=False)
           for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    th = list(thresholds) if thresholds is not None else [20.0] * len(widths) + [8.0]
    return HM2Net(ops, th, init_scale=init_scale)


def hm2_cnn(num_classes: int = 10, in_channels: int = 1, neuron=None, input_hw=(28, 28), channels=(15, 40),
            hidden: int = 300, thresholds: Sequence[float] | None = None, init_scale: float = 1.0) -> HM2Net:
    """28x28 - 15C5 - P2 - 40C5 - P2 - 300 - 10 with the official thresholds (conv 5, pool 2, conv 12, pool 4,
    fc 10, out 10)."""
    h, w = _pair(input_hw)
    c1, c2 = channels
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if fh < 1 or fw < 1:
        raise ValueError(f"hm2_cnn needs inputs of at least 16x16, got {h}x{w}")
    ops = [nn.Conv2d(in_channels, c1, 5, bias=False), SumPool2d(2), nn.Conv2d(c1, c2, 5, bias=False), SumPool2d(2),
           nn.Sequential(nn.Flatten(1), nn.Linear(c2 * fh * fw, hidden, bias=False)),
           nn.Linear(hidden, num_classes, bias=False)]
    th = list(thresholds) if thresholds is not None else [5.0, 2.0, 12.0, 4.0, 10.0, 10.0]
    return HM2Net(ops, th, init_scale=init_scale)


HM2_ARCHS = {"hm2_mlp": hm2_mlp, "hm2_cnn": hm2_cnn}
