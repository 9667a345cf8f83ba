"""Gradient fidelity: how closely one method's weight gradient follows another's on the same weights and batch.

    grads = method_gradient(method, model, x, y)            # {parameter name: gradient}, weights unchanged
    rows = compare_gradients(grads, reference_grads, scale)  # per weight tensor, and "all" over every one

``method_gradient`` runs the method's own ``train_step`` with a :class:`GradientTap` in place of the optimizer:
``step()`` adds the gradients it sees to a sum and changes no weight, so a method that steps once per batch
(BPTT, rate-BP, SLTT, OTTT_A) gives its one gradient, and one that steps at every time step (OTTT_O) the sum of
its T per-step gradients on the same weights: in both cases what one batch asks the weights to move by, before
the optimizer's own arithmetic. Only the weights of convolutions and linear layers (parameters of two or more
dimensions) are compared: they are the layers of the paper's per-layer figures.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GradientTap:
    """Stands in for the optimizer of ``Method.train_step``: collects the gradients instead of applying them."""

    def __init__(self, model: nn.Module) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_groups = [{"params": [p for _, p in self.named], "lr": 0.0}]
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self.named:
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.steps += 1
        for n, p in self.named:
            if p.grad is not None:
                g = p.grad.detach()
                self.sums[n] = g.clone() if n not in self.sums else self.sums[n] + g


def weight_names(model: nn.Module) -> list[str]:
    """The compared tensors, in the order the model defines them (input to output): conv and linear weights."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]


def method_gradient(method, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient one training step of ``method`` computes on ``(x, y)``, the weights left as they were (the
    BN running statistics a training forward updates are the caller's to restore)."""
    model.train()
    tap = GradientTap(model)
    method.train_step(model, x, y, tap)
    tap.zero_grad()
    if not tap.steps:
        raise RuntimeError(f"{method.name}: its train_step never called optimizer.step()")
    return tap.sums


def compare_gradients(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], names: list[str],
                      scale: float = 1.0) -> list[dict]:
    """Per weight tensor (``layer`` its index in ``names``) and over all of them (``layer`` -1, name "all"): the
    cosine similarity of ``scale * grads`` with ``reference`` and the ratio of their norms. A gradient that is
    zero (or absent: a layer the method leaves untouched) has cosine NaN; its norm ratio is 0."""
    rows, dots, nn_, nr = [], 0.0, 0.0, 0.0
    for i, name in enumerate(names):
        ref = reference.get(name)
        if ref is None:
            raise KeyError(f"the reference gradient has no {name!r}")
        g = grads.get(name)
        g = torch.zeros_like(ref) if g is None else g * scale
        g, ref = g.double().flatten(), ref.double().flatten()
        dot, gg, rr = float(g @ ref), float(g @ g), float(ref @ ref)
        dots, nn_, nr = dots + dot, nn_ + gg, nr + rr
        rows.append(_row(i, name, dot, gg, rr, ref.numel()))
    rows.append(_row(-1, "all", dots, nn_, nr, sum(r["numel"] for r in rows)))
    return rows


def _row(layer: int, name: str, dot: float, gg: float, rr: float, numel: int) -> dict:
    denom = math.sqrt(gg) * math.sqrt(rr)
    return {"layer": layer, "name": name, "numel": numel, "cosine": dot / denom if denom > 0 else math.nan,
            "norm_ratio": math.sqrt(gg) / math.sqrt(rr) if rr > 0 else math.nan}
