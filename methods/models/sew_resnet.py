"""SEW-ResNet-34 for ImageNet with the structure of the official rate-BP code (Yu et al., NeurIPS 2024).

Stem conv7x7/2 (bias) + BN + LIF, maxpool 3x3/2. Block: (conv3x3+BN+LIF) -> (conv3x3+BN+LIF); the
downsample branch is conv1x1+BN+LIF; output = branch + identity (SEW "ADD", no neuron after the add).
"""

from __future__ import annotations

from torch import nn

from ..neuron import NeuronConfig
from .common import StagedResNet, conv_bn_lif


class SEWBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.branch = nn.Sequential(*conv_bn_lif(cin, cout, neuron, 3, stride), *conv_bn_lif(cout, cout, neuron, 3, 1))
        self.downsample = (
            nn.Sequential(*conv_bn_lif(cin, cout, neuron, 1, stride)) if (stride != 1 or cin != cout) else nn.Identity()
        )

    def forward(self, x):
        return self.branch(x) + self.downsample(x)


class SEWResNet(StagedResNet):
    def __init__(self, blocks: list[int], num_classes: int, in_channels: int, neuron: NeuronConfig) -> None:
        super().__init__(nn.Sequential(*conv_bn_lif(in_channels, 64, neuron, 7, 2), nn.MaxPool2d(3, 2, 1)), SEWBlock, blocks, num_classes, neuron)


def sew_resnet34(num_classes: int = 1000, in_channels: int = 3, neuron: NeuronConfig | None = None) -> SEWResNet:
    return SEWResNet([3, 4, 6, 3], num_classes, in_channels, neuron)
