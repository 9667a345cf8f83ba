"""Rate-based backpropagation (Yu et al., NeurIPS 2024): ``rate_m`` and ``rate_s``.

An explicit two-phase step, no global grad-mode hooks (Yu et al., NeurIPS 2024):

1. spike pass under ``torch.no_grad()``: the spiking network runs T steps (multi-step for rate_m,
   T single-step calls for rate_s); every LIF records its firing rate r and eligibility e, every BN
   the statistics of its input;
2. one differentiable rate pass on the time-averaged input: a LIF returns r with e as its local
   derivative, BN takes its value from the spike statistics and its gradient from the rate batch;
3. CE on the rate-pass output (= the mean logits), its gradient scaled by 1/T, one backward.

Options
-------
``bn_last_step``       (rate_s) the official code's quirk: the rate pass's BN uses the last step's
                       statistics instead of their average over t.
``last_frame_input``   (rate_s) the official code's quirk for event data: the rate pass sees the last
                       frame instead of the mean frame.
"""

from __future__ import annotations

import torch

from .base import NULL_PROBE, Method, StepOutput
from .layers import configure, reset_state


class RateBase(Method):
    spike_mode = "spike_multi"
    memory_in_T = "flat"  # one rate pass, whatever T

    def spike_pass(self, model, x) -> torch.Tensor:
        raise NotImplementedError

    def rate_input(self, model, x) -> torch.Tensor:
        return x.mean(0) if self.is_sequence(model, x) else x

    def flags(self) -> dict:
        return {}

    def gradient_scale(self) -> float:
        return float(self.T)  # the objective is loss / T (Theorem 1: the rate gradient is BPTT's / T)

    def train_step(self, model, x, y, optimizer, probe=NULL_PROBE) -> StepOutput:
        T = self.T
        with probe.phase("forward"):
            reset_state(model)
            configure(model, self.spike_mode, T, **self.flags())
            with torch.no_grad():
                self.spike_pass(model, x)
            configure(model, "rate", T, **self.flags())
            logits = model(self.rate_input(model, x))
            loss = self.loss_fn(logits, y)
            # L = loss / T in the gradient, the loss value unchanged
            objective = loss / T
        with probe.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
        with probe.phase("optimizer"):
            optimizer.step()
        return StepOutput(loss.detach(), logits.detach())


class RateMulti(RateBase):
    name = "rate_m"
    spike_mode = "spike_multi"
    faster_than = "bptt_m"  # the paper's speed claim

    def spike_pass(self, model, x) -> torch.Tensor:
        return model(self.time_fold(model, x))


class RateSingle(RateBase):
    name = "rate_s"
    spike_mode = "spike_single"
    fidelity_reference = "bptt_s"
    OPTIONS = {"bn_last_step": False, "last_frame_input": False}

    def flags(self) -> dict:
        return {"bn_last_step": self.options["bn_last_step"]}

    def spike_pass(self, model, x) -> torch.Tensor:
        out = None
        for t in range(self.T):
            out = model(self.step_input(model, x, t))
        return out

    def rate_input(self, model, x) -> torch.Tensor:
        if self.options["last_frame_input"] and self.is_sequence(model, x):
            return x[-1]
        return super().rate_input(model, x)
