"""SEW-ResNet-34 for ImageNet with the structure of the official rate-BP code (paper.md §5).

Stem conv7x7/2 (bias) + BN + LIF, maxpool 3x3/2. Block: (conv3x3+BN+LIF) -> (conv3x3+BN+LIF); the
downsample branch is conv1x1+BN+LIF; output = branch + identity (SEW "ADD", no neuron after the add).
"""

from __future__ import annotations

from torch import nn

from ..neuron import NeuronConfig
from .common import SNN, conv_bn_lif, kaiming_init


class SEWBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.branch = nn.Sequential(*conv_bn_lif(cin, cout, neuron, 3, stride), *conv_bn_lif(cout, cout, neuron, 3, 1))
        self.downsample = (
            nn.Sequential(*conv_bn_lif(cin, cout, neuron, 1, stride)) if (stride != 1 or cin != cout) else nn.Identity()
        )

    def forward(self, x):
        return self.branch(x) + self.downsample(x)


class SEWResNet(SNN):
    def __init__(self, blocks: list[int], num_classes: int, in_channels: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_lif(in_channels, 64, neuron, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for n, width, stride in zip(blocks, [64, 128, 256, 512], [1, 2, 2, 2]):
            for i in range(n):
                layers.append(SEWBlock(cin, width, stride if i == 0 else 1, neuron))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.layers(self.stem(x))))


def sew_resnet34(num_classes: int = 1000, in_channels: int = 3, neuron: NeuronConfig | None = None) -> SEWResNet:
    return SEWResNet([3, 4, 6, 3], num_classes, in_channels, neuron)
