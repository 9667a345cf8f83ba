"""Small nets for the CPU default grid: ``cnn_digits`` (8x8 grey digits) and ``mlp``."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..layers import LIF, BatchNorm
from ..neuron import NeuronConfig
from .common import SNN, conv_bn_lif, kaiming_init


class CNNDigits(SNN):
    """conv16-BN-LIF, conv32-BN-LIF, avgpool 2 (8->4), conv32-BN-LIF, global avg pool, Linear (widths configurable)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, neuron: NeuronConfig | None = None,
                 widths: Sequence[int] = (16, 32, 32)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *conv_bn_lif(in_channels, c1, neuron, bias=False),
            *conv_bn_lif(c1, c2, neuron, bias=False),
            nn.AvgPool2d(2),
            *conv_bn_lif(c2, c3, neuron, bias=False),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(c3, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class MLP(SNN):
    """Flatten, then [Linear -> (BN) -> LIF] per hidden width, then Linear.

    ``in_features`` defaults to ``in_channels * input_hw[0] * input_hw[1]`` (8x8 digits).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, neuron: NeuronConfig | None = None,
                 widths: Sequence[int] = (256,), input_hw: tuple[int, int] = (8, 8), bn: bool = True,
                 in_features: int | None = None, sample_ndim: int = 3) -> None:
        super().__init__()
        self.sample_ndim = sample_ndim
        cin = in_features or in_channels * input_hw[0] * input_hw[1]
        layers: list[nn.Module] = [nn.Flatten(1)]
        for w in widths:
            layers.append(nn.Linear(cin, w, bias=not bn))
            if bn:
                layers.append(BatchNorm(w))
            layers.append(LIF(neuron))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def cnn_digits(num_classes: int = 10, in_channels: int = 1, neuron: NeuronConfig | None = None, **kw) -> CNNDigits:
    return CNNDigits(num_classes, in_channels, neuron, **kw)


def mlp(num_classes: int = 10, in_channels: int = 1, neuron: NeuronConfig | None = None, **kw) -> MLP:
    return MLP(num_classes, in_channels, neuron, **kw)
