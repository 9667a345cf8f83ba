"""Batch norm over every rank's batch: the global moments, the differentiable synchronised BN, and the shapes a
per-channel statistic takes. Used by the BN modes of methods/layers.py (``sync_batchnorm``), by OS's
renormalisation (methods/online.py) and by the data-parallel wrapper (methods/distributed.py, which explains the
scheme). Imports torch only, so the layers and the wrapper both import it and neither the other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def bn_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions a per-channel statistic reduces: all but the channels (dim 1)."""
    return (0,) + tuple(range(2, x.dim()))


def bn_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector against ``x``."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def global_moments(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel (mean, biased variance, count) of ``x`` over every rank's batch: each rank's count, mean and
    variance gathered (one all-gather of 2C+1 numbers per rank) and combined as Chan et al.'s parallel
    variance, in float64, so no sum of squares loses the variance to cancellation."""
    dims = bn_dims(x)
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
        shape = bn_shape(x)
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
        dims, shape = bn_dims(grad), bn_shape(grad)
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
