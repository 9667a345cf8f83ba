"""LIF dynamics, surrogate derivatives and neuron presets.

Notation, one neuron layer, time step t:

    charge   H_t = lambda * V_{t-1} + I_t            (+ (1 - lambda) * V_reset for a non-zero hard reset)
    fire     S_t = Heaviside(H_t - theta)             (fires at equality, as SpikingJelly)
    reset    soft: V_t = H_t - theta * S_t;  hard: V_t = (1 - S_t) * H_t + S_t * V_reset

The Heaviside step is an autograd Function whose backward is a surrogate derivative g'(H_t - theta).
With ``detach_reset`` the S_t inside the reset is a constant for autograd.

Everything here is plain torch: no module state, no knowledge of training methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

__all__ = [
    "NeuronConfig",
    "PRESETS",
    "SURROGATES",
    "get_preset",
    "lif_step",
    "dv_dh",
    "surrogate_derivative",
]


# --------------------------------------------------------------------------- surrogates


class _SpikeFunction(torch.autograd.Function):
    """Heaviside forward, surrogate derivative backward. Saves only its input."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @classmethod
    def backward(cls, ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * cls.derivative(x, ctx.alpha), None


class SigmoidSpike(_SpikeFunction):
    """g'(x) = alpha * sigmoid(alpha x) * (1 - sigmoid(alpha x)); alpha = 4 peaks at 1."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        s = torch.sigmoid(alpha * x)
        return alpha * s * (1.0 - s)


class TriangleSpike(_SpikeFunction):
    """Piecewise quadratic ("triangle"): g'(x) = alpha - alpha^2 |x| for |x| <= 1/alpha, else 0."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.clamp(alpha - alpha * alpha * x.abs(), min=0.0)


class RectangleSpike(_SpikeFunction):
    """Rectangle: g'(x) = 1/alpha for |x| <= alpha/2, else 0 (alpha = 1: the unit box)."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return (x.abs() <= alpha / 2).to(x.dtype) / alpha


SURROGATES: dict[str, type[_SpikeFunction]] = {
    "sigmoid": SigmoidSpike,
    "triangle": TriangleSpike,
    "rectangle": RectangleSpike,
}


def surrogate_derivative(name: str, x: torch.Tensor, alpha: float) -> torch.Tensor:
    return SURROGATES[name].derivative(x, alpha)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NeuronConfig:
    """One LIF neuron model. ``decay`` is lambda = 1 - 1/tau."""

    decay: float = 0.2
    threshold: float = 1.0
    reset: str = "soft"  # "soft" | "hard"
    v_reset: float = 0.0  # used by the hard reset only
    detach_reset: bool = True
    surrogate: str = "sigmoid"  # "sigmoid" | "triangle" | "rectangle"
    alpha: float = 4.0
    name: str = "custom"

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"neuron decay must be in [0, 1], got {self.decay}")
        if self.reset not in ("soft", "hard"):
            raise ValueError(f"neuron reset must be 'soft' or 'hard', got {self.reset!r}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {self.surrogate!r}; valid: {sorted(SURROGATES)}")
        if self.alpha <= 0:
            raise ValueError(f"surrogate alpha must be > 0, got {self.alpha}")

    @property
    def spike_fn(self) -> type[_SpikeFunction]:
        return SURROGATES[self.surrogate]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, NeuronConfig] = {
    # rate-BP paper: lambda 0.2, soft reset (detached), theta 1, sigmoid alpha 4
    "rbp": NeuronConfig(name="rbp"),
    # OTTT: tau = 2 -> lambda 0.5
    "ottt": NeuronConfig(decay=0.5, name="ottt"),
    # SLTT: tau = 1.1, piecewise-quadratic ("triangle") surrogate alpha 1, reset not detached
    "sltt": NeuronConfig(decay=1.0 - 1.0 / 1.1, surrogate="triangle", alpha=1.0, detach_reset=False, name="sltt"),
}


def get_preset(neuron: str | NeuronConfig | None, **overrides) -> NeuronConfig:
    """A preset by name (or a config as is), with field overrides."""
    if neuron is None:
        neuron = "rbp"
    if isinstance(neuron, str):
        if neuron not in PRESETS:
            raise KeyError(f"unknown neuron preset {neuron!r}; valid: {sorted(PRESETS)}")
        neuron = PRESETS[neuron]
    if overrides:
        neuron = replace(neuron, **overrides)
    return neuron


# --------------------------------------------------------------------------- dynamics


def charge(v: torch.Tensor | None, x: torch.Tensor, cfg: NeuronConfig) -> torch.Tensor:
    if v is None:  # V_0 = 0 (or V_reset for a hard reset to a non-zero value)
        return x + cfg.v_reset if (cfg.reset == "hard" and cfg.v_reset) else x
    h = cfg.decay * v + x
    if cfg.reset == "hard" and cfg.v_reset:
        h = h + (1.0 - cfg.decay) * cfg.v_reset
    return h


def reset(h: torch.Tensor, s: torch.Tensor, cfg: NeuronConfig) -> torch.Tensor:
    if cfg.detach_reset:
        s = s.detach()
    if cfg.reset == "soft":
        return h - cfg.threshold * s
    if cfg.v_reset:
        return h * (1.0 - s) + cfg.v_reset * s
    return h * (1.0 - s)


def lif_step(v: torch.Tensor | None, x: torch.Tensor, cfg: NeuronConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One differentiable LIF step: returns (spike S_t, membrane V_t)."""
    h = charge(v, x, cfg)
    s = cfg.spike_fn.apply(h - cfg.threshold, cfg.alpha)
    return s, reset(h, s, cfg)


def dv_dh(h: torch.Tensor, s: torch.Tensor, sg: torch.Tensor, cfg: NeuronConfig) -> torch.Tensor | float:
    """dV_t/dH_t along the path autograd takes.

    soft, detached: 1; soft: 1 - theta g'; hard, detached: 1 - S; hard: (1 - S) + (V_reset - H) g'.
    """
    if cfg.reset == "soft":
        return 1.0 if cfg.detach_reset else 1.0 - cfg.threshold * sg
    if cfg.detach_reset:
        return 1.0 - s
    return (1.0 - s) + (cfg.v_reset - h) * sg
