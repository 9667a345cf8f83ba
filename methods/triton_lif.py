"""Fused multi-step LIF kernels in Triton: one program per block of neurons, the loop over T inside the kernel.

- ``lif_forward``: BPTT's forward. Reads the input current of every step, writes the spikes and keeps the charged
  membrane H_t of every step for the backward (what the torch loop keeps too: the surrogate's argument).
- ``lif_backward``: scans time in reverse from the kept H_t: dL/dH_t = dL/dS_t g'(H_t - theta) + dL/dV_t dV_t/dH_t,
  dL/dV_t = lambda dL/dH_{t+1} (0 at the last step); dL/dX_t = dL/dH_t. dV_t/dH_t follows the reset: soft
  detached 1, soft 1 - theta g', hard detached 1 - S, hard (1 - S) + (V_reset - H) g' (methods.neuron.dv_dh).
- ``rate_spike_pass``: rate-BP's spike pass: spikes, the spike count and the eligibility sum_t g'(z_t) rho_t with
  rho_{t+1} = 1 + lambda rho_t dV_t/dH_t, all in one pass, nothing kept for a backward.
- ``TritonLIFStep``: one step of the single-step modes (bptt_s, and the online methods with V_{t-1} detached):
  charge, fire and reset in one kernel, keeping H_t (for OTTT, the same kernel updates the presynaptic trace of
  the layer that reads the spikes); its backward one kernel: dL/dH_t = dL/dS_t g' + dL/dV_t dV_t/dH_t, returned
  as dL/dX_t and, times lambda, as dL/dV_{t-1}.
- ``rate_spike_step``: one step of rate-BP's single-step spike pass (rate_s): spike, the new membrane and rho,
  and the spike count and eligibility sums updated in place, one kernel.

The arithmetic of every step is the torch loop's, operation by operation (methods/neuron.py: charge, fire,
reset), in float32. Every launch passes ``enable_fp_fusion=False`` (``EAGER_ROUNDING``): eager torch rounds
``decay * v`` and then ``+ x``, two kernels, while a compiled Triton kernel would contract them into one fused
multiply-add, one rounding; a membrane one unit in the last place off moves the surrogate gradient, and one that
lands that close to the threshold fires differently (``benchmarks/rounding.py`` counts both on a CPU). The CPU
interpreter never contracts. What still differs on a GPU is the hardware's own arithmetic in the surrogate
(Triton's exp and division are the fast approximate ones), a few units in the last place: the GPU whole-step
test states its tolerance for it (tests/test_backends.py). ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors
(what the tests do without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .neuron import NeuronConfig

SURROGATE_KIND = {"sigmoid": 0, "triangle": 1, "rectangle": 2}
BLOCK = 1024
# every launch: no multiply-add contracted into one rounding, so the membrane rounds as eager torch's (docstring)
EAGER_ROUNDING = {"enable_fp_fusion": False}


@triton.jit
def _surrogate(z, alpha, KIND: tl.constexpr):
    if KIND == 0:
        sig = tl.sigmoid(alpha * z)
        out = alpha * sig * (1.0 - sig)
    elif KIND == 1:
        out = tl.maximum(alpha - alpha * alpha * tl.abs(z), 0.0)
    else:
        out = tl.where(tl.abs(z) <= alpha / 2, 1.0, 0.0) / alpha
    return out


@triton.jit
def _charge(v, x, decay, v_reset, FIRST: tl.constexpr, HARD_VRESET: tl.constexpr):
    if FIRST:
        if HARD_VRESET:
            h = x + v_reset
        else:
            h = x
    else:
        h = decay * v + x
        if HARD_VRESET:
            h = h + (1.0 - decay) * v_reset
    return h


@triton.jit
def _reset(h, s, threshold, v_reset, SOFT: tl.constexpr, HARD_VRESET: tl.constexpr):
    if SOFT:
        v = h - threshold * s
    elif HARD_VRESET:
        v = h * (1.0 - s) + v_reset * s
    else:
        v = h * (1.0 - s)
    return v


@triton.jit
def _dv_dh(h, s, sg, v_reset, threshold, SOFT: tl.constexpr, DETACH: tl.constexpr):
    if SOFT:
        if DETACH:
            k = tl.full(h.shape, 1.0, tl.float32)
        else:
            k = 1.0 - threshold * sg
    else:
        if DETACH:
            k = 1.0 - s
        else:
            k = (1.0 - s) + (v_reset - h) * sg
    return k


@triton.jit
def _lif_fwd_kernel(x_ptr, s_ptr, h_ptr, N, T, decay, threshold, v_reset, alpha,
                    SOFT: tl.constexpr, HARD_VRESET: tl.constexpr, SAVE_H: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = _charge(x, x, decay, v_reset, True, HARD_VRESET)
    s = tl.where(h - threshold >= 0, 1.0, 0.0)
    tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
    if SAVE_H:
        tl.store(h_ptr + offs, h, mask=mask)
    v = _reset(h, s, threshold, v_reset, SOFT, HARD_VRESET)
    for t in range(1, T):
        x = tl.load(x_ptr + t * N + offs, mask=mask, other=0.0).to(tl.float32)
        h = _charge(v, x, decay, v_reset, False, HARD_VRESET)
        s = tl.where(h - threshold >= 0, 1.0, 0.0)
        tl.store(s_ptr + t * N + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_H:
            tl.store(h_ptr + t * N + offs, h, mask=mask)
        v = _reset(h, s, threshold, v_reset, SOFT, HARD_VRESET)


@triton.jit
def _lif_bwd_kernel(gs_ptr, h_ptr, gx_ptr, N, T, decay, threshold, v_reset, alpha,
                    SOFT: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gh_next = tl.zeros([BLOCK], tl.float32)
    for i in range(T):
        t = T - 1 - i
        h = tl.load(h_ptr + t * N + offs, mask=mask, other=0.0)
        gs = tl.load(gs_ptr + t * N + offs, mask=mask, other=0.0).to(tl.float32)
        z = h - threshold
        s = tl.where(z >= 0, 1.0, 0.0)
        sg = _surrogate(z, alpha, KIND)
        gh = gs * sg + (decay * gh_next) * _dv_dh(h, s, sg, v_reset, threshold, SOFT, DETACH)
        tl.store(gx_ptr + t * N + offs, gh.to(gx_ptr.dtype.element_ty), mask=mask)
        gh_next = gh


@triton.jit
def _rate_pass_kernel(x_ptr, s_ptr, rate_ptr, elig_ptr, N, T, decay, threshold, v_reset, alpha,
                      SOFT: tl.constexpr, HARD_VRESET: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = _charge(x, x, decay, v_reset, True, HARD_VRESET)
    z = h - threshold
    s = tl.where(z >= 0, 1.0, 0.0)
    tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
    sg = _surrogate(z, alpha, KIND)
    elig = sg
    count = s
    rho = 1.0 + decay * _dv_dh(h, s, sg, v_reset, threshold, SOFT, DETACH)
    v = _reset(h, s, threshold, v_reset, SOFT, HARD_VRESET)
    for t in range(1, T):
        x = tl.load(x_ptr + t * N + offs, mask=mask, other=0.0).to(tl.float32)
        h = _charge(v, x, decay, v_reset, False, HARD_VRESET)
        z = h - threshold
        s = tl.where(z >= 0, 1.0, 0.0)
        tl.store(s_ptr + t * N + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
        sg = _surrogate(z, alpha, KIND)
        elig = elig + sg * rho
        count = count + s
        rho = 1.0 + (rho * decay) * _dv_dh(h, s, sg, v_reset, threshold, SOFT, DETACH)
        v = _reset(h, s, threshold, v_reset, SOFT, HARD_VRESET)
    tl.store(rate_ptr + offs, count, mask=mask)
    tl.store(elig_ptr + offs, elig, mask=mask)


@triton.jit
def _step_fwd_kernel(x_ptr, v_ptr, s_ptr, h_ptr, vo_ptr, tr_ptr, N, decay, threshold, v_reset, trace_decay,
                     FIRST: tl.constexpr, SOFT: tl.constexpr, HARD_VRESET: tl.constexpr, HAS_TRACE: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        v = x
    else:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = _charge(v, x, decay, v_reset, FIRST, HARD_VRESET)
    s = tl.where(h - threshold >= 0, 1.0, 0.0)
    tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offs, h, mask=mask)
    tl.store(vo_ptr + offs, _reset(h, s, threshold, v_reset, SOFT, HARD_VRESET).to(vo_ptr.dtype.element_ty), mask=mask)
    if HAS_TRACE:  # OTTT: the next layer's presynaptic trace a_t = lambda a_{t-1} + S_t, in place
        a = tl.load(tr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(tr_ptr + offs, (trace_decay * a + s).to(tr_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_bwd_kernel(gs_ptr, gv_ptr, h_ptr, gx_ptr, N, threshold, v_reset, alpha,
                     SOFT: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    gs = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gv = tl.load(gv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = h - threshold
    s = tl.where(z >= 0, 1.0, 0.0)
    sg = _surrogate(z, alpha, KIND)
    gh = gs * sg + gv * _dv_dh(h, s, sg, v_reset, threshold, SOFT, DETACH)
    tl.store(gx_ptr + offs, gh.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rate_step_kernel(x_ptr, v_ptr, rho_ptr, s_ptr, vo_ptr, rho_out_ptr, count_ptr, elig_ptr, N,
                      decay, threshold, v_reset, alpha, FIRST: tl.constexpr, SOFT: tl.constexpr,
                      HARD_VRESET: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST:
        v = x
        rho = tl.full([BLOCK], 1.0, tl.float32)
    else:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rho = tl.load(rho_ptr + offs, mask=mask, other=0.0)
    h = _charge(v, x, decay, v_reset, FIRST, HARD_VRESET)
    z = h - threshold
    s = tl.where(z >= 0, 1.0, 0.0)
    sg = _surrogate(z, alpha, KIND)
    if FIRST:
        elig = sg * rho
        count = s
    else:
        elig = tl.load(elig_ptr + offs, mask=mask, other=0.0) + sg * rho
        count = tl.load(count_ptr + offs, mask=mask, other=0.0) + s
    tl.store(elig_ptr + offs, elig, mask=mask)
    tl.store(count_ptr + offs, count, mask=mask)
    tl.store(rho_out_ptr + offs, 1.0 + (rho * decay) * _dv_dh(h, s, sg, v_reset, threshold, SOFT, DETACH), mask=mask)
    tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
    tl.store(vo_ptr + offs, _reset(h, s, threshold, v_reset, SOFT, HARD_VRESET).to(vo_ptr.dtype.element_ty), mask=mask)


INT32_MAX = 2**31 - 1


def _blocks(n: int, total: int | None = None) -> tuple[int]:
    """The launch grid for ``n`` neurons a step (``total``: every element a kernel indexes, T*n for the multi-step
    kernels). The kernels index with 32-bit offsets (t * N + offs): past 2^31 elements they would wrap around and
    read and write other memory, so that is refused with a clear message instead."""
    total = n if total is None else total
    if total + BLOCK > INT32_MAX:  # the masked lanes past the end compute their offsets too
        raise ValueError(f"the Triton LIF kernels index with 32-bit offsets: {total} elements (over 2^31) in one "
                         "launch; use backend 'torch', or a smaller batch or T")
    return (triton.cdiv(n, BLOCK),)


def _flags(cfg: NeuronConfig) -> dict:
    return {"SOFT": cfg.reset == "soft", "HARD_VRESET": cfg.reset == "hard" and bool(cfg.v_reset)}


def _scalars(cfg: NeuronConfig) -> tuple[float, float, float, float]:
    return float(cfg.decay), float(cfg.threshold), float(cfg.v_reset), float(cfg.alpha)


def lif_forward(x: torch.Tensor, cfg: NeuronConfig, save_h: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [T, ...] (contiguous). Returns (spikes [T, ...] in x's dtype, H [T, ...] float32 or None)."""
    x = x.contiguous()
    T, N = x.shape[0], x[0].numel()
    s = torch.empty_like(x)
    h = torch.empty(x.shape, dtype=torch.float32, device=x.device) if save_h else s
    _lif_fwd_kernel[_blocks(N, x.numel())](x, s, h, N, T, *_scalars(cfg), SAVE_H=save_h, BLOCK=BLOCK, **_flags(cfg),
                                           **EAGER_ROUNDING)
    return s, (h if save_h else None)


def lif_backward(grad_s: torch.Tensor, h: torch.Tensor, cfg: NeuronConfig, dtype: torch.dtype) -> torch.Tensor:
    grad_s = grad_s.contiguous()
    T, N = h.shape[0], h[0].numel()
    gx = torch.empty(h.shape, dtype=dtype, device=h.device)
    _lif_bwd_kernel[_blocks(N, h.numel())](grad_s, h, gx, N, T, *_scalars(cfg), SOFT=cfg.reset == "soft",
                                              DETACH=cfg.detach_reset, KIND=SURROGATE_KIND[cfg.surrogate], BLOCK=BLOCK,
                                              **EAGER_ROUNDING)
    return gx


class TritonLIF(torch.autograd.Function):
    """Multi-step LIF, [T, ...] in and spikes out, forward and backward one kernel each."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cfg: NeuronConfig) -> torch.Tensor:  # type: ignore[override]
        s, h = lif_forward(x, cfg, save_h=True)
        ctx.save_for_backward(h)
        ctx.cfg, ctx.dtype = cfg, x.dtype
        return s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        return lif_backward(grad, h, ctx.cfg, ctx.dtype), None


def rate_spike_pass(x: torch.Tensor, cfg: NeuronConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [T, ...]. Returns (spikes [T, ...], spike count [...], eligibility sum [...]) with no autograd."""
    x = x.contiguous()
    T, N = x.shape[0], x[0].numel()
    s = torch.empty_like(x)
    count = torch.empty(x.shape[1:], dtype=torch.float32, device=x.device)
    elig = torch.empty_like(count)
    _rate_pass_kernel[_blocks(N, x.numel())](x, s, count, elig, N, T, *_scalars(cfg),
                                                DETACH=cfg.detach_reset, KIND=SURROGATE_KIND[cfg.surrogate],
                                                BLOCK=BLOCK, **_flags(cfg), **EAGER_ROUNDING)
    return s, count.to(x.dtype), elig.to(x.dtype)


class TritonLIFStep(torch.autograd.Function):
    """One LIF step: (x_t, V_{t-1} or None at the first step) -> (S_t, V_t), forward and backward one kernel each;
    keeps H_t (float32) for the backward. Given ``trace`` (a contiguous tensor of S_t's shape, no autograd), the
    forward kernel also updates it in place to ``trace_decay * trace + S_t`` (OTTT's presynaptic trace of the
    layer that reads these spikes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor | None, cfg: NeuronConfig,  # type: ignore[override]
                trace: torch.Tensor | None = None, trace_decay: float = 0.0):
        x = x.contiguous()
        first = v is None
        s, v_out = torch.empty_like(x), torch.empty_like(x)
        h = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        decay, threshold, v_reset, _ = _scalars(cfg)
        if trace is not None and (trace.shape != x.shape or not trace.is_contiguous()):
            raise ValueError(f"trace of shape {tuple(trace.shape)} for spikes of shape {tuple(x.shape)}")
        _step_fwd_kernel[_blocks(x.numel())](x, x if first else v.contiguous(), s, h, v_out,
                                                          s if trace is None else trace, x.numel(), decay, threshold,
                                                          v_reset, float(trace_decay), FIRST=first,
                                                          HAS_TRACE=trace is not None, BLOCK=BLOCK, **_flags(cfg),
                                                          **EAGER_ROUNDING)
        ctx.save_for_backward(h)
        ctx.cfg, ctx.dtype, ctx.first = cfg, x.dtype, first
        return s, v_out

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor, grad_v: torch.Tensor):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        cfg = ctx.cfg
        gx = torch.empty(h.shape, dtype=ctx.dtype, device=h.device)
        _, threshold, v_reset, alpha = _scalars(cfg)
        _step_bwd_kernel[_blocks(h.numel())](grad_s.contiguous(), grad_v.contiguous(), h, gx, h.numel(),
                                                          threshold, v_reset, alpha, SOFT=cfg.reset == "soft",
                                                          DETACH=cfg.detach_reset, KIND=SURROGATE_KIND[cfg.surrogate],
                                                          BLOCK=BLOCK, **EAGER_ROUNDING)
        gv = None if ctx.first or not ctx.needs_input_grad[1] else gx * cfg.decay
        return gx, gv, None, None, None


def rate_spike_step(x: torch.Tensor, v: torch.Tensor | None, rho: torch.Tensor | None, count: torch.Tensor | None,
                    elig: torch.Tensor | None, cfg: NeuronConfig):
    """One step of the single-step spike pass (no autograd). ``v``, ``rho``, ``count``, ``elig`` are None at the
    first step. Returns (spike, V_t, rho_{t+1}, count, elig); count and elig (float32) are updated in place after
    the first step."""
    x = x.contiguous()
    first = v is None
    s, v_out = torch.empty_like(x), torch.empty_like(x)
    rho_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if first:
        count, elig = torch.empty_like(rho_out), torch.empty_like(rho_out)
    _rate_step_kernel[_blocks(x.numel())](x, x if first else v.contiguous(), rho_out if first else rho,
                                                       s, v_out, rho_out, count, elig, x.numel(), *_scalars(cfg),
                                                       FIRST=first, DETACH=cfg.detach_reset,
                                                       KIND=SURROGATE_KIND[cfg.surrogate], BLOCK=BLOCK, **_flags(cfg),
                                                       **EAGER_ROUNDING)
    return s, v_out, rho_out, count, elig
