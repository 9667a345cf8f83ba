"""Backpropagation through time: multi-step (``bptt_m``) and single-step (``bptt_s``).

bptt_m: time folded into the batch ([T*B, ...]); convs run once, each LIF loops over T; BN statistics
pooled over T*B. bptt_s: the model called T times with one step each, neurons keep V between calls,
per-step BN statistics. Both: CE on the time-averaged output, one backward, one optimizer step.
"""

from __future__ import annotations

import torch

from .base import NULL_PROBE, Method, StepOutput
from .layers import configure, reset_state


class BPTTMulti(Method):
    name = "bptt_m"
    memory_in_T = "linear"  # the whole graph over T
    def train_step(self, model, x, y, optimizer, probe=NULL_PROBE) -> StepOutput:
        with probe.phase("forward"):
            configure(model, "multi", self.T)
            xs = self.time_fold(model, x)
            logits = self.mean_over_time(model(xs))
            loss = self.loss_fn(logits, y)
        with probe.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with probe.phase("optimizer"):
            optimizer.step()
        return StepOutput(loss.detach(), logits.detach())


class BPTTSingle(Method):
    name = "bptt_s"
    memory_in_T = "linear"
    fidelity_reference = "bptt_s"

    def train_step(self, model, x, y, optimizer, probe=NULL_PROBE) -> StepOutput:
        with probe.phase("forward"):
            configure(model, "single", self.T)
            reset_state(model)
            outs = [model(self.step_input(model, x, t)) for t in range(self.T)]
            logits = torch.stack(outs).mean(0)
            loss = self.loss_fn(logits, y)
        with probe.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with probe.phase("optimizer"):
            optimizer.step()
        reset_state(model)
        return StepOutput(loss.detach(), logits.detach())
