"""CIFAR ResNet-18 and ResNet-19 with the structure of the official rate-BP code (Yu et al., NeurIPS 2024).

BasicBlock: conv3x3-BN-LIF-conv3x3-BN, add the shortcut (identity, or conv1x1+BN when the shape
changes), then a LIF after the add. Convs have no bias. Stem conv3x3 stride 1 + BN + LIF.
"""

from __future__ import annotations

from torch import nn

from ..layers import LIF
from ..neuron import NeuronConfig
from .common import SNN, conv_bn, kaiming_init


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn(cin, cout, 3, stride), LIF(neuron), conv_bn(cout, cout, 3, 1))
        self.shortcut = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()
        self.lif = LIF(neuron)

    def forward(self, x):
        return self.lif(self.branch(x) + self.shortcut(x))


class ResNet(SNN):
    def __init__(self, blocks: list[int], widths: list[int], strides: list[int], stem: int, hidden_fc: int | None,
                 num_classes: int, in_channels: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, stem, 3, 1), LIF(neuron))
        layers, cin = [], stem
        for n, width, stride in zip(blocks, widths, strides):
            for i in range(n):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1, neuron))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        if hidden_fc:
            self.classifier = nn.Sequential(nn.Linear(cin, hidden_fc), LIF(neuron), nn.Linear(hidden_fc, num_classes))
        else:
            self.classifier = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.layers(self.stem(x))))


def resnet18(num_classes: int = 10, in_channels: int = 3, neuron: NeuronConfig | None = None) -> ResNet:
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], [1, 2, 2, 2], 64, None, num_classes, in_channels, neuron)


def resnet19(num_classes: int = 10, in_channels: int = 3, neuron: NeuronConfig | None = None) -> ResNet:
    return ResNet([3, 3, 2], [128, 256, 512], [1, 2, 2], 128, 256, num_classes, in_channels, neuron)
