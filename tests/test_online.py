"""Online methods (OTTT, SLTT) against float64 references and brute-force loops."""

import pytest
import torch
import torch.nn.functional as F

from bench.profile import SavedTensorsMeter
from methods import METHODS, MethodConfig

from .helpers import NoOpOptimizer, grads, zero_grads
from .reference import CNNRef, cnn_online, online_loss, spike

ONLINE = ["ottt_a", "ottt_o", "sltt", "sltt_k", "os"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("T", [1, 3])
def test_sltt_gradients_equal_detached_reference(T, digits_batch):
    x, y = digits_batch
    x, y = x[:24].double(), y[:24]
    method = METHODS["sltt"](MethodConfig(T=T))
    model = method.build("cnn_digits", 10, 1, widths=(8, 12, 16)).double()
    for p in model.parameters():
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    method.train_step(model, x, y, NoOpOptimizer())
    got = grads(model)
    zero_grads(model)
    cnn_online(CNNRef(model), x, y, T).backward()
    want = grads(model)
    assert set(got) == set(want) and len(want) == 11
    for n in want:
        assert rel_err(got[n], want[n]) < 1e-6, n


def _mlp_reference(model, x, y, T, lam):
    """Brute-force OTTT_A on the 2-hidden-layer MLP without BN: per step, the errors delta_t of each
    linear layer by autograd of l_t, the presynaptic traces by the recursion, grad W = sum_t delta_t^T a_t."""
    W1, b1 = model.features[1].weight, model.features[1].bias
    W2, b2 = model.features[3].weight, model.features[3].bias
    W3, b3 = model.classifier.weight, model.classifier.bias
    xin = x.flatten(1)
    v1 = v2 = None
    a2 = a3 = None
    out = {k: torch.zeros_like(p) for k, p in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2), ("W3", W3), ("b3", b3))}
    sltt_W2 = torch.zeros_like(W2)
    for _ in range(T):
        z1 = F.linear(xin, W1.detach(), b1.detach()).requires_grad_(True)
        h1 = z1 if v1 is None else lam * v1 + z1
        s1 = spike(h1 - 1.0)
        v1 = (h1 - s1.detach()).detach()
        z2 = F.linear(s1, W2.detach(), b2.detach())
        z2.retain_grad()
        h2 = z2 if v2 is None else lam * v2 + z2
        s2 = spike(h2 - 1.0)
        v2 = (h2 - s2.detach()).detach()
        z3 = F.linear(s2, W3.detach(), b3.detach())
        z3.retain_grad()
        online_loss(z3, y, T, target="onehot").backward()
        a2 = s1.detach().clone() if a2 is None else lam * a2 + s1.detach()
        a3 = s2.detach().clone() if a3 is None else lam * a3 + s2.detach()
        out["W1"] += z1.grad.T @ xin
        out["b1"] += z1.grad.sum(0)
        out["W2"] += z2.grad.T @ a2
        out["b2"] += z2.grad.sum(0)
        out["W3"] += z3.grad.T @ a3
        out["b3"] += z3.grad.sum(0)
        sltt_W2 += z2.grad.T @ s1.detach()
    return out, sltt_W2


@pytest.mark.parametrize("T", [2, 5])
def test_ottt_a_gradients_equal_trace_outer_products(T, digits_batch):
    x, y = digits_batch
    x = x.double()
    method = METHODS["ottt_a"](MethodConfig(T=T))
    model = method.build("mlp", 10, 1, widths=(40, 24), bn=False).double()
    for m in (model.features[1], model.features[3], model.classifier):
        torch.nn.init.normal_(m.weight, 0, 0.5)
    method.train_step(model, x, y, NoOpOptimizer())
    got = grads(model)
    want, sltt_W2 = _mlp_reference(model, x, y, T, method.neuron.decay)
    names = {"W1": "features.1.weight", "b1": "features.1.bias", "W2": "features.3.weight", "b2": "features.3.bias",
             "W3": "classifier.weight", "b3": "classifier.bias"}
    for k, n in names.items():
        assert torch.allclose(got[n], want[k], rtol=1e-9, atol=1e-12), n
    # the trace makes a difference the test can see (it is not SLTT's instantaneous gradient)
    assert rel_err(sltt_W2, want["W2"]) > 1e-3


class CountingSGD(torch.optim.SGD):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


@pytest.mark.parametrize("name,expected", [("ottt_o", lambda T: T), ("ottt_a", lambda T: 1), ("sltt", lambda T: 1)])
def test_optimizer_steps_per_batch(name, expected, digits_batch):
    x, y = digits_batch
    T = 5
    method = METHODS[name](MethodConfig(T=T))
    model = method.build("cnn_digits", 10, 1)
    opt = CountingSGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    method.train_step(model, x, y, opt)
    assert opt.steps == expected(T)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("T,k", [(6, 2), (4, 1), (3, 5)])
def test_sltt_k_runs_k_backward_passes(T, k, digits_batch, monkeypatch):
    calls = []
    real = torch.autograd.backward

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch.autograd, "backward", counting)
    x, y = digits_batch
    method = METHODS["sltt_k"](MethodConfig(T=T, options={"k": k}))
    model = method.build("cnn_digits", 10, 1)
    method.train_step(model, x, y, NoOpOptimizer())
    assert len(calls) == min(k, T)


def test_sltt_k_with_k_equal_T_is_sltt(digits_batch):
    x, y = digits_batch
    out = {}
    for name, opts in (("sltt", {}), ("sltt_k", {"k": 4})):
        torch.manual_seed(1)
        method = METHODS[name](MethodConfig(T=4, options=opts))
        model = method.build("cnn_digits", 10, 1)
        method.train_step(model, x, y, NoOpOptimizer())
        out[name] = grads(model)
    for n in out["sltt"]:
        assert torch.allclose(out["sltt"][n], out["sltt_k"][n], atol=1e-7), n


@pytest.mark.parametrize("name", ONLINE)
def test_saved_bytes_flat_in_T(name, digits_batch):
    x, y = digits_batch
    x, y = x[:16].clone(), y[:16].clone()
    seen = {}
    for T in (1, 8):
        torch.manual_seed(0)
        method = METHODS[name](MethodConfig(T=T))
        model = method.build("cnn_digits", 10, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        method.train_step(model, x, y, opt)
        with SavedTensorsMeter(exclude=model.parameters()) as meter:
            method.train_step(model, x, y, opt)
        assert meter.current_bytes == 0
        seen[T] = meter.peak_bytes
    assert seen[1] > 0
    assert abs(seen[8] - seen[1]) <= 0.01 * seen[1], seen


def test_os_running_statistics_are_pooled_over_T_B_H_W(digits_batch):
    from methods.layers import BatchNorm

    x, y = digits_batch
    T = 4
    x_seq = x.unsqueeze(0) * torch.linspace(0.6, 1.4, T).view(T, 1, 1, 1, 1)  # frames that differ per step
    method = METHODS["os"](MethodConfig(T=T))
    model = method.build("cnn_digits", 10, 1)
    bns = [m for m in model.modules() if isinstance(m, BatchNorm)]
    seen = {id(b): [] for b in bns}
    hooks = [b.register_forward_pre_hook(lambda m, inp: seen[id(m)].append(inp[0].detach().clone())) for b in bns]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    method.train_step(model, x_seq, y, opt)
    for b in bns:
        allx = torch.cat(seen[id(b)]).double()  # all T*B inputs
        assert len(seen[id(b)]) == T
        mean = allx.mean((0, 2, 3))
        var = allx.var((0, 2, 3), unbiased=False)
        assert torch.allclose(b.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(b.running_var.double(), var, rtol=1e-4, atol=1e-6)
        seen[id(b)].clear()
    first = {id(b): (b.running_mean.clone(), b.running_var.clone()) for b in bns}
    method.train_step(model, x_seq.flip(0), y, opt)  # a second batch: momentum 0.1 towards its pooled statistics
    for b in bns:
        allx = torch.cat(seen[id(b)]).double()
        m0, v0 = first[id(b)]
        want_m = m0.double() + 0.1 * (allx.mean((0, 2, 3)) - m0.double())
        want_v = v0.double() + 0.1 * (allx.var((0, 2, 3), unbiased=False) - v0.double())
        assert torch.allclose(b.running_mean.double(), want_m, rtol=1e-5, atol=1e-6)
        assert torch.allclose(b.running_var.double(), want_v, rtol=1e-4, atol=1e-6)
    for h in hooks:
        h.remove()


def test_os_forward_normalises_with_running_statistics(digits_batch):
    from methods.layers import BatchNorm, configure

    x, y = digits_batch
    method = METHODS["os"](MethodConfig(T=2))
    model = method.build("cnn_digits", 10, 1)
    method.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    bn = next(m for m in model.modules() if isinstance(m, BatchNorm))
    configure(model, "os", 2)
    rm, rv = bn.running_mean.view(1, -1, 1, 1), bn.running_var.view(1, -1, 1, 1)
    w, b = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
    z = rm + 1.5 * rv.sqrt() * torch.randn(16, bn.num_features, 8, 8) + 0.3 * rv.sqrt()
    want = (z - rm) / torch.sqrt(rv + bn.eps) * w + b
    assert torch.allclose(bn(z), want, atol=1e-5)
    # start-up safety: a batch whose std is over 20x the running one is normalised with its own statistics
    z = rm + 50 * rv.sqrt() * torch.randn(16, bn.num_features, 8, 8)
    zm, zv = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(bn(z), (z - zm) / torch.sqrt(zv + bn.eps) * w + b, atol=1e-4)


def test_ots_threshold_matches_a_loop():
    """theta_1 = theta_0; theta_t = m_t + rho s_t with rho from step 1 (mean/std over the whole layer)."""
    from methods.layers import LIF, configure
    from methods.neuron import get_preset

    cfg = get_preset("rbp")
    T, N = 5, 300
    xs = torch.randn(T, N, dtype=torch.float64) * 0.8 + 0.4
    lif = LIF(cfg)
    configure(lif, "os", T)
    got = torch.stack([lif(xs[t]) for t in range(T)])
    v = torch.zeros(N, dtype=torch.float64)
    rho = None
    for t in range(T):
        h = cfg.decay * v + xs[t] if t else xs[t].clone()
        m, s = h.mean().item(), h.std().item()
        if rho is None:
            rho = (cfg.threshold - m) / s
        th = m + rho * s
        spikes = (h >= th).double()
        assert torch.equal(got[t], spikes), t
        v = h - th * spikes
    assert 0 < got.mean() < 1


def test_ottt_scaled_ws_option(digits_batch):
    from methods.layers import LIF, BatchNorm

    x, y = digits_batch
    method = METHODS["ottt_a"](MethodConfig(T=3, options={"norm": "ws"}))
    model = method.build("cnn_digits", 10, 1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for c in convs:
        w = c.weight.detach()  # the standardised weight
        raw = c.parametrizations.weight.original.detach().double()
        fan_in = w[0].numel()
        m = raw.mean((1, 2, 3), keepdim=True)
        v = raw.var((1, 2, 3), unbiased=True, keepdim=True)
        assert torch.allclose(w.double(), (raw - m) / torch.sqrt(v * fan_in + 1e-4), atol=1e-6)
        assert torch.allclose(w.mean((1, 2, 3)), torch.zeros(w.shape[0]), atol=1e-5)
    bn = next(m for m in model.modules() if isinstance(m, BatchNorm))
    z = torch.randn(4, bn.num_features, 3, 3)
    assert torch.equal(bn(z), z)
    from methods.online import Scale

    spikes, scaled = [], []
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    scales = [m for m in model.modules() if isinstance(m, Scale)]
    assert len(lifs) == len(scales) == 3  # a Scale after every hidden neuron
    hooks = [m.register_forward_hook(lambda m, i, o: spikes.append(o.detach())) for m in lifs]
    hooks += [m.register_forward_hook(lambda m, i, o: scaled.append(o.detach())) for m in scales]
    out = method.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.01))
    for h in hooks:
        h.remove()
    assert torch.isfinite(out.loss)
    # the neuron emits spikes (what a firing-rate readout counts); the layer after it sees them x 2.74
    assert set(torch.cat([o.flatten() for o in spikes]).unique().tolist()) == {0.0, 1.0}
    assert set(torch.cat([o.flatten() for o in scaled]).unique().tolist()) == {0.0, torch.tensor(2.74).item()}
    gains = [p for n, p in model.named_parameters() if n.endswith("gain")]
    assert len(gains) == len(convs) and all(g.grad is not None for g in gains)
    assert method.infer(model, x).shape == (len(x), 10)
    with pytest.raises(ValueError, match="norm"):
        METHODS["ottt_a"](MethodConfig(T=3, options={"norm": "layer"}))


def test_os_fixed_test_threshold_makes_inference_batch_independent(digits_batch):
    x, y = digits_batch
    train = METHODS["os"](MethodConfig(T=3))
    model = train.build("cnn_digits", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        train.train_step(model, x, y, opt)
    model.eval()
    fixed = METHODS["os"](MethodConfig(T=3, options={"fixed_test_threshold": True}))
    assert torch.allclose(fixed.infer(model, x)[:8], fixed.infer(model, x[:8]), atol=1e-6)
    # the official default: thresholds from the test batch itself, so the rest of the batch matters
    assert not torch.allclose(train.infer(model, x)[:8], train.infer(model, x[:8]), atol=1e-6)
