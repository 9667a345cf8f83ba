"""bptt_m and bptt_s weight gradients against a plain unrolled float64 reference network."""

import pytest
import torch
import torch.nn.functional as F

from methods import METHODS, MethodConfig

from .helpers import NoOpOptimizer, grads, zero_grads
from .reference import CNNRef


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name,ref_mode", [("bptt_m", "multi"), ("bptt_s", "single")])
@pytest.mark.parametrize("T", [1, 4])
def test_bptt_gradients_match_unrolled_reference(name, ref_mode, T, digits_batch):
    x, y = digits_batch
    x, y = x[:24].double(), y[:24]
    method = METHODS[name](MethodConfig(T=T))
    model = method.build("cnn_digits", 10, 1, widths=(8, 12, 16)).double()
    for p in model.parameters():  # make BN affine parameters non-trivial
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    out = method.train_step(model, x, y, NoOpOptimizer())
    got = grads(model)
    zero_grads(model)
    ref = CNNRef(model)
    logits = getattr(ref, ref_mode)(x, T)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    want = grads(model)
    assert torch.allclose(out.logits, logits.detach(), rtol=1e-10, atol=1e-12)
    assert set(got) == set(want) and len(got) == 11
    for n in want:
        assert rel_err(got[n], want[n]) < 1e-6, n
