"""What is benchmarked: neurons, architectures and training methods. Imports torch only.

Registries: ``METHODS[name](cfg)`` builds a method, ``ARCHS[name](num_classes=..., in_channels=...)``
builds an architecture. ``METHODS`` is found, not listed: every ``Method`` subclass that sets its own ``name``
in a module of this package is registered, so a new method is one new file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from .base import NULL_PROBE, Method, MethodConfig, NullProbe, StepOutput
from .models import ARCHS
from .neuron import PRESETS, NeuronConfig, get_preset

__version__ = "0.1.0"


def _find_methods() -> dict[str, Callable[..., Method]]:
    """Every concrete method of this package: a ``Method`` subclass defined in one of its modules with a ``name``
    of its own (shared bases such as ``OnlineBase`` set none). Two classes with one name are an error."""
    found: dict[str, type[Method]] = {}
    for mod_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{mod_info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.__module__ == module.__name__
                    and "name" in vars(obj)):
                if obj.name in found and found[obj.name] is not obj:
                    raise ImportError(f"two methods are named {obj.name!r}: {found[obj.name].__qualname__} and "
                                      f"{obj.__qualname__}")
                found[obj.name] = obj
    return found


METHODS: dict[str, Callable[..., Method]] = _find_methods()

__all__ = [
    "ARCHS", "METHODS", "PRESETS", "Method", "MethodConfig", "NeuronConfig", "NullProbe", "NULL_PROBE",
    "StepOutput", "get_preset", "__version__",
]
