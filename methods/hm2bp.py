"""HM2-BP: hybrid macro/micro backpropagation (Jin, Zhang, Li, NeurIPS 2018), batched and vectorised over time.

The network is simulated forward with no autograd; the gradient is computed once per batch from whole spike
trains (Jin et al., NeurIPS 2018):

- neuron, per step: v <- v(1 - 1/tau_m); c <- c(1 - 1/tau_s); c += I(t-1) (the layer's input response one step
  earlier); v += c/tau_s; during the refractory period (2 steps after a spike) v = 0; a spike when
  v > V_th - 1e-6, then v = 0. tau_m = 64, tau_s = 8. The input responses of all steps come from one op
  (matmul or convolution) over [T*B, ...].
- loss (macro level) on output spike counts o: target 35 for the label, 5 for the others, delta = o - y where
  |o - y| > margin 5, else 0. A silent label neuron gets 35 evenly spaced spikes for the S-PSP and the counts
  the gradient divides by (not for delta), so that its S-PSP is not zero and learning can start.
- S-PSP (micro level) e_{i|j}: for post spikes t_1 < t_2 < ... of i, r_k = t_{k-1} + 2 (r_1 = 0), s_k = t_k - r_k;
  each pre spike of j at t_p arrives at q = t_p + 2; when q <= t_k, u = t_k - q, it contributes K(u) if u <= s_k
  and exp(-(u - s_k)/tau_s) K(s_k) otherwise, K(u) = (exp(-u/tau_m) - exp(-u/tau_s)) / (1 - tau_s/tau_m).
  e = 0.1 where i never fires and j does. (The CUDA code also drops pre spikes older than 4 tau_m before t_k;
  this port does not: it only matters after > 256 silent steps.)
- gradients: delta~_i = delta_i / V_th; dE/dw_ij = delta~_i e_{i|j} (1 + sigma_i), sigma_i = sum_j w_ij e_{i|j} /
  (V_th o_i) (0.5 where o_i = 0); the error of the layer below delta_j = sum_i delta~_i w_ij e_{i|j} / o_j
  (sum_i delta~_i w_ij where o_j = 0). Adam with lr/sqrt(epoch + 1) (grid: optimizer = "adam",
  schedule = "invsqrt").

Vectorised S-PSP: with pre traces A^x_j(tau) = sum_{q_p <= tau} exp(-(tau - q_p)/tau_x) (x in {m, s}, one
[T, T] decay matrix times the shifted spike trains) and post coefficients P^x_i(t) built from each post
neuron's spike times by one scatter over time, e_{i|j} = sum_t P^m_i(t) A^m_j(t) + P^s_i(t) A^s_j(t) (+ the 0.1
floor). Every quantity the gradient needs is then a contraction over (batch, time) done with the layer's own
op and its vector-Jacobian products: e is never materialised and nothing loops over spikes or synapses.

Not ported: the output layer's lateral inhibition and its gradient factor, the weight regulariser (lambda,
beta, limit 8), the bias injected every ``dummyFreq`` steps and N-MNIST's saccade stabilisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import NULL_PROBE, Method, Probe, StepOutput
from .models.hm2 import HM2_ARCHS, HM2Net, HM2Neuron, simulate  # noqa: F401  (simulate: the forward, re-exported)

TARGET_LABEL, TARGET_OTHER, MARGIN = 35.0, 5.0, 5.0
ARRIVAL_DELAY = 2  # a pre spike at t_p enters the S-PSP at q = t_p + 2
SILENT_PSP = 0.1  # e_{i|j} where i never fires and j does
POISSON_DIVISOR = 5.5  # per-step spike probability = intensity / 5.5 (<= 0.18)


def psp_kernel(u: torch.Tensor, n: HM2Neuron) -> torch.Tensor:
    return (torch.exp(-u / n.tau_m) - torch.exp(-u / n.tau_s)) / (1.0 - n.tau_s / n.tau_m)


# ---------------------------------------------------------------- S-PSP in matmul form

def decay_matrix(T: int, tau: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """D[tau, q] = exp(-(tau - q)/tau_x) for q <= tau, else 0."""
    t = torch.arange(T, device=device, dtype=torch.float64)
    d = t[:, None] - t[None, :]
    return torch.where(d >= 0, torch.exp(-d.clamp(min=0) / tau), torch.zeros((), dtype=torch.float64, device=device)).to(dtype)


def pre_traces(spikes: torch.Tensor, n: HM2Neuron = HM2Neuron()) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^m, A^s), each [T, B, ...]: the decayed sums of the pre spikes that have arrived (q = t_p + 2 <= tau)."""
    T = spikes.shape[0]
    shifted = torch.zeros_like(spikes)
    if T > ARRIVAL_DELAY:
        shifted[ARRIVAL_DELAY:] = spikes[:-ARRIVAL_DELAY]
    flat = shifted.reshape(T, -1)
    return tuple(
        (decay_matrix(T, tau, spikes.dtype, spikes.device) @ flat).reshape(spikes.shape) for tau in (n.tau_m, n.tau_s)
    )


def post_coefficients(spikes: torch.Tensor, n: HM2Neuron = HM2Neuron()) -> tuple[torch.Tensor, torch.Tensor]:
    """(P^m, P^s), each [T, B, ...], such that e_{i|j} = sum_t P^m_i(t) A^m_j(t) + P^s_i(t) A^s_j(t)."""
    T = spikes.shape[0]
    dtype = spikes.dtype
    idx = torch.arange(T, device=spikes.device).view(T, *([1] * (spikes.dim() - 1))).expand_as(spikes)
    last = torch.where(spikes > 0, idx, torch.full_like(idx, -1)).cummax(0).values  # last spike time <= t
    prev = torch.cat([torch.full_like(last[:1], -1), last[:-1]])  # last spike time < t
    r = torch.where(prev >= 0, prev + 2, torch.zeros_like(prev))
    s = (idx - r).to(dtype)
    c = 1.0 - n.tau_s / n.tau_m
    pm = spikes / c
    ps = -spikes / c
    has_before = (r - 1 >= 0).to(dtype) * spikes  # pre spikes that arrived before the reset window
    at = (r - 1).clamp(min=0)
    pm = pm.scatter_add(0, at, -has_before * torch.exp(-(s + 1) / n.tau_m) / c)
    ps = ps.scatter_add(0, at, has_before * (torch.exp(-(s + 1) / n.tau_s) / c
                                              + psp_kernel(s, n) * math.exp(-1.0 / n.tau_s)))
    return pm, ps


def spsp_dense(pre: torch.Tensor, post: torch.Tensor, n: HM2Neuron = HM2Neuron()) -> torch.Tensor:
    """e [B, N_post, N_pre] for flat trains pre [T, B, N_pre], post [T, B, N_post] (tests and small layers)."""
    am, as_ = pre_traces(pre, n)
    pm, ps = post_coefficients(post, n)
    e = torch.einsum("tbi,tbj->bij", pm, am) + torch.einsum("tbi,tbj->bij", ps, as_)
    silent = (post.sum(0) == 0).to(pre.dtype)
    active = (pre.sum(0) > 0).to(pre.dtype)
    return e + SILENT_PSP * silent[:, :, None] * active[:, None, :]


# ---------------------------------------------------------------- gradients

def count_errors(counts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """delta = o - target outside the margin, 0 inside it."""
    target = torch.full_like(counts, TARGET_OTHER)
    target.scatter_(1, y[:, None], TARGET_LABEL)
    d = counts - target
    return torch.where(d.abs() > MARGIN, d, torch.zeros_like(d))


def inject_label_spikes(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Where a sample's label neuron is silent, 35 evenly spaced spikes in its train (a copy)."""
    T, B = out.shape[:2]
    silent = out[:, torch.arange(B), y].sum(0) == 0
    if not silent.any():
        return out
    out = out.clone()
    k = min(int(TARGET_LABEL), T)
    times = torch.linspace(0, T - 1, k, device=out.device).round().long()
    b = torch.nonzero(silent).flatten()
    out[times[:, None], b[None, :], y[b][None, :]] = 1.0
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:  # [T, B, ...] -> [T*B, ...]
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def layer_gradient(op: nn.Module, pre: torch.Tensor, post: torch.Tensor, delta: torch.Tensor, threshold: float,
                   n: HM2Neuron, need_input_error: bool):
    """Weight gradients (summed over the batch) of one layer and the error of the layer below.

    pre [T, B, ...in], post [T, B, ...out] spike trains (post's counts are the ones sigma divides by);
    delta [B, ...out] the count error of this layer. The op runs forward once on each trace (the same outputs
    give sum_j w_ij e_{i|j} and the graph for the vector-Jacobian products: dW = g^T A, W^T g').
    """
    T, B = pre.shape[:2]
    am, as_ = pre_traces(pre, n)
    pm, ps = post_coefficients(post, n)
    o_pre, counts_post = pre.sum(0), post.sum(0)
    active = (o_pre > 0).to(pre.dtype)
    silent = (counts_post == 0).to(pre.dtype)
    dt = delta / threshold  # delta~
    params = [p for p in op.parameters() if p.requires_grad]
    with torch.enable_grad():
        ins = [x.detach().requires_grad_(need_input_error) for x in (_flat(am), _flat(as_), active)]
        outs = [op(x) for x in ins]
    # sum_j w_ij e_{i|j}: the op applied to the traces, contracted with the post coefficients over time
    a = ((pm * outs[0].detach().reshape(post.shape)).sum(0) + (ps * outs[1].detach().reshape(post.shape)).sum(0)
         + SILENT_PSP * silent * outs[2].detach())
    sigma = torch.where(counts_post > 0, a / (threshold * counts_post.clamp(min=1e-12)), torch.full_like(a, 0.5))
    gw = dt * (1.0 + sigma)
    delta_below = None
    if need_input_error:
        (b_plain,) = torch.autograd.grad(outs[2], ins[2], dt, retain_graph=True)  # sum_i dt_i w_ij
        # sum_i dt_i w_ij e_{i|j}, one trace at a time so that one [T, B, ...in] input gradient lives at once
        weighted = torch.zeros_like(o_pre)
        for o, x, g, trace in zip(outs, ins, (_flat(dt * pm), _flat(dt * ps), dt * silent), (am, as_, None)):
            (back,) = torch.autograd.grad(o, x, g, retain_graph=bool(params))
            weighted += (trace * back.reshape(pre.shape)).sum(0) if trace is not None else SILENT_PSP * active * back
            del back
        delta_below = torch.where(o_pre > 0, weighted / o_pre.clamp(min=1e-12), b_plain)
    wgrads: list[torch.Tensor] = []
    if params:
        g_w = (_flat(gw * pm), _flat(gw * ps), gw * silent * SILENT_PSP)
        per = [torch.autograd.grad(o, params, g) for o, g in zip(outs, g_w)]
        wgrads = [sum(gs) for gs in zip(*per)]
    return wgrads, delta_below


def encode(x: torch.Tensor, T: int, model: nn.Module) -> torch.Tensor:
    """Spike trains [T, B, ...]: event input is used as it is (binary bins), static intensities in [0, 1]
    become Poisson (Bernoulli per step) spikes with probability intensity / 5.5."""
    if x.dim() == getattr(model, "sample_ndim", 3) + 2:
        return (x > 0).to(torch.float32)
    p = (x.clamp(0, 1) / POISSON_DIVISOR).unsqueeze(0).expand(T, *x.shape)
    return torch.bernoulli(p)


class HM2BP(Method):
    """HM2-BP on ``hm2_mlp`` / ``hm2_cnn``; any batch size (1 reproduces the paper)."""

    name = "hm2bp"
    torch_only = "it has no LIF layers: its neurons are simulated inside its own model"
    bf16 = "its gradients are computed by hand from float32 activations, outside autograd and autocast"
    OPTIONS: dict = {}
    event_encoding = "spikes"
    fidelity_reference = None  # its own architecture, which no BPTT here trains

    def supports(self, arch: str) -> bool:
        return arch in HM2_ARCHS

    def train_step(self, model: HM2Net, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                   probe: Probe = NULL_PROBE) -> StepOutput:
        n = model.neuron
        with probe.phase("forward"), torch.no_grad():
            trains = model.run(encode(x, self.T, model))
            counts = trains[-1].sum(0)
            delta = count_errors(counts, y)
            loss = 0.5 * (delta ** 2).sum(1).mean()
        with probe.phase("backward"), torch.no_grad():
            optimizer.zero_grad(set_to_none=True)
            B = len(y)
            post = inject_label_spikes(trains[-1], y)
            for layer in range(len(model.ops) - 1, -1, -1):
                op, pre = model.ops[layer], trains[layer]
                wgrads, delta_below = layer_gradient(op, pre, post, delta, model.thresholds[layer], n,
                                                     need_input_error=layer > 0)
                for p, g in zip([p for p in op.parameters() if p.requires_grad], wgrads):
                    p.grad = g / B
                delta, post = delta_below, pre
        with probe.phase("optimizer"):
            optimizer.step()
        return StepOutput(loss.detach(), counts.detach())

    @torch.no_grad()
    def infer(self, model: HM2Net, x: torch.Tensor) -> torch.Tensor:
        return model(encode(x, self.T, model))

    def infer_steps(self, model: HM2Net, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("hm2bp reads its output as spike counts over the whole train, not step by step")
