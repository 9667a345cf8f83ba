"""Rate-based BP against closed forms, autograd references and BPTT."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.profile import SavedTensorsMeter
from methods import METHODS, MethodConfig
from methods.layers import LIF, configure, lif_layers, reset_state
from methods.models.common import SNN
from methods.neuron import NeuronConfig, get_preset

from .helpers import NoOpOptimizer, grads, zero_grads


def spike_pass_records(model, x, T, mode="spike_multi"):
    """Run the spike pass the way rate_m does and read each LIF's recorded rate and eligibility."""
    reset_state(model)
    configure(model, mode, T)
    with torch.no_grad():
        if mode == "spike_multi":
            model(x.unsqueeze(0).expand(T, *x.shape).reshape(-1, *x.shape[1:]))
        else:
            for _ in range(T):
                model(x)
    return [(m.rate.clone(), m.elig.clone()) for m in lif_layers(model)]


# --------------------------------------------------------------------------- eligibility


@pytest.mark.parametrize("cfg", [NeuronConfig(), NeuronConfig(detach_reset=False), NeuronConfig(reset="hard"),
                                 NeuronConfig(reset="hard", detach_reset=False), get_preset("sltt"), get_preset("ottt")],
                         ids=["soft-det", "soft", "hard-det", "hard", "sltt", "ottt"])
@pytest.mark.parametrize("mode", ["spike_multi", "spike_single"])
def test_eligibility_is_derivative_of_rate_wrt_mean_input(cfg, mode):
    """e = d(mean_t S_t)/d(delta) for a perturbation delta added to the input at every step,
    with S_t the surrogate-differentiable BPTT dynamics (autograd, float64)."""
    T, N = 6, 500
    xs = torch.randn(T, N, dtype=torch.float64) * 0.7 + 0.6
    lif = LIF(cfg)
    configure(lif, mode, T)
    with torch.no_grad():
        if mode == "spike_multi":
            lif(xs.reshape(-1))
        else:
            for t in range(T):
                lif(xs[t])
    rate, elig = lif.rate, lif.elig
    delta = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    ref = LIF(cfg)
    configure(ref, "multi", T)
    s = ref((xs + delta).reshape(-1)).view(T, N)
    s.mean(0).sum().backward()
    assert torch.equal(rate, s.detach().mean(0))
    assert torch.allclose(elig, delta.grad, rtol=1e-12, atol=1e-14)
    assert 0.05 < rate.mean() < 0.95


# --------------------------------------------------------------------------- closed form


class SmallConv(SNN):
    """conv(1->6)-LIF, avgpool 2, conv(6->8)-LIF, GAP, Linear: no BN, so the closed form is short."""

    def __init__(self, neuron):
        super().__init__()
        self.c1, self.l1 = nn.Conv2d(1, 6, 3, padding=1), LIF(neuron)
        self.c2, self.l2 = nn.Conv2d(6, 8, 3, padding=1), LIF(neuron)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.avg_pool2d(self.l1(self.c1(x)), 2)
        return self.fc(self.l2(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("T", [1, 3, 6])
def test_rate_m_mlp_gradients_equal_closed_form(T, digits_batch):
    x, y = digits_batch
    x = x.double()
    method = METHODS["rate_m"](MethodConfig(T=T))
    model = method.build("mlp", 10, 1, widths=(48, 32), bn=False).double()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.6)
    (r1, e1), (r2, e2) = spike_pass_records(model, x, T)
    out = method.train_step(model, x, y, NoOpOptimizer())
    got = grads(model)
    W2, W3 = model.features[3].weight, model.classifier.weight
    r0 = x.flatten(1)
    logits = F.linear(r2, W3, model.classifier.bias)
    dc3 = (torch.softmax(logits, 1) - F.one_hot(y, 10).double()) / len(y)
    dc2 = (dc3 @ W3) * e2
    dc1 = (dc2 @ W2) * e1
    want = {
        "classifier.weight": dc3.T @ r2 / T, "classifier.bias": dc3.sum(0) / T,
        "features.3.weight": dc2.T @ r1 / T, "features.3.bias": dc2.sum(0) / T,
        "features.1.weight": dc1.T @ r0 / T, "features.1.bias": dc1.sum(0) / T,
    }
    assert torch.allclose(out.logits, logits, atol=1e-12)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-9, atol=1e-13), n
    assert e1.abs().sum() > 0 and e2.abs().sum() > 0


@pytest.mark.parametrize("T", [2, 5])
def test_rate_m_conv_gradients_equal_closed_form(T, digits_batch):
    from torch.nn.grad import conv2d_input, conv2d_weight

    x, y = digits_batch
    x = x.double()
    model = SmallConv(get_preset("rbp")).double()
    for c in (model.c1, model.c2):
        nn.init.normal_(c.weight, 0.0, 0.8)
    method = METHODS["rate_m"](MethodConfig(T=T))
    (r1, e1), (r2, e2) = spike_pass_records(model, x, T)
    out = method.train_step(model, x, y, NoOpOptimizer())
    got = grads(model)
    p1 = F.avg_pool2d(r1, 2)
    g2 = r2.mean((2, 3))
    logits = model.fc(g2)
    dc_fc = (torch.softmax(logits, 1) - F.one_hot(y, 10).double()) / len(y)
    dr2 = (dc_fc @ model.fc.weight)[:, :, None, None].expand_as(r2) / (r2.shape[2] * r2.shape[3])
    dc2 = dr2 * e2
    dp1 = conv2d_input(p1.shape, model.c2.weight, dc2, padding=1)
    dr1 = dp1.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4
    dc1 = dr1 * e1
    want = {
        "fc.weight": dc_fc.T @ g2 / T, "fc.bias": dc_fc.sum(0) / T,
        "c2.weight": conv2d_weight(p1, model.c2.weight.shape, dc2, padding=1) / T, "c2.bias": dc2.sum((0, 2, 3)) / T,
        "c1.weight": conv2d_weight(x, model.c1.weight.shape, dc1, padding=1) / T, "c1.bias": dc1.sum((0, 2, 3)) / T,
    }
    assert torch.allclose(out.logits, logits.detach(), atol=1e-12)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-9, atol=1e-13), n


# --------------------------------------------------------------------------- forward values


def test_rate_pass_values_equal_spike_pass(digits_batch):
    """rate_m with BN: every LIF of the rate pass outputs the observed rate, the logits are the mean logits."""
    x, y = digits_batch
    x = x.double()
    T = 5
    method = METHODS["rate_m"](MethodConfig(T=T))
    model = method.build("cnn_digits", 10, 1).double()
    records = spike_pass_records(model, x, T)
    configure(model, "multi", T)
    with torch.no_grad():  # the spiking network's own mean output, batch statistics over T*B
        mean_logits = method.mean_over_time(model(method.time_fold(model, x)))
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()) if m.mode == "rate" else None)
             for m in lif_layers(model)]
    out = method.train_step(model, x, y, NoOpOptimizer())
    for h in hooks:
        h.remove()
    assert len(seen) == len(records) == 3
    for (rate, _), value in zip(records, seen):
        assert torch.allclose(value, rate, atol=1e-12)
    assert torch.allclose(out.logits, mean_logits, rtol=1e-9, atol=1e-10)


def test_rate_s_values_equal_spike_pass_without_bn(digits_batch):
    x, y = digits_batch
    x = x.double()
    T = 4
    method = METHODS["rate_s"](MethodConfig(T=T))
    model = method.build("mlp", 10, 1, widths=(40,), bn=False).double()
    nn.init.normal_(model.features[1].weight, 0, 0.6)
    ((rate, _),) = spike_pass_records(model, x, T, mode="spike_single")
    configure(model, "multi", T)
    with torch.no_grad():
        mean_logits = method.mean_over_time(model(method.time_fold(model, x)))
    out = method.train_step(model, x, y, NoOpOptimizer())
    assert torch.allclose(out.logits, mean_logits, atol=1e-12)
    assert torch.allclose(out.logits, model.classifier(rate), atol=1e-12)


# --------------------------------------------------------------------------- agreement with BPTT


@pytest.mark.parametrize("rate,bptt", [("rate_m", "bptt_m"), ("rate_s", "bptt_s")])
def test_rate_equals_bptt_at_T1(rate, bptt, digits_batch):
    """At T=1 the rate pass is the spiking network itself: the gradients are BPTT's."""
    x, y = digits_batch
    x = x.double()
    m_rate, m_bptt = METHODS[rate](MethodConfig(T=1)), METHODS[bptt](MethodConfig(T=1))
    model = m_rate.build("cnn_digits", 10, 1).double()
    m_rate.train_step(model, x, y, NoOpOptimizer())
    g_rate = grads(model)
    zero_grads(model)
    m_bptt.train_step(model, x, y, NoOpOptimizer())
    g_bptt = grads(model)
    assert set(g_rate) == set(g_bptt)
    for n in g_bptt:
        assert torch.allclose(g_rate[n], g_bptt[n], rtol=1e-9, atol=1e-13), n


@pytest.mark.parametrize("rate,bptt", [("rate_m", "bptt_m"), ("rate_s", "bptt_s")])
def test_rate_gradient_points_where_bptt_does(rate, bptt, digits_batch):
    x, y = digits_batch
    T = 6
    m_rate, m_bptt = METHODS[rate](MethodConfig(T=T)), METHODS[bptt](MethodConfig(T=T))
    model = m_rate.build("cnn_digits", 10, 1)
    m_rate.train_step(model, x, y, NoOpOptimizer())
    g_rate = grads(model)
    zero_grads(model)
    m_bptt.train_step(model, x, y, NoOpOptimizer())
    g_bptt = grads(model)
    names = [n for n in g_bptt if n.endswith("weight")]
    a = torch.cat([T * g_rate[n].flatten() for n in names])
    b = torch.cat([g_bptt[n].flatten() for n in names])
    cos = F.cosine_similarity(a, b, dim=0).item()
    print(f"{rate} vs {bptt} at T={T}: cosine {cos:.4f}")
    assert cos > 0.9


def test_rate_s_bn_last_step_option(digits_batch):
    """The official last-step quirk is off by default, and on when asked, changes the gradient."""
    x, y = digits_batch
    T = 4
    x_seq = x.unsqueeze(0) * torch.linspace(0.5, 1.5, T).view(T, 1, 1, 1, 1)  # frames that differ per step
    out = {}
    for quirk in (False, True):
        torch.manual_seed(3)
        m = METHODS["rate_s"](MethodConfig(T=T, options={"bn_last_step": quirk}))
        model = m.build("cnn_digits", 10, 1)
        m.train_step(model, x_seq, y, NoOpOptimizer())
        out[quirk] = grads(model)
    diff = max((out[True][n] - out[False][n]).abs().max().item() for n in out[True])
    assert diff > 1e-6


# --------------------------------------------------------------------------- saved bytes


def saved_bytes(name, T, x, y, arch="cnn_digits"):
    torch.manual_seed(0)
    method = METHODS[name](MethodConfig(T=T))
    model = method.build(arch, 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    method.train_step(model, x, y, opt)  # warm-up
    with SavedTensorsMeter(exclude=model.parameters()) as meter:
        method.train_step(model, x, y, opt)
    assert meter.current_bytes == 0, "every saved tensor must be freed after the step"
    return meter.peak_bytes


def test_saved_bytes_rate_flat_in_T_bptt_linear(digits_batch):
    x, y = digits_batch
    x, y = x[:16].clone(), y[:16].clone()  # own storage: a saved view would keep the whole 64-sample batch alive
    Ts = [1, 2, 4, 8]
    bptt = {T: saved_bytes("bptt_m", T, x, y) for T in Ts}
    for name in ("rate_m", "rate_s"):
        rate = {T: saved_bytes(name, T, x, y) for T in Ts}
        print(name, rate)
        for T in Ts:
            assert abs(rate[T] - rate[1]) <= 0.01 * rate[1]
            assert rate[T] <= 1.05 * bptt[1]
    print("bptt_m", bptt)
    step = bptt[2] - bptt[1]
    assert step > 0.3 * bptt[1]
    for T in Ts:
        assert abs(bptt[T] - (bptt[1] + (T - 1) * step)) <= 0.01 * bptt[T]


@pytest.mark.parametrize("shape", [(12, 5, 3, 3), (20, 7)])
def test_rate_batchnorm_matches_value_swap_autograd(shape):
    """RateBatchNorm against the official construction evaluated by autograd: mu and var carry the
    spike statistics' values and the rate batch's gradients."""
    from methods.layers import RateBatchNorm

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    C = shape[1]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    mean_s = torch.randn(C, dtype=torch.float64) * 0.3
    var_s = torch.rand(C, dtype=torch.float64) + 0.5
    eps = 1e-5
    invstd_s = 1.0 / torch.sqrt(var_s + eps)
    g = torch.randn(*shape, dtype=torch.float64)

    y = RateBatchNorm.apply(x, w, b, mean_s, invstd_s, eps)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)

    dims = (0,) + tuple(range(2, len(shape)))
    view = [1, C] + [1] * (len(shape) - 2)
    mu_r = x.mean(dims)
    var_r = x.var(dims, unbiased=False)
    mu_hat = mean_s + mu_r - mu_r.detach()
    var_hat = var_s + var_r - var_r.detach()
    y_ref = w.view(view) * (x - mu_hat.view(view)) / torch.sqrt(var_hat.view(view) + eps) + b.view(view)
    rx, rw, rb = torch.autograd.grad(y_ref, (x, w, b), g)
    assert torch.allclose(y, y_ref, atol=1e-12)
    for a, r in ((gx, rx), (gw, rw), (gb, rb)):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)
