"""Data parallelism for every method: one model per rank, each on its share of the global batch.

    handle = data_parallel(model, optimizer, group)   # after the model and optimizer are built

does what DistributedDataParallel and SyncBatchNorm do for an ordinary network, in a form every method's step
can use, whatever its number of forward and backward passes:

- parameters and buffers are broadcast from rank 0, so every rank starts from the same model;
- every BN of the model normalises with the statistics of the global batch (``SpikingModule.synced``): the
  differentiable per-call statistics of BPTT and the online methods (``SyncBatchNormFunction``: the forward
  gathers each rank's count, mean and variance, the backward all-reduces the two per-channel gradient sums), the
  rate-BP spike pass (global statistics, recorded for the rate pass) and its rate pass (``RateBatchNorm`` with
  the rate batch's global mean and gradient sums), OS's renormalization (the same function, its scale and shift
  from the global statistics); OS's threshold stabilizer takes each layer's mean and std over every rank;
- before every ``optimizer.step()`` the gradients are averaged over the ranks (one all-reduce of all of them,
  flattened): with each rank's loss the mean over its share, the average is the gradient of the global
  batch's mean loss. That holds for a step with one backward (BPTT, rate-BP), several (SLTT and OTTT sum T
  backward passes, sltt_k K of them: every rank must pick the same K steps, so every rank seeds its RNG alike),
  an optimizer step per time step (ottt_o: an average per step) and a hand-made gradient (HM2-BP sets ``.grad``
  itself), because it runs where they all end: at the step.

Averaging at the step instead of during the backward (as DDP's buckets do) gives up overlapping the
communication with the backward; it gives every method the same synchronisation, so their step times stay
comparable. A method whose own statistics are per-batch in ways this does not synchronise would say so in
``Method.data_parallel`` (a reason; None when supported).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .layers import SpikingModule, _bn_dims, _bn_shape

__all__ = ["data_parallel", "SyncBatchNormFunction", "global_moments", "average_gradients", "world_size"]


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def global_moments(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel (mean, biased variance, count) of ``x`` over every rank's batch: each rank's count, mean and
    variance gathered (one all-gather of 2C+1 numbers per rank) and combined as Chan et al.'s parallel
    variance, in float64, so no sum of squares loses the variance to cancellation."""
    dims = _bn_dims(x)
    n = x.numel() // x.shape[1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    mine = torch.cat([mean.double(), var.double(), torch.tensor([float(n)], dtype=torch.float64, device=x.device)])
    parts = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(parts, mine, group=group)
    allp = torch.stack(parts)  # [ranks, 2C + 1]
    c = x.shape[1]
    means, vars_, counts = allp[:, :c], allp[:, c:2 * c], allp[:, 2 * c:]
    total = counts.sum()
    g_mean = (means * counts).sum(0) / total
    g_var = ((vars_ + (means - g_mean) ** 2) * counts).sum(0) / total
    return g_mean.to(x.dtype), g_var.to(x.dtype), float(total)


def update_running(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
    """Running statistics as training-mode BN updates them: momentum (or the cumulative average when it is
    None), the unbiased variance."""
    if bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
        bn.running_var.mul_(1 - m).add_(var.detach() * (count / max(count - 1, 1)), alpha=m)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN over the global batch. Forward: global mean and variance (``global_moments``),
    ``y = weight * (x - mean) * invstd + bias``. Backward, with g the output gradient, xhat the normalised input
    and N the global count:

        dx = weight * invstd * (g - sum(g) / N - xhat * sum(g * xhat) / N)

    with both sums all-reduced over the ranks; the weight and bias get this rank's own sums (the gradient
    average at the optimizer step adds them up). Saves xhat and invstd, as BN saves its input."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):  # type: ignore[override]
        shape = _bn_shape(x)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count, ctx.group, ctx.has_bias = count, group, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = _bn_dims(grad), _bn_shape(grad)
        g_bias = grad.sum(dims)
        g_weight = (grad * xhat).sum(dims)
        both = torch.cat([g_bias, g_weight])
        dist.all_reduce(both, group=ctx.group)
        c = grad.shape[1]
        scale = invstd if weight is None else invstd * weight
        g_x = scale.view(shape) * (grad - (both[:c] / ctx.count).view(shape) - xhat * (both[c:] / ctx.count).view(shape))
        return (g_x, None if weight is None else g_weight, g_bias if ctx.has_bias else None, None, None, None, None)


def sync_batchnorm(bn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training-mode forward of ``bn`` (a methods.layers.BatchNorm) with global statistics, its running
    statistics updated: (output, mean, inverse std)."""
    mean, var, count = global_moments(x.detach(), bn.group)
    update_running(bn, mean, var, count)
    invstd = torch.rsqrt(var + bn.eps)
    return SyncBatchNormFunction.apply(x, bn.weight, bn.bias, mean, invstd, count, bn.group), mean, invstd


def average_gradients(params: list[nn.Parameter], group) -> None:
    """Every gradient replaced by its mean over the ranks: one all-reduce of all of them, flattened."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(world_size(group))
    for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(avg)


def data_parallel(model: nn.Module, optimizer: torch.optim.Optimizer, group=None):
    """Make ``model`` and ``optimizer`` one replica of a data-parallel run over ``group`` (module docstring).
    Returns the handle of the gradient average's hook (``.remove()``)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    for m in model.modules():
        if isinstance(m, SpikingModule):  # BN, and neurons whose thresholds take batch statistics (OS)
            m.synced, m.group = True, group
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: average_gradients(params, group))
