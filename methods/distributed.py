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

from .layers import SpikingModule
from .syncbn import SyncBatchNormFunction, global_moments, world_size

__all__ = ["data_parallel", "SyncBatchNormFunction", "global_moments", "average_gradients", "world_size"]


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
