"""One training step of each method at a small size, timed by pytest-benchmark.

    pytest benchmarks/ --benchmark-autosave                                   # save a run (.benchmarks/)
    pytest benchmarks/ --benchmark-compare --benchmark-compare-fail=median:15%  # fail on a 15% slower median
    pytest benchmarks/ --bench-device cuda                                    # on a GPU (synchronised)

Size: cnn_digits (16/32/32 channels) on 8x8 digits-shaped input, batch 32, T=4, SGD; hm2bp, which trains only
its own networks, the default grid's 64-200-10 hm2_mlp at T=100 (its window there). On a GPU each timed call
ends with ``torch.cuda.synchronize`` so the time is the step's, not its launch's.
"""

import pytest
import torch

from methods import METHODS, MethodConfig

T, BATCH = 4, 32


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_step(benchmark, method_name, bench_device):
    torch.manual_seed(0)
    hm2 = not METHODS[method_name](MethodConfig(T=T)).supports("cnn_digits")
    method = METHODS[method_name](MethodConfig(T=100 if hm2 else T))
    arch, kw = ("hm2_mlp", {"widths": [200], "thresholds": [5.0, 5.0]}) if hm2 else ("cnn_digits", {})
    model = method.build(arch, num_classes=10, in_channels=1, input_shape=(1, 8, 8), **kw).to(bench_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(BATCH, 1, 8, 8, device=bench_device)
    y = torch.randint(0, 10, (BATCH,), device=bench_device)
    cuda = bench_device.type == "cuda"

    def step():
        out = method.train_step(model, x, y, opt)
        if cuda:
            torch.cuda.synchronize(bench_device)
        return out

    for _ in range(2):  # warm-up outside the timing (allocator, autograd caches)
        step()
    out = benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out.loss) and out.logits.shape == (BATCH, 10)
