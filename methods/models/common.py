"""Shared pieces of the architectures: conv-BN-LIF units and the classifier head."""

from __future__ import annotations

from torch import nn

from ..layers import LIF, BatchNorm
from ..neuron import NeuronConfig


class SNN(nn.Module):
    """Base of every architecture: ``sample_ndim`` is the number of dims of one input sample
    (3 for ``[C, H, W]`` images), so a method can tell ``[B, ...]`` static input from ``[T, B, ...]`` frames."""

    sample_ndim = 3


def conv_bn_lif(cin: int, cout: int, neuron: NeuronConfig, kernel: int = 3, stride: int = 1, bias: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), BatchNorm(cout), LIF(neuron)]


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), BatchNorm(cout))


def kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class StagedResNet(SNN):
    """The ImageNet ResNet layout the SEW and PreAct nets share: ``stem`` (64 channels out), stages of ``blocks``
    blocks of widths 64/128/256/512 (stride 2 from the second stage), global average pool, Linear."""

    def __init__(self, stem: nn.Module, block, blocks: list[int], num_classes: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.stem = stem
        layers, cin = [], 64
        for n, width, stride in zip(blocks, [64, 128, 256, 512], [1, 2, 2, 2]):
            for i in range(n):
                layers.append(block(cin, width, stride if i == 0 else 1, neuron))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.layers(self.stem(x))))
