import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton's kernels run on CPU tensors only through its interpreter, and Triton decides that when it is first
    # imported (its own language functions included): before any test imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: without one they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marker gpu: needs a CUDA device, and there is none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def digits_batch():
    """A real batch of the scikit-learn digits set, [B, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:64] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target[:64], dtype=torch.long)
    return x, y


@pytest.fixture(autouse=True, scope="session")
def _frame_cache(tmp_path_factory):
    """Event frames are cached under a folder of this test session, never the user's ~/.cache (the CLI's
    subprocesses inherit it)."""
    import os

    old = os.environ.get("SNNBENCH_CACHE")
    os.environ["SNNBENCH_CACHE"] = str(tmp_path_factory.mktemp("snnbench-cache"))
    yield
    if old is None:
        os.environ.pop("SNNBENCH_CACHE", None)
    else:
        os.environ["SNNBENCH_CACHE"] = old
