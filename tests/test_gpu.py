"""Cells on a CUDA device (marker gpu: skipped without one; `pytest -m gpu` runs them, as scripts/gpu-check.sh and
the GPU workflow do first): what only a GPU measures is measured, and a bf16 and a triton cell run compiled."""

import pytest
import torch

from bench.cell import Cell
from bench.runner import run_cell

pytestmark = pytest.mark.gpu

TINY = dict(method="bptt_m", arch="cnn_digits", dataset="digits", T=2, device="cuda", batch_size=32, train_subset=128,
            warmup_steps=1)


def test_a_train_cell_on_the_gpu_measures_its_memory_and_stores_its_checkpoint(tmp_path):
    res = run_cell(Cell(**TINY, kind="train", epochs=2), out=tmp_path)
    row = res.row
    assert res.status == "ok", row.get("error")
    assert row["peak_alloc_mib"] > 0 and row["peak_reserved_mib"] >= row["peak_alloc_mib"]
    assert row["saved_for_backward_mib"] > 0 and row["acc_top1"] is not None and len(res.epochs) == 2
    assert row.get("peak_nvml_mib") is not None or row.get("gpu_null_reason"), row.get("gpu_null_reason")
    assert row["gpu_name"] == torch.cuda.get_device_name(0)


@pytest.mark.parametrize("sets", [dict(precision="bf16"), dict(backend="triton"), dict(backend="compile")])
def test_a_profile_cell_on_the_gpu_in_bf16_or_a_fused_backend(sets):
    res = run_cell(Cell(**TINY, kind="profile", steps=4, **sets))
    assert res.status == "ok", res.row.get("error")
    assert res.row["step_time_ms_median"] > 0 and res.row["measured_steps"] == 4


def test_triton_runs_compiled_here():
    """On a CUDA machine the interpreter is off (tests/conftest.py sets it only without CUDA): the backend tests'
    cuda cases check the compiled kernels."""
    import os

    assert os.environ.get("TRITON_INTERPRET", "") in ("", "0")
