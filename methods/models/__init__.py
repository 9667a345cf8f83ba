"""Architectures: ``ARCHS[name](num_classes=..., in_channels=..., neuron=...)`` builds one."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..neuron import NeuronConfig, get_preset
from .preact_resnet import preact_resnet34
from .resnet import resnet18, resnet19
from .sew_resnet import sew_resnet34
from .small import cnn_digits, mlp
from .vgg import vgg11, vgg13, vggsnn_cifar, vggsnn_dvs


def _with_default_neuron(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_channels: int | None = None, neuron: str | NeuronConfig | None = None, **kw) -> nn.Module:
        if in_channels is not None:
            kw["in_channels"] = in_channels
        return builder(num_classes=num_classes, neuron=get_preset(neuron), **kw)

    build.__name__ = builder.__name__
    build.__doc__ = builder.__doc__
    return build


ARCHS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: _with_default_neuron(f)
    for f in (resnet18, resnet19, vgg11, vgg13, vggsnn_cifar, vggsnn_dvs, sew_resnet34, preact_resnet34, cnn_digits, mlp)
}

__all__ = ["ARCHS"]
