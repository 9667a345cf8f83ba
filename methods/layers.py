"""Spiking layers whose behaviour a training method switches by a *mode*.

One architecture definition serves every method: a model is built from ordinary convs, linears and
pools plus two mode-aware modules, :class:`LIF` and :class:`BatchNorm`. A method sets the mode of
all of them at once with :func:`configure` and never changes the architecture.

Modes
-----
``multi``         differentiable multi-step pass: input ``[T*B, ...]``, BN statistics over T*B
                  (BPTT-m, and inference for every method)
``single``        differentiable single step: input ``[B, ...]``, the LIF keeps V between calls,
                  per-step BN statistics (BPTT-s)
``spike_multi``   rate-BP spike pass, multi-step, no autograd: each LIF records its firing rate and
                  eligibility, each BN the statistics of its input over T*B
``spike_single``  the same, one step per call, accumulated over the calls
``rate``          rate-BP rate pass on ``[B, ...]``: a LIF returns its recorded rate with the
                  eligibility as local derivative; BN takes its value from the spike statistics and
                  its gradient from the rate batch

Further modes (online methods) are added by registering handlers in ``LIF.MODES`` / ``BatchNorm.MODES``.
"""

from __future__ import annotations

import types

from typing import Callable

import torch
from torch import nn

from .neuron import NeuronConfig, charge, dv_dh, lif_step, reset
from .syncbn import bn_dims, bn_shape, sync_batchnorm

__all__ = ["BACKENDS", "PRECISIONS", "set_backend", "set_precision", "LIF", "BatchNorm", "SpikingModule", "configure", "reset_state", "spiking_modules", "RateNode", "RateBatchNorm"]


class SpikingModule(nn.Module):
    """Base of the mode-aware modules: holds ``mode``, ``T`` and per-sequence state."""

    MODES: dict[str, Callable] = {}

    def __init__(self) -> None:
        super().__init__()
        self.mode = "multi"
        self.T = 1
        self.flags: dict = {}

    def reset_state(self) -> None:  # pragma: no cover - overridden
        pass

    disabled = False  # a wrapper may switch a BN off (identity) for a method's own normalisation
    # data parallel (methods/distributed.py): batch statistics are every rank's batch's, in every mode
    synced = False
    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return x
        try:
            handler = self.MODES[self.mode]
        except KeyError:
            raise ValueError(f"{type(self).__name__}: unknown mode {self.mode!r}; valid: {sorted(self.MODES)}") from None
        return handler(self, x)


# --------------------------------------------------------------------------- LIF


class RateNode(torch.autograd.Function):
    """Value: the observed firing rate r. Local derivative: diag(e). Saves only e."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rate: torch.Tensor, elig: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(elig)
        return rate.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (elig,) = ctx.saved_tensors
        return grad * elig, None, None


class LIF(SpikingModule):
    """A layer of LIF neurons (methods/neuron.py) driven by the current mode.

    ``backend`` (``set_backend``) picks how the modes run: "torch" (Python loops of elementwise ops, the
    reference), "triton" (methods/triton_lif.py: one fused kernel each for BPTT's multi-step forward and backward,
    for rate-BP's spike pass, and for one step of the single-step modes, forward and backward) or "compile" (the
    same torch code through torch.compile)."""

    MODES: dict[str, Callable] = {}
    backend = "torch"

    def __init__(self, neuron: NeuronConfig) -> None:
        super().__init__()
        self.neuron = neuron
        self.reset_state()

    def extra_repr(self) -> str:
        n = self.neuron
        return f"preset={n.name}, decay={n.decay:.4g}, threshold={n.threshold}, reset={n.reset}, surrogate={n.surrogate}({n.alpha})"

    def reset_state(self) -> None:
        self.v: torch.Tensor | None = None  # membrane, single-step modes
        # rate-BP records (spike passes): running sums over steps and the eligibility factor rho_t
        self.rate_sum: torch.Tensor | None = None
        self.elig_sum: torch.Tensor | None = None
        self.rho: torch.Tensor | float = 1.0
        self.steps = 0

    # ---- recorded results of a spike pass
    @property
    def rate(self) -> torch.Tensor:
        return self.rate_sum / self.steps

    @property
    def elig(self) -> torch.Tensor:
        return self.elig_sum / self.steps

    # ---- differentiable passes
    def _multi(self, x: torch.Tensor) -> torch.Tensor:
        T = self.T
        xs = x.view(T, x.shape[0] // T, *x.shape[1:])
        if self.backend == "triton":
            from .triton_lif import TritonLIF

            return TritonLIF.apply(xs, self.neuron).view_as(x)
        if self.backend == "compile":
            return _compiled("multi")(xs, self.neuron).view_as(x)
        return _multi_loop(xs, self.neuron).view_as(x)

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        s, self.v = self.step(self.v, x)
        return s

    def step(self, v: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One differentiable LIF step (``lif_step``) on this layer's backend: (S_t, V_t)."""
        if self.backend == "triton":
            from .triton_lif import TritonLIFStep

            return TritonLIFStep.apply(x, v, self.neuron)
        if self.backend == "compile":
            return _compiled("step")(v, x, self.neuron)
        return lif_step(v, x, self.neuron)

    # ---- rate-BP spike pass (no autograd)
    @torch.no_grad()
    def _record_step(self, v: torch.Tensor | None, x: torch.Tensor, out: torch.Tensor | None = None,
                     fire: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One spike-pass step: fire (``_fire``, or a compiled one), accumulate rate and eligibility, update rho.
        Returns (spike, V)."""
        cfg = self.neuron
        s, sg, kappa, v_new = (fire or _fire)(v, x, cfg, out)
        rho = self.rho
        if self.elig_sum is None:
            self.elig_sum = sg * rho
            self.rate_sum = s.clone()
        else:
            if isinstance(rho, torch.Tensor):
                self.elig_sum.addcmul_(sg, rho)
            else:
                self.elig_sum.add_(sg, alpha=rho)
            self.rate_sum.add_(s)
        # rho_{t+1} = 1 + rho_t * lambda * dV_t/dH_t
        if isinstance(kappa, float) and not isinstance(rho, torch.Tensor):
            self.rho = 1.0 + rho * cfg.decay * kappa
        else:
            self.rho = 1.0 + (rho * cfg.decay) * kappa
        self.steps += 1
        return s, v_new

    def _spike_multi(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from .triton_lif import rate_spike_pass

            self.reset_state()
            s, self.rate_sum, self.elig_sum = rate_spike_pass(x.view(self.T, x.shape[0] // self.T, *x.shape[1:]),
                                                              self.neuron)
            self.steps = self.T
            return s.view_as(x)
        if self.backend == "compile":
            return _compiled("spike_multi")(self, x)
        return self._spike_multi_torch(x)

    def _spike_multi_torch(self, x: torch.Tensor) -> torch.Tensor:
        self.reset_state()
        T = self.T
        xs = x.view(T, x.shape[0] // T, *x.shape[1:])
        out = torch.empty_like(xs)
        v = None
        for t in range(T):
            _, v = self._record_step(v, xs[t], out[t])
        self.v = None
        return out.view_as(x)

    def _spike_single(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from .triton_lif import rate_spike_step

            with torch.no_grad():
                first = self.steps == 0
                s, self.v, self.rho, self.rate_sum, self.elig_sum = rate_spike_step(
                    x, None if first else self.v, None if first else self.rho, self.rate_sum, self.elig_sum,
                    self.neuron)
            self.steps += 1
            return s
        s, self.v = self._record_step(self.v, x, fire=_compiled("fire") if self.backend == "compile" else None)
        return s

    # ---- rate-BP rate pass
    def _rate(self, x: torch.Tensor) -> torch.Tensor:
        if self.steps == 0:
            raise RuntimeError("LIF in rate mode before a spike pass recorded its rates")
        rate, elig = self.rate, self.elig
        self.rate_sum = self.elig_sum = None  # the autograd node keeps e alive, nothing else
        return RateNode.apply(x, rate, elig)


def _fire(v: torch.Tensor | None, x: torch.Tensor, cfg: NeuronConfig, out: torch.Tensor | None = None):
    """A spike-pass step's arithmetic, no state: (S_t, g'(H_t - theta), dV_t/dH_t, V_t); S_t into ``out`` if given."""
    h = charge(v, x, cfg)
    z = h - cfg.threshold
    s = (z >= 0).to(x.dtype) if out is None else out.copy_(z >= 0)
    sg = cfg.spike_fn.derivative(z, cfg.alpha)
    return s, sg, dv_dh(h, s, sg, cfg), reset(h, s, cfg)


def _multi_loop(xs: torch.Tensor, cfg: NeuronConfig) -> torch.Tensor:
    """BPTT's multi-step LIF on ``[T, ...]``: a differentiable loop of ``lif_step``."""
    v = None
    spikes = []
    for t in range(xs.shape[0]):
        s, v = lif_step(v, xs[t], cfg)
        spikes.append(s)
    return torch.stack(spikes)


BACKENDS = ("torch", "triton", "compile")
_COMPILED: dict[str, Callable] = {}


_COMPILE = {"multi": _multi_loop, "spike_multi": LIF._spike_multi_torch, "step": lif_step, "fire": _fire}


def _compiled(kind: str) -> Callable:
    """torch.compile of a mode's torch code (``_COMPILE``), compiled once per process (per shape and neuron).
    Every LIF layer of a different shape, and the first step (no membrane yet) beside the others, is its own
    graph: the recompile limit is raised so that a ResNet's layers do not fall back to the torch ops."""
    if kind not in _COMPILED:
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), 64))
        # inductor's Triton kernels would contract multiply-adds into one rounding: emulate_precision_casts turns
        # that off (and rounds where eager torch rounds), so the membrane is eager's (methods/triton_lif.py)
        options = {"emulate_precision_casts": True} if hasattr(torch._inductor.config, "emulate_precision_casts") else {}
        _COMPILED[kind] = torch.compile(_COMPILE[kind], dynamic=False, options=options)
    return _COMPILED[kind]


def set_backend(model: nn.Module, backend: str) -> None:
    """Run the multi-step LIF loops of ``model`` on ``backend`` (``BACKENDS``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    for m in model.modules():
        if isinstance(m, LIF):
            m.backend = backend


PRECISIONS = ("fp32", "bf16")


def set_precision(model: nn.Module, precision: str, device_type: str) -> None:
    """Run every conv and linear layer of ``model`` in ``precision``: for "bf16", each layer's forward (whatever a
    method installed there, OTTT's traced forward included) runs under ``torch.autocast(bfloat16)`` and its output
    comes back as float32, so batch norm, the membrane and everything after the layer stay in float32. The layer
    computes and saves its input and weight in bfloat16 (spikes, 0 or 1, are exact in it); its weight stays a
    float32 parameter and the optimizer updates that. "fp32" changes nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and "_fp32_forward" not in m.__dict__:
            # bound methods, not closures: a deep copy of the model rebinds them to the copy
            m._fp32_forward, m._autocast_device = m.forward, device_type
            m.forward = types.MethodType(_autocast_forward, m)


def _autocast_forward(self, x):
    with torch.autocast(self._autocast_device, dtype=torch.bfloat16):
        return self._fp32_forward(x).float()


LIF.MODES.update(
    multi=LIF._multi,
    single=LIF._single,
    spike_multi=LIF._spike_multi,
    spike_single=LIF._spike_single,
    rate=LIF._rate,
)


# --------------------------------------------------------------------------- batch norm


class RateBatchNorm(torch.autograd.Function):
    """BN of the rate pass: value from the spike statistics, the statistics' gradient from the rate batch.

    With x the rate batch (BN input of the rate pass) and (mu_s, s) the spike pass's mean and inverse
    std, the value is ``y = weight * (x - mu_s) * s + bias``: the time mean of the spike pass's BN
    output. The gradient is that of the same expression in which mu and the variance are treated as
    functions of the rate batch (their values stay the spike statistics), i.e. d mu/dx and d var/dx
    of the rate batch's own mean and variance (paper App. B.3; the official code's value swap):

        dx = weight * s * (g - mean(g) - (xhat + d) * mean(g * xhat)),   xhat = (x - mu_s) * s,
        d = (mu_s - mu_r) * s,   dweight = sum(g * xhat),   dbias = sum(g)

    With per-step statistics averaged over t (rate_m, rate_s) mu_s equals the rate batch's mean and
    d = 0; at T=1 this is exactly training-mode BN. Saves the normalized rate batch xhat and the
    per-channel s and d (and the weight, a parameter).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean_s, invstd_s, eps, group=None, synced=False):  # type: ignore[override]
        dims, shape = bn_dims(x), bn_shape(x)
        s = invstd_s.view(shape)
        xhat = (x - mean_s.view(shape)) * s
        n = x.numel() // x.shape[1]
        if synced:  # data parallel: the rate batch is every rank's (methods/distributed.py)
            sums = torch.cat([x.detach().sum(dims), x.new_tensor([float(n)])])
            torch.distributed.all_reduce(sums, group=group)
            n = float(sums[-1])
            mean_r = (sums[:-1] / n).view(shape)
        else:
            mean_r = x.mean(dims, keepdim=True)
        shift = (mean_s.view(shape) - mean_r) * s
        y = xhat if weight is None else xhat * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        ctx.save_for_backward(xhat, s, shift, weight)
        ctx.has_bias, ctx.n, ctx.group, ctx.synced = bias is not None, n, group, synced
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xhat, s, shift, weight = ctx.saved_tensors
        dims = bn_dims(grad)
        g_bias = grad.sum(dims, keepdim=True)
        g_weight = (grad * xhat).sum(dims, keepdim=True)
        gw = None if weight is None else g_weight.view(-1)
        gb = g_bias.view(-1) if ctx.has_bias else None
        if ctx.synced:  # the means below are over the global batch; this rank's parameter gradients stay its own
            both = torch.cat([g_bias, g_weight])
            torch.distributed.all_reduce(both, group=ctx.group)
            g_bias, g_weight = both[:1], both[1:]
        scale = s if weight is None else s * weight.view(bn_shape(grad))
        g_x = scale * (grad - g_bias / ctx.n - (xhat + shift) * (g_weight / ctx.n))
        return g_x, gw, gb, None, None, None, None, None


class BatchNorm(nn.modules.batchnorm._BatchNorm, SpikingModule):
    """BatchNorm over dim 1 of a ``[N, C]`` or ``[N, C, ...]`` input, driven by the current mode."""

    MODES: dict[str, Callable] = {}

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True) -> None:
        nn.modules.batchnorm._BatchNorm.__init__(self, num_features, eps=eps, momentum=momentum, affine=affine)
        self.mode = "multi"
        self.T = 1
        self.flags = {}
        self.reset_state()

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects [N, C, ...], got shape {tuple(x.shape)}")

    def reset_state(self) -> None:
        self.mean_sum: torch.Tensor | None = None
        self.invstd_sq_sum: torch.Tensor | None = None
        self.last_mean: torch.Tensor | None = None
        self.last_invstd: torch.Tensor | None = None
        self.steps = 0

    def _standard(self, x: torch.Tensor) -> torch.Tensor:
        if self.synced and self.training:
            return sync_batchnorm(self, x)[0]
        return nn.modules.batchnorm._BatchNorm.forward(self, x)

    @torch.no_grad()
    def _spike(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode BN (running statistics updated as usual) that records its batch statistics."""
        if not self.training:
            return self._standard(x)
        if self.mode == "spike_multi":
            self.reset_state()
        if self.synced:
            y, mean, invstd = sync_batchnorm(self, x)
        else:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            y, mean, invstd = torch.native_batch_norm(
                x, self.weight, self.bias, self.running_mean, self.running_var, True, momentum, self.eps
            )
        self.last_mean, self.last_invstd = mean, invstd
        if self.mean_sum is None:
            self.mean_sum, self.invstd_sq_sum = mean.clone(), invstd * invstd
        else:
            self.mean_sum.add_(mean)
            self.invstd_sq_sum.addcmul_(invstd, invstd)
        self.steps += 1
        return y

    def spike_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, inverse std) that the rate pass normalises with.

        One spike-pass call (multi-step): its statistics over T*B. Several calls (single-step): the
        average of the per-step means and the harmonic mean of (var_t + eps), i.e. the mean of invstd_t^2;
        with the flag ``bn_last_step`` (the official code's quirk) the last step's statistics.
        """
        if self.steps == 0:
            raise RuntimeError("BatchNorm in rate mode before a spike pass recorded its statistics")
        if self.steps == 1 or self.flags.get("bn_last_step"):
            return self.last_mean, self.last_invstd
        return self.mean_sum / self.steps, torch.sqrt(self.invstd_sq_sum / self.steps)

    def _rate(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._standard(x)
        mean_s, invstd_s = self.spike_statistics()
        self.reset_state()
        return RateBatchNorm.apply(x, self.weight, self.bias, mean_s, invstd_s, self.eps, self.group, self.synced)

    forward = SpikingModule.forward


BatchNorm.MODES.update(
    multi=BatchNorm._standard,
    single=BatchNorm._standard,
    spike_multi=BatchNorm._spike,
    spike_single=BatchNorm._spike,
    rate=BatchNorm._rate,
)


# --------------------------------------------------------------------------- model-wide helpers


def spiking_modules(model: nn.Module) -> list[SpikingModule]:
    """The mode-aware modules of a model (cached on the model)."""
    cached = model.__dict__.get("_snn_modules")
    if cached is None:
        cached = [m for m in model.modules() if isinstance(m, SpikingModule)]
        model.__dict__["_snn_modules"] = cached
    return cached


def configure(model: nn.Module, mode: str, T: int, **flags) -> None:
    """Set the mode, T and flags of every LIF and BN of ``model``."""
    for m in spiking_modules(model):
        if mode not in m.MODES:
            raise ValueError(f"{type(m).__name__}: unknown mode {mode!r}; valid: {sorted(m.MODES)}")
        m.mode, m.T, m.flags = mode, T, flags


def reset_state(model: nn.Module) -> None:
    for m in spiking_modules(model):
        m.reset_state()


def lif_layers(model: nn.Module) -> list[LIF]:
    return [m for m in spiking_modules(model) if isinstance(m, LIF)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

