"""Fused LIF backends equal the torch loop before their timings mean anything: Triton's kernels through its CPU
interpreter where there is no GPU and compiled on a CUDA device where there is one (``TRITON_DEVICES``: the
``cuda`` cases carry the marker gpu), torch.compile on the CPU."""

import itertools

import pytest
import torch

# without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 before anything imported Triton

from methods import METHODS, MethodConfig
from methods.layers import LIF, set_backend
from methods.neuron import get_preset

from .helpers import TRITON_DEVICES, NoOpOptimizer, cli, grads, tiny_grid

pytest.importorskip("triton")

CONFIGS = [dict(reset=r, detach_reset=d, surrogate=s, v_reset=v, alpha=2.0 if s == "rectangle" else 4.0)
           for r, d, s, v in itertools.product(("soft", "hard"), (True, False), ("sigmoid", "triangle", "rectangle"),
                                               (0.0, 0.3)) if not (r == "soft" and v)]


def _run(cfg, backend, mode, x, T, g):
    lif = LIF(cfg)
    lif.backend, lif.mode, lif.T = backend, mode, T
    if mode == "spike_multi":
        with torch.no_grad():
            s = lif(x)
        return s, lif.rate, lif.elig
    xx = x.detach().clone().requires_grad_()
    s = lif(xx)
    (s * g).sum().backward()
    return s.detach(), xx.grad


def _run_steps(cfg, backend, mode, x, T, g):
    """The single-step modes, one call per step: "single" (BPTT through the membrane), "online" (the membrane
    detached before each step), "spike_single" (rate-BP's spike pass, no autograd)."""
    lif = LIF(cfg)
    lif.backend, lif.mode, lif.T = backend, mode, T
    xs = x.detach().clone().view(T, -1, *x.shape[1:]).requires_grad_(mode != "spike_single")
    with torch.set_grad_enabled(mode != "spike_single"):
        s = torch.stack([lif(xs[t]) for t in range(T)])
    if mode == "spike_single":
        return s, lif.rate, lif.elig
    (s * g.view_as(s)).sum().backward()
    return s.detach(), xs.grad


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_triton_lif_equals_torch_for_every_neuron(kw, device):
    """BPTT's fused forward and backward, and rate-BP's fused spike pass, against the torch loop: the same spikes
    (and spike counts) bit for bit, gradients and eligibilities to 1e-6 relative, for soft and hard reset (with
    V_reset 0 and 0.3), reset detached or not, each surrogate. Inputs ~N(0, 1.5) so that every path fires."""
    cfg = get_preset("rbp", **kw)
    T, B = 6, 4
    x = torch.randn(T * B, 3, 5, 5, device=device) * 1.5
    g = torch.randn_like(x)
    s0, gx0 = _run(cfg, "torch", "multi", x, T, g)
    s1, gx1 = _run(cfg, "triton", "multi", x, T, g)
    assert torch.equal(s0, s1) and 0 < float(s0.mean()) < 1
    assert _rel(gx1, gx0) <= 1e-6
    p0, p1 = _run(cfg, "torch", "spike_multi", x, T, g), _run(cfg, "triton", "spike_multi", x, T, g)
    assert torch.equal(p0[0], p1[0]) and torch.equal(p0[1], p1[1])
    assert _rel(p1[2], p0[2]) <= 1e-6


def test_triton_lif_refuses_what_its_32_bit_offsets_cannot_reach():
    """The kernels index with 32-bit offsets (t * N + offs): a launch over more than 2^31 elements would wrap around
    into other memory. Every entry point refuses it before launching (meta tensors: nothing is allocated)."""
    import methods.triton_lif as tl

    cfg = get_preset("rbp")
    last = 2**31 - 1 - tl.BLOCK  # the largest launch whose masked lanes past the end still fit in 32 bits
    assert tl._blocks(1000, last) == (1,) and tl._blocks(last) == (-(-last // tl.BLOCK),)
    with pytest.raises(ValueError, match="32-bit offsets"):
        tl._blocks(1000, last + 1)
    big = torch.empty(4, 2**29 + 1, device="meta")  # T = 4 steps of 2^29 + 1 neurons: 2^31 + 4 elements
    for call in (lambda: tl.lif_forward(big, cfg), lambda: tl.rate_spike_pass(big, cfg),
                 lambda: tl.lif_backward(big, big, cfg, big.dtype)):
        with pytest.raises(ValueError, match="32-bit offsets"):
            call()
    step = torch.empty(2**31, device="meta")  # one step of 2^31 neurons
    for call in (lambda: tl.TritonLIFStep.apply(step, None, cfg), lambda: tl.rate_spike_step(step, None, None, None,
                                                                                              None, cfg)):
        with pytest.raises(ValueError, match="32-bit offsets"):
            call()


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_triton_lif_step_equals_torch_for_every_neuron(kw, device):
    """The single-step modes' fused step (forward and backward one kernel each) against the torch step: the same
    spikes bit for bit and input gradients to 1e-6 relative, through time (bptt_s) and with the membrane detached
    (the online methods); rate_s's fused spike-pass step: the same spikes and counts, eligibilities to 1e-6."""
    cfg = get_preset("rbp", **kw)
    T, B = 6, 4
    x = torch.randn(T * B, 3, 5, 5, device=device) * 1.5
    g = torch.randn_like(x)
    for mode in ("single", "online"):
        s0, gx0 = _run_steps(cfg, "torch", mode, x, T, g)
        s1, gx1 = _run_steps(cfg, "triton", mode, x, T, g)
        assert torch.equal(s0, s1) and 0 < float(s0.mean()) < 1, mode
        assert _rel(gx1, gx0) <= 1e-6, mode
    p0, p1 = _run_steps(cfg, "torch", "spike_single", x, T, g), _run_steps(cfg, "triton", "spike_single", x, T, g)
    assert torch.equal(p0[0], p1[0]) and torch.equal(p0[1], p1[1])
    assert _rel(p1[2], p0[2]) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["rbp", "sltt"])
def test_compiled_lif_equals_torch(preset):
    """torch.compile of the same loops: the same spikes, gradients and eligibilities to 1e-6 relative."""
    cfg = get_preset(preset)
    T, B = 4, 4
    x = torch.randn(T * B, 3, 5, 5) * 1.5
    g = torch.randn_like(x)
    s0, gx0 = _run(cfg, "torch", "multi", x, T, g)
    s1, gx1 = _run(cfg, "compile", "multi", x, T, g)
    assert torch.equal(s0, s1) and _rel(gx1, gx0) <= 1e-6
    p0, p1 = _run(cfg, "torch", "spike_multi", x, T, g), _run(cfg, "compile", "spike_multi", x, T, g)
    assert torch.equal(p0[0], p1[0]) and torch.equal(p0[1], p1[1]) and _rel(p1[2], p0[2]) <= 1e-6
    for mode in ("single", "online"):
        s0, gx0 = _run_steps(cfg, "torch", mode, x, T, g)
        s1, gx1 = _run_steps(cfg, "compile", mode, x, T, g)
        assert torch.equal(s0, s1) and _rel(gx1, gx0) <= 1e-6, mode
    p0, p1 = _run_steps(cfg, "torch", "spike_single", x, T, g), _run_steps(cfg, "compile", "spike_single", x, T, g)
    assert torch.equal(p0[0], p1[0]) and torch.equal(p0[1], p1[1]) and _rel(p1[2], p0[2]) <= 1e-6


# How far a whole step's gradients may be from the torch backend's. On a CPU the kernels run through Triton's
# interpreter (numpy, every operation rounded as eager torch rounds it) and torch.compile's C++ as eager: 1e-6.
# On a GPU the kernels are compiled without contracting multiply-adds (methods/triton_lif.py, EAGER_ROUNDING;
# torch.compile with emulate_precision_casts), but the sigmoid surrogate still runs on the hardware's approximate
# exp and division, a few units in the last place (~1e-7 relative) off torch's at every LIF step, and a whole
# network adds those up through its layers. The size of that, measured on a CPU (benchmarks/rounding.py): a
# membrane one unit in the last place off (a fused multiply-add in the charge) moves cnn_digits' whole-step
# gradients (batch 64, T=4) by up to 6.2e-7 relative and ResNet-18's (batch 16) by up to 2.7e-6, with no spike
# fired differently in 0.9 and 35.7 million neuron-steps. 1e-5 holds those with room; a spike that fires
# differently would move a gradient by far more (1e-2 and up) and still fail.
GRAD_RTOL = {"cpu": 1e-6, "cuda": 1e-5}


@pytest.mark.slow
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].torch_only is None))
def test_method_gradient_is_the_same_on_every_backend(digits_batch, name, device, monkeypatch):
    """A whole training step of cnn_digits (T=4) of every method that runs on the fused backends: every
    parameter's gradient with the triton and the compile backend equals the torch backend's (to ``GRAD_RTOL``),
    the loss is the same number to the same tolerance, and every LIF layer fires the same spikes."""
    x, y = (t.to(device) for t in digits_batch)
    if device == "cuda":  # the same convolution algorithms on every run: only the backends differ
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    out = {}
    for backend in ("torch", "triton", "compile"):
        m = METHODS[name](MethodConfig(T=4))
        torch.manual_seed(0)
        model = m.build("cnn_digits", 10, 1).to(device)
        set_backend(model, backend)
        spikes = []
        for lif in (mod for mod in model.modules() if isinstance(mod, LIF)):
            lif.register_forward_hook(lambda mod, args, s: spikes.append(s.detach()))
        torch.manual_seed(1)  # sltt_k draws its backward steps
        loss = m.train_step(model, x, y, NoOpOptimizer()).loss
        out[backend] = (float(loss), grads(model), spikes)
    tol = GRAD_RTOL[device]
    for backend in ("triton", "compile"):
        differ = sum(int((a != b).sum()) for a, b in zip(out["torch"][2], out[backend][2]))
        assert differ == 0, f"{backend}: {differ} spikes fired differently"
        assert out[backend][0] == pytest.approx(out["torch"][0], rel=tol)
        for k, g in out["torch"][1].items():
            assert _rel(out[backend][1][k], g) <= tol, (backend, k, _rel(out[backend][1][k], g))


def test_backend_is_refused_where_it_cannot_run(tmp_path):
    """Triton on a CPU device outside its interpreter, a backend a method cannot use, an unknown backend: one
    message, exit 2, on any machine (the cells ask for the CPU, so a GPU here changes nothing)."""
    g = tmp_path / "g.toml"
    g.write_text(tiny_grid(methods=("bptt_m", "os")))
    env = {"TRITON_INTERPRET": ""}
    for sets, msg in ((["backend=triton", "method=bptt_m"], "runs on a CUDA device"),
                      (["backend=compile", "method=os"], 'runs on backend "torch" only'),
                      (["backend=cuda_graphs"], "backend must be one of torch, triton, compile")):
        args = [a for s in sets for a in ("--set", s)]
        r = cli("run", str(g), "--out", str(tmp_path / "o"), "--device", "cpu", *args, env=env)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_compile_trains_to_the_same_accuracy_as_torch(tmp_path):
    """A short default-grid cell (bptt_m, T=2, one epoch on 256 digits) trained with backend compile ends with
    the torch backend's accuracy and losses; the row records the backend."""
    from reports.results import load_results

    out = tmp_path / "res"
    common = ["--filter", "method=bptt_m", "--filter", "T=2", "--filter", "kind=train", "--set", "epochs=1",
              "--set", "train_subset=256", "--out", str(out)]
    for backend in ("torch", "compile"):
        r = cli("run", "default", *common, "--set", f"backend={backend}", timeout=600)
        assert r.returncode == 0, r.stderr
    rows = load_results(out).set_index("backend")
    epochs = load_results(out, "epochs").merge(load_results(out)[["key", "backend"]], on="key").set_index("backend")
    assert rows.loc["compile", "acc_top1"] == rows.loc["torch", "acc_top1"]
    assert epochs.loc["compile", "train_loss"] == pytest.approx(epochs.loc["torch", "train_loss"], rel=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["ottt_a", "ottt_o"])
def test_ottt_trace_is_fused_into_the_neuron_that_feeds_its_layer(digits_batch, name, device, monkeypatch):
    """cnn_digits has one LIF whose spikes go straight into a traced conv (the others pass through pooling): on
    the triton backend that LIF's step kernel updates the conv's trace at every step after the first (T - 1 of
    its T steps), the conv does not update it again, and the whole step's gradients are the torch backend's
    (test_method_gradient_is_the_same_on_every_backend); where pooling sits between, the conv keeps its update."""
    import methods.triton_lif as tl

    fused = []
    apply = tl.TritonLIFStep.apply
    monkeypatch.setattr(tl.TritonLIFStep, "apply", lambda *a: (fused.append(len(a) > 3 and a[3] is not None),
                                                               apply(*a))[1])
    x, y = (t.to(device) for t in digits_batch)
    T = 4
    m = METHODS[name](MethodConfig(T=T))
    model = m.build("cnn_digits", 10, 1).to(device)
    set_backend(model, "triton")
    m.train_step(model, x[:8], y[:8], NoOpOptimizer())
    lifs = [l for l in model.modules() if isinstance(l, LIF)]
    readers = [l.__dict__.get("_ottt_reader") for l in lifs]
    assert readers[0] is model.features[3] and readers[1:] == [None, None]
    assert len(fused) == len(lifs) * T and sum(fused) == T - 1
