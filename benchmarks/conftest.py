"""pytest-benchmark options for benchmarks/: ``--bench-device cpu|cuda|cuda:N`` (default cpu)."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cpu", help="device for the step benchmarks (cpu, cuda, cuda:N)")


@pytest.fixture(scope="session")
def bench_device(request):
    import torch

    name = request.config.getoption("--bench-device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"--bench-device {name}: no CUDA device here")
    return torch.device(name)
