"""VGG-11, VGG-13 and VGG-SNN with the structure of the official rate-BP code (Yu et al., NeurIPS 2024).

Each conv is Conv3x3 (bias) -> BN -> LIF; 'A' is AvgPool2d(2) after the LIF. Weights ~ N(0, 0.5^2),
biases 0, BN gamma 1 beta 0, as the official VGG init.
"""

from __future__ import annotations

from torch import nn

from ..layers import BatchNorm
from ..neuron import NeuronConfig
from .common import SNN, conv_bn_lif

CFGS = {
    "vgg11": [64, "A", 128, 256, "A", 512, 512, "A", 512, "A", 512, 512],
    "vgg13": [64, 64, "A", 128, 128, "A", 256, 256, "A", 512, 512, 512, "A", 512],
    "vggsnn": [64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512],
}


class VGG(SNN):
    def __init__(self, cfg: list, head: str, num_classes: int, in_channels: int, neuron: NeuronConfig) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "A":
                layers.append(nn.AvgPool2d(2))
            else:
                layers += conv_bn_lif(cin, v, neuron)
                cin = v
        self.features = nn.Sequential(*layers)
        if head == "gap":  # global average pool -> Linear(C, classes)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.classifier = nn.Linear(cin, num_classes)
        elif head == "adaptive3":  # VGG-SNN on CIFAR: AdaptiveAvgPool(3x3) -> Linear(C*9, classes)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten(1))
            self.classifier = nn.Linear(cin * 9, num_classes)
        elif head == "pool3":  # VGG-SNN on 48x48 DVS frames: AvgPool(2) (6 -> 3) -> Linear(C*9, classes)
            self.pool = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(1))
            self.classifier = nn.Linear(cin * 9, num_classes)
        else:
            raise ValueError(f"unknown VGG head {head!r}")
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def vgg11(num_classes: int = 10, in_channels: int = 3, neuron: NeuronConfig | None = None) -> VGG:
    return VGG(CFGS["vgg11"], "gap", num_classes, in_channels, neuron)


def vgg13(num_classes: int = 10, in_channels: int = 3, neuron: NeuronConfig | None = None) -> VGG:
    return VGG(CFGS["vgg13"], "gap", num_classes, in_channels, neuron)


def vggsnn_cifar(num_classes: int = 10, in_channels: int = 3, neuron: NeuronConfig | None = None) -> VGG:
    return VGG(CFGS["vggsnn"], "adaptive3", num_classes, in_channels, neuron)


def vggsnn_dvs(num_classes: int = 10, in_channels: int = 2, neuron: NeuronConfig | None = None) -> VGG:
    return VGG(CFGS["vggsnn"], "pool3", num_classes, in_channels, neuron)
