"""Online training methods: OTTT (ottt_a, ottt_o) and SLTT (sltt, sltt_k).

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
from .neuron import charge


def _online(self: LIF, x: torch.Tensor) -> torch.Tensor:
    """One step with V_{t-1} detached before the charge: no gradient through time.

    On the triton backend, where these spikes go straight into an OTTT-traced layer (``_traced_forward`` links
    it to this LIF at the first step of a batch), the step's kernel also updates that layer's presynaptic trace,
    and the spikes carry a mark so that the layer does not update it again."""
    v = None if self.v is None else self.v.detach()
    reader = self.__dict__.get("_ottt_reader")
    if self.backend == "triton" and reader is not None and reader._ottt_active and reader._ottt_trace is not None:
        from .triton_lif import TritonLIFStep

        s, self.v = TritonLIFStep.apply(x, v, self.neuron, reader._ottt_trace, reader._ottt_decay)
        s._ottt_traced_for = reader
    else:
        s, self.v = self.step(v, x)
    if self.backend == "triton":
        s._ottt_lif = self
    return s


LIF.MODES["online"] = _online
BatchNorm.MODES["online"] = BatchNorm._standard  # per-step batch statistics


class OnlineBase(Method):
    OPTIONS = {"mse_weight": 0.05, "mse_target": "onehot"}
    fidelity_reference = "bptt_s"  # one step per call, per-step BN statistics
    memory_in_T = "flat"  # one step's graph at a time
    online_update = False
    lif_mode = "online"

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
        configure(model, self.lif_mode, T, **self.flags())
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
        self.end_batch(model)
        reset_state(model)
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
    Saves the trace (one input-sized tensor) and, for the input gradient, nothing else but the weight. Under
    autocast (precision bf16) it computes and saves in autocast's dtype, as autocast's own conv would, and returns
    each gradient in its input's dtype."""

    @staticmethod
    def forward(ctx, x, trace, weight, bias, conv):  # type: ignore[override]
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        ctx.conv = conv
        ctx.input_shape = x.shape
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        x, trace, w = x.to(dt), trace.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        ctx.save_for_backward(trace, w)
        ctx.has_bias = bias is not None
        with torch.autocast(dev, enabled=False):
            if conv is None:
                return F.linear(x, w, bias)
            return F.conv2d(x, w, bias, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        trace, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
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
        x_dt, w_dt, b_dt = ctx.dtypes
        return (None if g_x is None else g_x.to(x_dt), None, g_w.to(w_dt),
                None if g_b is None else g_b.to(b_dt), None)


def _traced_forward(self, x):
    if not self._ottt_active:
        return type(self).forward(self, x)
    lif = getattr(x, "_ottt_lif", None)  # spikes straight from a LIF on the triton backend: it may fuse the trace
    if lif is not None and lif.__dict__.get("_ottt_reader") is None:
        lif.__dict__["_ottt_reader"] = self  # (a plain attribute: not a submodule of the LIF)
    if getattr(x, "_ottt_traced_for", None) is not self:  # else that LIF's kernel has updated the trace already
        with torch.no_grad():
            self._ottt_trace = (x.detach().clone() if self._ottt_trace is None
                                else self._ottt_trace.mul_(self._ottt_decay).add_(x))
    conv = None
    if isinstance(self, nn.Conv2d):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("OTTT trace wrapper supports zero padding given as numbers only")
        conv = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}
    return _TraceGrad.apply(x, self._ottt_trace, self.weight, self.bias, conv)


class ScaledWS(nn.Module):
    """Scaled weight standardisation (NF-Net style, the OTTT paper's normaliser): per output channel
    W_hat = gain * (W - mean W) / sqrt(Var(W) * fan_in + 1e-4), unbiased variance, learnable gain (init 1)."""

    def __init__(self, out_channels: int, ndim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones((out_channels,) + (1,) * (ndim - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        fan_in = w[0].numel()
        var, mean = torch.var_mean(w, dim=dims, keepdim=True, correction=1)
        return self.gain * (w - mean) * torch.rsqrt(var * fan_in + 1e-4)


WS_SCALE = 2.74  # the constant after every hidden neuron with scaled WS (OTTT-SNN issue #3, paper App. C.1)


class Scale(nn.Module):
    """Multiplies by a constant: OTTT's 2.74 after a neuron under scaled WS, as its own module so that the neuron
    itself still emits spikes (what a firing-rate readout counts)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.c

    def extra_repr(self) -> str:
        return f"c={self.c}"


def use_scaled_ws(model: nn.Module) -> None:
    """OTTT's own normalisation: scaled WS on every conv and hidden linear, BN switched off, spikes (and
    so traces) multiplied by 2.74 after every hidden neuron (a Scale module after each LIF). A wrapper on the
    same architecture."""
    from torch.nn.utils import parametrize

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in list(model.modules()):
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m is not linears[-1]):
            parametrize.register_parametrization(m, "weight", ScaledWS(m.weight.shape[0], m.weight.dim()))
        elif isinstance(m, BatchNorm):
            m.disabled = True
        for name, child in list(m.named_children()):
            if isinstance(child, LIF):
                setattr(m, name, nn.Sequential(child, Scale(WS_SCALE)))


class OTTTBase(OnlineBase):
    """Wraps every Conv2d/Linear after the first (in module order) so that its weight gradient uses the
    presynaptic trace; the first layer sees the raw input, as in the official code. Option ``norm``:
    "bn" (default: the same BN architecture as every method, per-step statistics) or "ws" (the paper's
    scaled weight standardisation without BN)."""

    OPTIONS = {"mse_weight": 0.05, "mse_target": "onehot", "norm": "bn"}

    def __init__(self, cfg=None, **kw) -> None:
        super().__init__(cfg, **kw)
        if self.options["norm"] not in ("bn", "ws"):
            raise ValueError(f"{self.name}: option norm must be 'bn' or 'ws', got {self.options['norm']!r}")

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.options["norm"] == "ws" and not model.__dict__.get("_scaled_ws"):
            use_scaled_ws(model)
            model.__dict__["_scaled_ws"] = True
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


# --------------------------------------------------------------------------- OS (online stabilization)


def _os_lif(self: LIF, x: torch.Tensor) -> torch.Tensor:
    """Online LIF with the online threshold stabilizer (OTS): after the charge, the layer's whole H_t gives
    one mean m_t and std s_t; at t=1 rho = (theta_0 - m_1) / s_1, and at every t theta_t = m_t + rho s_t
    (no gradient). With the flag ``fixed_threshold`` in evaluation, theta_t is the running average of the
    training thresholds of step t instead (inference then does not depend on the test batch)."""
    cfg = self.neuron
    h = charge(None if self.v is None else self.v.detach(), x, cfg)
    t = self.steps
    thresholds = self.__dict__.setdefault("os_thresholds", {})  # running per-step thresholds, kept across batches
    if not self.training and self.flags.get("fixed_threshold") and t in thresholds:
        th = thresholds[t]
    else:
        with torch.no_grad():
            if self.synced:  # data parallel: the layer's statistics over every rank's batch
                from .syncbn import global_moments

                m, var, n = global_moments(h.reshape(-1, 1), self.group)
                mean, std = m[0], torch.sqrt(var[0] * (n / max(n - 1, 1)))  # std_mean's unbiased std
            else:
                std, mean = torch.std_mean(h)
            std = std.clamp_min(1e-8)
            if t == 0:
                self.rho = (cfg.threshold - mean) / std
            th = mean + self.rho * std
        if self.training:
            old = thresholds.get(t)
            thresholds[t] = th.detach().clone() if old is None else old + 0.1 * (th.detach() - old)
    s = cfg.spike_fn.apply(h - th, cfg.alpha)
    s_r = s.detach() if cfg.detach_reset else s
    self.v = h - th * s_r if cfg.reset == "soft" else h * (1.0 - s_r) + cfg.v_reset * s_r
    self.steps += 1
    return s


def _osr_bn(self: BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Online spiking renormalization (OSR). Training: the forward normalises with the running statistics;
    the gradient is that of batch-statistics BN rescaled Batch-Renormalization style, r = sigma_B / sigma_run
    and d = (mu_B - mu_run) / sigma_run held constant (y = gamma (xhat_B r + d) + beta, whose value is
    gamma (x - mu_run) / sigma_run + beta). Each step adds its batch mean and E[x^2] to accumulators; at the
    end of the batch they give the exact mean and variance pooled over all T*B*H*W inputs, which update the
    running statistics (the first batch sets them). If some channel's r exceeds 20 (start-up), the batch
    statistics are used for that step, as the official code does. Evaluation: the running statistics."""
    if not self.training:
        return self._standard(x)
    if self.synced:
        return _osr_bn_synced(self, x)
    dims = (0,) + tuple(range(2, x.dim()))
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    var_b, mean_b = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    _osr_accumulate(self, mean_b.detach().view(-1), var_b.detach().view(-1))
    std_b = torch.sqrt(var_b + self.eps)
    xhat = (x - mean_b) / std_b
    if self.__dict__.get("osr_batches", 0) > 0:
        with torch.no_grad():
            std_run = torch.sqrt(self.running_var + self.eps).view(shape)
            r = std_b / std_run
            d = (mean_b - self.running_mean.view(shape)) / std_run
            use_running = r.max() <= 20.0  # a device tensor: no host sync
        xhat = torch.where(use_running, xhat * r + d, xhat)
    return xhat * self.weight.view(shape) + self.bias.view(shape) if self.affine else xhat


def _osr_accumulate(bn: BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.mean_sum is None:
            bn.mean_sum, bn.invstd_sq_sum = mean.clone(), var + mean * mean  # sums of mu_t and E_t[x^2]
        else:
            bn.mean_sum.add_(mean)
            bn.invstd_sq_sum.add_(var + mean * mean)
        bn.steps += 1


def _osr_bn_synced(self: BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """OSR over every rank's batch (methods/distributed.py): y = w (xhat r + d) + b is BN with the weight w r and
    the bias w d + b, r and d constants, so the synchronised BN function gives its value and its gradient
    through the global batch statistics."""
    from .syncbn import SyncBatchNormFunction, global_moments

    mean, var, count = global_moments(x.detach(), self.group)
    _osr_accumulate(self, mean, var)
    invstd = torch.rsqrt(var + self.eps)
    w = self.weight if self.affine else torch.ones_like(mean)
    b = self.bias if self.affine else torch.zeros_like(mean)
    if self.__dict__.get("osr_batches", 0) > 0:
        with torch.no_grad():
            std_run = torch.sqrt(self.running_var + self.eps)
            r = torch.sqrt(var + self.eps) / std_run
            d = (mean - self.running_mean) / std_run
            use_running = r.max() <= 20.0
        w, b = torch.where(use_running, w * r, w), torch.where(use_running, w * d + b, b)
    return SyncBatchNormFunction.apply(x, w, b, mean, invstd, count, self.group)


def osr_pooled_statistics(bn: BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) pooled over the steps accumulated so far."""
    mean = bn.mean_sum / bn.steps
    return mean, bn.invstd_sq_sum / bn.steps - mean * mean


def osr_update_running(bn: BatchNorm) -> None:
    if not bn.steps:
        return
    with torch.no_grad():
        mean, var = osr_pooled_statistics(bn)
        if bn.__dict__.get("osr_batches", 0) == 0:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        else:
            mom = bn.momentum if bn.momentum is not None else 0.1
            bn.running_mean.add_(mom * (mean - bn.running_mean))
            bn.running_var.add_(mom * (var - bn.running_var))
        bn.num_batches_tracked.add_(1)
    bn.__dict__["osr_batches"] = bn.__dict__.get("osr_batches", 0) + 1


LIF.MODES["os"] = _os_lif
BatchNorm.MODES["os"] = _osr_bn


class OS(OnlineBase):
    """Online stabilization (Zhu et al., ICLR 2024): SLTT-style gradient, OSR batch norm and the OTS
    threshold. Option ``fixed_test_threshold``: evaluate with the running per-step training thresholds
    instead of the test batch's own (the official default is the batch-dependent one)."""

    name = "os"
    torch_only = "its neuron's threshold follows each step's membrane statistics (OTS), which no fused kernel computes"
    OPTIONS = {"mse_weight": 0.05, "mse_target": "onehot", "fixed_test_threshold": False}
    lif_mode = "os"

    def flags(self) -> dict:
        return {"fixed_threshold": self.options["fixed_test_threshold"]}

    def end_batch(self, model) -> None:
        for m in model.modules():
            if isinstance(m, BatchNorm):
                osr_update_running(m)

    @torch.no_grad()
    def infer_steps(self, model, x):
        """OS evaluates with its own neuron: T single steps with the OTS threshold, BN on running statistics."""
        configure(model, "os", self.T, **self.flags())
        reset_state(model)
        out = torch.stack([model(self.step_input(model, x, t)) for t in range(self.T)])
        reset_state(model)
        return out
