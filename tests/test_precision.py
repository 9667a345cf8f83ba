"""precision = "bf16": convs and linears compute in bfloat16 under autocast, everything after them (batch norm, the
membrane, the loss) stays float32; every method but HM2-BP trains with it; what the cell refuses, it refuses with
one message and exit 2."""

import copy

import pytest
import torch
import torch.nn as nn

from bench.grid import Cell
from bench.profile import SavedTensorsMeter
from methods import METHODS
from methods.base import MethodConfig
from methods.layers import LIF, set_precision

from .helpers import cli

BF16_EPS = 2.0 ** -8  # bfloat16 keeps 8 significant bits: a rounding moves a value by at most this, relative


class Tap:
    """An optimizer stand-in that sums the gradients of every step (OTTT_O steps T times) and changes nothing."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def zero_grad(self, set_to_none=True):
        for p in self.model.parameters():
            p.grad = None

    def step(self):
        g = torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None])
        self.grads = g if self.grads is None else self.grads + g


def digits_model(method, T=4, seed=1):
    m = METHODS[method](MethodConfig(T=T))
    torch.manual_seed(seed)
    return m, m.build("cnn_digits", num_classes=10, in_channels=1, input_shape=(1, 8, 8))


def test_a_linear_layer_computes_in_bf16_and_returns_float32():
    """The layer's output is the float64 product of the bfloat16-rounded input and weight, to bfloat16's rounding
    of the result; float32 inputs that bfloat16 cannot hold make it differ from the float32 layer's."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    x = torch.randn(32, 64)
    fp32 = layer(x)
    set_precision(layer, "bf16", "cpu")
    out = layer(x)
    ref = x.bfloat16().double() @ layer.weight.bfloat16().double().T + layer.bias.bfloat16().double()
    assert out.dtype == torch.float32 and layer.weight.dtype == torch.float32
    err = (out.double() - ref).abs()
    assert (err <= 2 * BF16_EPS * ref.abs() + 1e-6).all()  # the product's rounding, plus the sum's in bfloat16
    assert (out - fp32).abs().max() > 1e-3  # bfloat16 did happen


def test_a_deep_copy_of_a_bf16_model_runs_its_own_weights():
    """The wrapped forwards are bound methods: a copy computes with the copy's weights, not the original's."""
    layer = nn.Linear(8, 4)
    set_precision(layer, "bf16", "cpu")
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    x = torch.randn(3, 8)
    assert torch.equal(twin(x), torch.zeros(3, 4)) and layer(x).abs().sum() > 0


def test_batch_norm_and_the_membrane_see_float32():
    """Every LIF and batch-norm layer's input is float32 in a bf16 model, and the spikes a LIF layer emits (0 or 1)
    are exact in bfloat16."""
    method, model = digits_model("bptt_m")
    set_precision(model, "bf16", "cpu")
    seen = []
    for mod in model.modules():
        if isinstance(mod, (LIF, nn.BatchNorm2d, nn.BatchNorm1d)) or type(mod).__name__.endswith("BatchNorm"):
            mod.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, i[0].dtype, o)))
    torch.manual_seed(0)
    method.train_step(model, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), Tap(model))
    assert seen and all(dt == torch.float32 for _, dt, _ in seen), {(n, dt) for n, dt, _ in seen}
    spikes = [o for n, _, o in seen if n == "LIF"]
    assert spikes and all(torch.equal(s.bfloat16().float(), s) for s in spikes)


@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].bf16 is None))
def test_every_method_trains_in_bf16_close_to_its_fp32_gradient(name):
    """The same weights and batch: the bf16 gradient is not the float32 one (bf16 happened) but points the same
    way (cosine > 0.9 over all weights, T=4: spikes near the threshold may flip), and stays float32."""
    method, model = digits_model(name)
    if not method.supports("cnn_digits"):
        pytest.skip(f"{name} does not run cnn_digits")
    half = copy.deepcopy(model)
    set_precision(half, "bf16", "cpu")
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    grads = []
    for m in (model, half):
        tap = Tap(m)
        torch.manual_seed(2)  # sltt_k draws its steps
        method.train_step(m, x, y, tap)
        grads.append(tap.grads)
    a, b = grads
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


def test_bf16_halves_what_the_convs_save():
    """BPTT on the digits CNN at T=8: what the conv and linear layers save for backward (their input and weight,
    attributed by SavedTensorsMeter) is bfloat16, about half the float32 bytes (the bfloat16 copies of the weights
    count there too); the BN inputs and membranes after them stay float32, so the step saves less in all."""
    saved = {}
    for precision in ("fp32", "bf16"):
        method, model = digits_model("bptt_m", T=8)
        set_precision(model, precision, "cpu")
        meter = SavedTensorsMeter(exclude=list(model.parameters()), model=model)
        torch.manual_seed(0)
        x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
        with meter:
            method.train_step(model, x, y, Tap(model))
        layers = sum(b for (module, _), b in meter.peak_parts.items() if module in ("conv", "linear"))
        others = {k: b for k, b in meter.peak_parts.items() if k[0] not in ("conv", "linear")}
        saved[precision] = (meter.peak_bytes, layers, others)
    (total32, layers32, others32), (total16, layers16, others16) = saved["fp32"], saved["bf16"]
    assert 0.45 * layers32 <= layers16 <= 0.55 * layers32, saved
    assert others16 == others32 and total16 < total32


def test_a_bf16_cell_stores_its_precision_and_refusals_are_exit_2(tmp_path):
    r = cli("run", "default", "--filter", "method=rate_m", "--filter", "T=2", "--filter", "kind=train",
            "--set", "precision=bf16", "--set", "epochs=1", "--set", "train_subset=256", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    from reports.results import load_results

    row = load_results(tmp_path / "o").iloc[0]
    assert row["status"] == "ok" and row["precision"] == "bf16" and row["acc_top1"] > 0
    assert Cell(method="rate_m", arch="cnn_digits", dataset="digits", T=2, precision="bf16").key != \
        Cell(method="rate_m", arch="cnn_digits", dataset="digits", T=2).key
    for args, msg in ((("--filter", "method=hm2bp", "--set", "precision=bf16"), "cannot run in bf16"),
                      (("--filter", "kind=fidelity", "--set", "precision=bf16"), "compares gradients in fp32"),
                      (("--set", "precision=fp16"), "precision must be one of fp32, bf16")):
        r = cli("run", "default", *args, "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
