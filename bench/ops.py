"""Operation counts of a network at inference: what the trained network costs per sample, as the field counts it
(NeuroBench's synaptic operations: dense MACs, effective MACs and ACs; activation sparsity).

Forward hooks on every convolution and linear layer see each call's input ``x`` and count, over the evaluation:

- ``dense_macs``: the multiply-accumulates the layer would do on a dense input: output elements x the fan-in of
  one output (in channels / groups x kernel size; in features for a linear layer);
- ``effective``: the operations driven by the non-zero inputs: the same layer applied to the indicator of
  ``x != 0`` with every weight 1, summed (so padding and borders are counted exactly); an input that is all 0 and
  1 (spikes) makes them accumulates (``effective_acs``), any other (the first layer's real-valued image, an
  average pool of spikes) multiply-accumulates (``effective_macs``);
- ``input_sparsity``: the share of zero inputs.

Counts are per sample of the evaluation set over all T steps (the multi-step forward folds T into the batch:
the totals are divided by the number of samples, not of rows). The synaptic weights are not counted as zero
where they are zero (no weight sparsity), and BN, pooling and the neurons' own updates are not operations here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OpCounter:
    def __init__(self, model: nn.Module) -> None:
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.dense = [0.0] * len(self.layers)
        self.effective = [0.0] * len(self.layers)
        self.zeros = [0.0] * len(self.layers)
        self.inputs = [0.0] * len(self.layers)
        self.binary = [True] * len(self.layers)
        self.counting = True
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args, output) -> None:
            if not self.counting:
                return
            x = args[0].detach()
            nz = (x != 0).to(x.dtype)
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                dense = output.numel() * fan_in
                ones = torch.ones_like(module.weight)
                eff = F.conv2d(nz, ones, None, module.stride, module.padding, module.dilation, module.groups).sum()
            else:
                dense = output.numel() * module.in_features
                eff = nz.sum() * module.out_features
            self.dense[i] += float(dense)
            self.effective[i] += float(eff)
            self.inputs[i] += float(x.numel())
            self.zeros[i] += float(x.numel() - nz.sum())
            if self.binary[i] and not bool(((x == 0) | (x == 1)).all()):
                self.binary[i] = False
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def counts(self) -> list[float]:
        """Every count, flat (for an all-reduce over the ranks of a multi-device cell)."""
        return self.dense + self.effective + self.zeros + self.inputs + [float(not b) for b in self.binary]

    def rows(self, counts: list[float], samples: int) -> list[dict]:
        """One row per layer (in the model's order), per sample, from ``counts()`` (summed over ranks)."""
        n = len(self.layers)
        dense, eff, zeros, inputs, nonbinary = (counts[k * n:(k + 1) * n] for k in range(5))
        out = []
        for i, (name, m) in enumerate(self.layers):
            if not inputs[i]:
                continue
            acs = not nonbinary[i]
            out.append({"layer": i, "name": name, "op": "conv" if isinstance(m, nn.Conv2d) else "linear",
                        "dense_macs": dense[i] / samples, "effective_macs": 0.0 if acs else eff[i] / samples,
                        "effective_acs": eff[i] / samples if acs else 0.0, "input_sparsity": zeros[i] / inputs[i]})
        return out


def totals(rows: list[dict]) -> dict:
    """The row's columns: operations per sample over all layers."""
    if not rows:
        return {}
    return {"ops_dense_macs": sum(r["dense_macs"] for r in rows),
            "ops_effective_macs": sum(r["effective_macs"] for r in rows),
            "ops_effective_acs": sum(r["effective_acs"] for r in rows)}
