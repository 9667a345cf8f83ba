"""What is benchmarked: neurons, architectures and training methods. Imports torch only.

Registries: ``METHODS[name](cfg)`` builds a method, ``ARCHS[name](num_classes=..., in_channels=...)``
builds an architecture.
"""

from __future__ import annotations

from typing import Callable

from .base import NULL_PROBE, Method, MethodConfig, NullProbe, StepOutput
from .bptt import BPTTMulti, BPTTSingle
from .hm2bp import HM2BP
from .models import ARCHS
from .neuron import PRESETS, NeuronConfig, get_preset
from .online import OS, OTTTA, OTTTO, SLTT, SLTTK
from .rate import RateMulti, RateSingle

__version__ = "0.1.0"

METHODS: dict[str, Callable[..., Method]] = {
    cls.name: cls for cls in (BPTTMulti, BPTTSingle, RateMulti, RateSingle, OTTTA, OTTTO, SLTT, SLTTK, OS, HM2BP)
}

__all__ = [
    "ARCHS", "METHODS", "PRESETS", "Method", "MethodConfig", "NeuronConfig", "NullProbe", "NULL_PROBE",
    "StepOutput", "get_preset", "__version__",
]
