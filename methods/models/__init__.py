"""Architectures: ``ARCHS[name](num_classes=..., in_channels=..., neuron=...)`` builds one."""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from ..neuron import NeuronConfig, get_preset
from .hm2 import HM2_ARCHS, hm2_cnn, hm2_mlp
from .preact_resnet import preact_resnet34
from .resnet import resnet18, resnet19
from .sew_resnet import sew_resnet34
from .small import cnn_digits, mlp
from .vgg import vgg11, vgg13, vggsnn_cifar, vggsnn_dvs


# builders whose input size is an ``input_hw`` argument: the harness fills it from the dataset's shape
TAKES_INPUT_HW = {"mlp", "hm2_mlp", "hm2_cnn"}


def _with_default_neuron(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_channels: int | None = None, neuron: str | NeuronConfig | None = None,
              input_shape: tuple[int, ...] | None = None, **kw) -> nn.Module:
        if in_channels is not None:
            kw["in_channels"] = in_channels
        if input_shape is not None and builder.__name__ in TAKES_INPUT_HW and "input_hw" not in kw:
            kw["input_hw"] = tuple(input_shape[-2:])
        return builder(num_classes=num_classes, neuron=get_preset(neuron), **kw)

    build.__name__ = builder.__name__
    build.__doc__ = builder.__doc__
    return build


ARCHS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: _with_default_neuron(f)
    for f in (resnet18, resnet19, vgg11, vgg13, vggsnn_cifar, vggsnn_dvs, sew_resnet34, preact_resnet34, cnn_digits, mlp,
              hm2_mlp, hm2_cnn)
}
_BUILDERS = {f.__name__: f for f in (resnet18, resnet19, vgg11, vgg13, vggsnn_cifar, vggsnn_dvs, sew_resnet34,
                                     preact_resnet34, cnn_digits, mlp, hm2_mlp, hm2_cnn)}
_HARNESS_ARGS = {"num_classes", "in_channels", "neuron", "self"}


def arch_options(name: str) -> list[str]:
    """The keyword options an architecture takes beyond what the harness passes (num_classes, in_channels,
    neuron): its builder's parameters, and those of the class it forwards ``**kw`` to."""
    builder = _BUILDERS[name]
    sig = inspect.signature(builder, eval_str=True)
    names = [p for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()) and inspect.isclass(sig.return_annotation):
        cls = inspect.signature(sig.return_annotation.__init__)
        names += [p for p in cls.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return sorted({p.name for p in names} - _HARNESS_ARGS)


LIF_ARCHS = set(ARCHS) - set(HM2_ARCHS)  # the architectures of LIF/BN layers every surrogate-gradient method trains

__all__ = ["ARCHS", "HM2_ARCHS", "LIF_ARCHS", "arch_options"]
