"""Online training methods: OTTT (ottt_a, ottt_o) and SLTT (sltt, sltt_k). methods.md §2, §3, §7.

All of them run the model one time step per call with the membrane potential detached before every
charge (no gradient through time), compute a per-step loss

    l_t = [(1 - w) * CE(o_t, y) + w * MSE(o_t, target)] / T

and backpropagate it at once, so autograd holds one step's graph at a time (memory flat in T).
By default they run on the same BN architectures as BPTT, BN with per-step batch statistics.

- ``sltt``: the instantaneous spatial gradient; gradients summed over the T steps, one optimizer step.
- ``sltt_k``: backward at K randomly chosen steps (``k`` option); the other steps run without a graph.
- ``ottt_a``: as SLTT, but every parametric layer after the first takes its weight gradient from a
  presynaptic trace a_t = lambda * a_{t-1} + x_t of its input instead of x_t (grad W += delta_t a_t^T);
  the gradient to its input is the ordinary one. One optimizer step per batch.
- ``ottt_o``: as ottt_a, with an optimizer step at every time step (T updates per batch).

Options: ``mse_weight`` (w, default 0.05), ``mse_target`` ("onehot" for OTTT, "ones" for SLTT: the
SLTT code's default regulariser target, a tensor of ones), ``k`` (sltt_k, default 2).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from .base import NULL_PROBE, Method, StepOutput
from .layers import LIF, BatchNorm, configure, reset_state


def _online(self: LIF, x: torch.Tensor) -> torch.Tensor:
    """One step with V_{t-1} detached before the charge: no gradient through time."""
    from .neuron import lif_step

    s, self.v = lif_step(None if self.v is None else self.v.detach(), x, self.neuron)
    return s


LIF.MODES["online"] = _online
BatchNorm.MODES["online"] = BatchNorm._standard  # per-step batch statistics


class OnlineBase(Method):
    OPTIONS = {"mse_weight": 0.05, "mse_target": "onehot"}
    online_update = False

    def flags(self) -> dict:
        return {}

    def backward_steps(self) -> set[int]:
        return set(range(self.T))

    def step_loss(self, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.options["mse_weight"]
        loss = F.cross_entropy(o, y)
        if w:
            target = (F.one_hot(y, o.shape[1]).to(o.dtype) if self.options["mse_target"] == "onehot"
                      else torch.ones_like(o))
            loss = (1.0 - w) * loss + w * F.mse_loss(o, target)
        return loss / self.T

    def begin_batch(self, model) -> None:
        pass

    def train_step(self, model, x, y, optimizer, probe=NULL_PROBE) -> StepOutput:
        T = self.T
        configure(model, "online", T, **self.flags())
        reset_state(model)
        self.begin_batch(model)
        selected = self.backward_steps()
        optimizer.zero_grad(set_to_none=True)
        out_sum = None
        for t in range(T):
            xt = self.step_input(model, x, t)
            if t in selected:
                with probe.phase("forward"):
                    o = model(xt)
                    loss = self.step_loss(o, y)
                with probe.phase("backward"):
                    loss.backward()
            else:
                with probe.phase("forward"), torch.no_grad():
                    o = model(xt)
            if self.online_update:
                with probe.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            o = o.detach()
            out_sum = o if out_sum is None else out_sum + o
        if not self.online_update:
            with probe.phase("optimizer"):
                optimizer.step()
        reset_state(model)
        self.end_batch(model)
        logits = out_sum / T
        return StepOutput(F.cross_entropy(logits, y).detach(), logits)

    def end_batch(self, model) -> None:
        pass


class SLTT(OnlineBase):
    name = "sltt"
    OPTIONS = {"mse_weight": 0.05, "mse_target": "ones"}


class SLTTK(OnlineBase):
    name = "sltt_k"
    OPTIONS = {"mse_weight": 0.05, "mse_target": "ones", "k": 2}

    def __init__(self, cfg=None, **kw) -> None:
        super().__init__(cfg, **kw)
        k = self.options["k"]
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"sltt_k: option k must be a positive integer, got {k!r}")

    def backward_steps(self) -> set[int]:
        k = min(self.options["k"], self.T)
        return set(torch.randperm(self.T)[:k].tolist())


# --------------------------------------------------------------------------- OTTT


class _TraceGrad(torch.autograd.Function):
    """op(x) in the forward; in the backward the weight gradient uses the presynaptic trace instead of x.
    Saves the trace (one input-sized tensor) and, for the input gradient, nothing else but the weight."""

    @staticmethod
    def forward(ctx, x, trace, weight, bias, conv):  # type: ignore[override]
        ctx.conv = conv
        ctx.input_shape = x.shape
        ctx.save_for_backward(trace, weight)
        ctx.has_bias = bias is not None
        if conv is None:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        trace, weight = ctx.saved_tensors
        conv = ctx.conv
        if conv is None:
            g_x = grad @ weight if ctx.needs_input_grad[0] else None
            g_w = grad.reshape(-1, grad.shape[-1]).T @ trace.reshape(-1, trace.shape[-1])
            g_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        else:
            kw = dict(stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"], groups=conv["groups"])
            g_x = conv2d_input(ctx.input_shape, weight, grad, **kw) if ctx.needs_input_grad[0] else None
            g_w = conv2d_weight(trace, weight.shape, grad, **kw)
            g_b = grad.sum((0, 2, 3)) if ctx.has_bias else None
        return g_x, None, g_w, g_b, None


def _traced_forward(self, x):
    if not self._ottt_active:
        return type(self).forward(self, x)
    with torch.no_grad():
        self._ottt_trace = x.detach().clone() if self._ottt_trace is None else self._ottt_trace.mul_(self._ottt_decay).add_(x)
    conv = None
    if isinstance(self, nn.Conv2d):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("OTTT trace wrapper supports zero padding given as numbers only")
        conv = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}
    return _TraceGrad.apply(x, self._ottt_trace, self.weight, self.bias, conv)


class OTTTBase(OnlineBase):
    """Wraps every Conv2d/Linear after the first (in module order) so that its weight gradient uses the
    presynaptic trace; the first layer sees the raw input, as in the official code."""

    OPTIONS = {"mse_weight": 0.05, "mse_target": "onehot"}

    def prepare(self, model: nn.Module) -> nn.Module:
        params = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for m in params[1:]:
            m._ottt_active = False
            m._ottt_trace = None
            m._ottt_decay = self.neuron.decay
            m.forward = types.MethodType(_traced_forward, m)
        model.__dict__["_ottt_wrapped"] = params[1:]
        return model

    def _wrapped(self, model) -> list[nn.Module]:
        wrapped = model.__dict__.get("_ottt_wrapped")
        if wrapped is None:
            self.prepare(model)
            wrapped = model.__dict__["_ottt_wrapped"]
        return wrapped

    def begin_batch(self, model) -> None:
        for m in self._wrapped(model):
            m._ottt_active, m._ottt_trace = True, None

    def end_batch(self, model) -> None:
        for m in self._wrapped(model):
            m._ottt_active, m._ottt_trace = False, None


class OTTTA(OTTTBase):
    name = "ottt_a"


class OTTTO(OTTTBase):
    name = "ottt_o"
    online_update = True
