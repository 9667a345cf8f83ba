"""Pre-activation ResNet-34 for ImageNet with the structure of the official rate-BP code (Yu et al., NeurIPS 2024).

Stem conv7x7/2 (bias) + BN (no LIF) + maxpool. Block: LIF -> conv3x3 -> BN -> LIF -> conv3x3 -> BN,
plus the identity (or conv1x1+BN on the raw block input); no neuron after the last block.
"""

from __future__ import annotations

from torch import nn

from ..layers import LIF
from ..neuron import NeuronConfig
from .common import StagedResNet, conv_bn


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            LIF(neuron), conv_bn(cin, cout, 3, stride, bias=True), LIF(neuron), conv_bn(cout, cout, 3, 1, bias=True)
        )
        self.downsample = conv_bn(cin, cout, 1, stride, bias=True) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return self.branch(x) + self.downsample(x)


class PreActResNet(StagedResNet):
    def __init__(self, blocks: list[int], num_classes: int, in_channels: int, neuron: NeuronConfig) -> None:
        super().__init__(nn.Sequential(conv_bn(in_channels, 64, 7, 2, bias=True), nn.MaxPool2d(3, 2, 1)), PreActBlock, blocks, num_classes, neuron)


def preact_resnet34(num_classes: int = 1000, in_channels: int = 3, neuron: NeuronConfig | None = None) -> PreActResNet:
    return PreActResNet([3, 4, 6, 3], num_classes, in_channels, neuron)
