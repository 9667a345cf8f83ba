"""The one interface every training method implements.

    method = METHODS[name](cfg)
    method.supports(arch) -> bool
    model = method.build(arch, num_classes, in_channels)
    out = method.train_step(model, x, y, optimizer, probe)
    logits = method.infer(model, x)

``x`` is ``[B, ...]`` for static images (direct encoding: the same input at every step) or
``[T, B, ...]`` for event frames. The method owns the time loop. ``probe`` lets a harness see phase
boundaries (``with probe.phase("forward")``) without the method knowing the harness.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .layers import configure, reset_state
from .models import ARCHS, LIF_ARCHS
from .neuron import NeuronConfig, get_preset


class Probe(Protocol):
    def phase(self, name: str) -> ContextManager: ...


class NullProbe:
    """A probe that costs nothing."""

    _null = contextlib.nullcontext()

    def phase(self, name: str) -> ContextManager:
        return self._null


NULL_PROBE = NullProbe()


@dataclass
class MethodConfig:
    T: int = 4
    neuron: str | NeuronConfig = "rbp"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.T, int) or isinstance(self.T, bool) or self.T < 1:
            raise ValueError(f"T must be a positive integer, got {self.T!r}")


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalar: the loss value (not its gradient scale)
    logits: torch.Tensor  # detached [B, classes]: the mean output over T


class Method:
    """Base class: stores T, the neuron preset and options; shared input and readout helpers."""

    name = "method"
    OPTIONS: dict[str, Any] = {}  # option name -> default; anything else is refused
    # what the method claims, written into every row so that the gate checks it (bench/check.py invariants):
    memory_in_T: str | None = None  # how the bytes autograd saves for backward grow with T: "flat", "linear", None
    faster_than: str | None = None  # a method whose training step this one's beats at the largest T both ran
    event_encoding = "frames"  # how event datasets reach this method: "frames" (event counts) or "spikes" (binary bins)
    data_parallel: str | None = None  # why the method cannot run data parallel (methods/distributed.py); None: it can
    # why the method's neurons run on the torch ops only (None: every backend of methods.layers.set_backend runs them)
    torch_only: str | None = None
    bf16: str | None = None  # why the method cannot run its convs and linears in bf16 (methods.layers.set_precision)
    # gradient fidelity (methods/fidelity.py): the BPTT whose gradient this method's approximates (bptt_m for a
    # multi-step method, bptt_s for one that runs the model one step per call: the same BN statistics); None: none
    fidelity_reference: str | None = "bptt_m"

    def __init__(self, cfg: MethodConfig | None = None, **kw) -> None:
        cfg = cfg or MethodConfig(**kw)
        self.cfg = cfg
        self.T = cfg.T
        self.neuron = get_preset(cfg.neuron)
        unknown = set(cfg.options) - set(self.OPTIONS)
        if unknown:
            raise ValueError(f"method {self.name}: unknown option(s) {sorted(unknown)}; valid: {sorted(self.OPTIONS) or 'none'}")
        self.options = {**self.OPTIONS, **cfg.options}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T}, neuron={self.neuron.name}, options={self.options})"

    # ---- interface
    def supports(self, arch: str) -> bool:
        return arch in LIF_ARCHS

    def supported_archs(self) -> list[str]:
        return sorted(a for a in ARCHS if self.supports(a))

    def build(self, arch: str, num_classes: int, in_channels: int | None = None, **arch_kw) -> nn.Module:
        if not self.supports(arch):
            raise ValueError(f"method {self.name} does not support arch {arch!r}; it supports: "
                             + ", ".join(self.supported_archs()))
        return self.prepare(ARCHS[arch](num_classes=num_classes, in_channels=in_channels, neuron=self.neuron, **arch_kw))

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                   probe: Probe = NULL_PROBE) -> StepOutput:
        raise NotImplementedError

    def gradient_scale(self) -> float:
        """What this method's gradient is multiplied by to be on BPTT's scale (rate-BP's objective is loss / T)."""
        return 1.0

    @torch.no_grad()
    def infer(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Evaluation: the output averaged over T."""
        return self.infer_steps(model, x).mean(0)

    @torch.no_grad()
    def infer_steps(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The output of every time step, ``[T, B, classes]``: the multi-step forward for every method. The
        network is causal, so the mean of the first t steps is what the network would answer run for t steps."""
        configure(model, "multi", self.T)
        reset_state(model)
        out = model(self.time_fold(model, x))
        return out.view(self.T, -1, *out.shape[1:])

    # ---- helpers
    def is_sequence(self, model: nn.Module, x: torch.Tensor) -> bool:
        nd = getattr(model, "sample_ndim", 3)
        if x.dim() == nd + 1:
            return False
        if x.dim() == nd + 2:
            if x.shape[0] != self.T:
                raise ValueError(f"input has {x.shape[0]} time steps but the method runs T={self.T}")
            return True
        raise ValueError(f"input of shape {tuple(x.shape)} is neither [B, ...] nor [T, B, ...] for a {nd}-dim sample")

    def time_fold(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[T*B, ...]`` for a multi-step pass: static input repeated T times, frames flattened."""
        if self.is_sequence(model, x):
            return x.reshape(-1, *x.shape[2:])
        return x.unsqueeze(0).expand(self.T, *x.shape).reshape(-1, *x.shape[1:])

    def step_input(self, model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
        """The input of time step t for a single-step pass."""
        return x[t] if self.is_sequence(model, x) else x

    def mean_over_time(self, out: torch.Tensor) -> torch.Tensor:
        return out.view(self.T, -1, *out.shape[1:]).mean(0)

    @staticmethod
    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)
