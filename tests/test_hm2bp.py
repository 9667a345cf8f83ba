"""HM2-BP: the vectorised S-PSP against a brute-force loop over post and pre spikes, the gradients against their
formulas evaluated here from recorded spike counts and S-PSPs, the forward dynamics against a per-neuron loop."""

import math

import pytest
import torch
from torch import nn

from methods import METHODS
from methods.hm2bp import (HM2Neuron, count_errors, encode, inject_label_spikes, layer_gradient,
                           pre_traces, simulate, spsp_dense)
from methods.models.hm2 import SumPool2d

from .helpers import NoOpOptimizer

TM, TS = 64.0, 8.0
N = HM2Neuron()


def K(u):
    return (math.exp(-u / TM) - math.exp(-u / TS)) / (1 - TS / TM)


def brute_spsp(pre_times: list[int], post_times: list[int]) -> float:
    """The S-PSP rule of HM2-BP (Jin et al., NeurIPS 2018), one post and one pre neuron, loops over spikes."""
    if not post_times:
        return 0.1 if pre_times else 0.0
    e = 0.0
    for k, tk in enumerate(post_times):
        rk = post_times[k - 1] + 2 if k > 0 else 0
        sk = tk - rk
        for tp in pre_times:
            q = tp + 2
            if q > tk:
                continue
            u = tk - q
            e += K(u) if u <= sk else math.exp(-(u - sk) / TS) * K(sk)
    return e


def brute_spsp_matrix(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """e [B, N_post, N_pre] from flat trains [T, B, N] by the loop above."""
    T, B, n_pre = pre.shape
    n_post = post.shape[2]
    e = torch.zeros(B, n_post, n_pre, dtype=torch.float64)
    for b in range(B):
        for i in range(n_post):
            pt = torch.nonzero(post[:, b, i]).flatten().tolist()
            for j in range(n_pre):
                e[b, i, j] = brute_spsp(torch.nonzero(pre[:, b, j]).flatten().tolist(), pt)
    return e


def random_trains(T, B, n, p, gap=1, seed=0):
    """Random 0/1 trains; with ``gap`` > 1 no two spikes of a neuron closer than ``gap`` steps (a refractory train)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(T, B, n, generator=g, dtype=torch.float64) < p).to(torch.float64)
    if gap > 1:
        for b in range(B):
            for i in range(n):
                last = -gap
                for t in range(T):
                    if s[t, b, i]:
                        if t - last < gap:
                            s[t, b, i] = 0
                        else:
                            last = t
    return s


@pytest.mark.parametrize("T,gap,p", [(40, 1, 0.3), (120, 3, 0.15), (300, 3, 0.05)])
def test_vectorised_spsp_equals_brute_force(T, gap, p):
    pre = random_trains(T, 2, 6, p, seed=1)
    post = random_trains(T, 2, 5, p, gap=gap, seed=2)
    post[:, 1, 0] = 0  # a silent post neuron: the 0.1 floor where the pre neuron fired
    pre[:, 0, 3] = 0  # a silent pre neuron
    want = brute_spsp_matrix(pre, post)
    got = spsp_dense(pre, post, N)
    assert want.abs().max() > 1.0
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-9, rel
    assert got[1, 0, 0] == pytest.approx(0.1) and (got[0, :, 3] == 0).all()


def test_pre_traces_are_decayed_sums():
    pre = random_trains(30, 1, 2, 0.3, seed=3)
    am, as_ = pre_traces(pre, N)
    for j in range(2):
        times = torch.nonzero(pre[:, 0, j]).flatten().tolist()
        for tau in range(30):
            assert am[tau, 0, j].item() == pytest.approx(sum(math.exp(-(tau - t - 2) / TM) for t in times if t + 2 <= tau), abs=1e-12)
            assert as_[tau, 0, j].item() == pytest.approx(sum(math.exp(-(tau - t - 2) / TS) for t in times if t + 2 <= tau), abs=1e-12)


def formulas(e, W, o_post, o_pre, delta, th):
    """dW, delta_below of one fully connected layer from e [B, I, J], W [I, J], counts and delta [B, I]."""
    dt = delta / th
    a = (W[None] * e).sum(2)
    sigma = torch.where(o_post > 0, a / (th * o_post.clamp(min=1e-30)), torch.full_like(a, 0.5))
    dW = (dt[:, :, None] * e * (1 + sigma)[:, :, None]).sum(0)
    below = torch.where(o_pre > 0, (dt[:, :, None] * W[None] * e).sum(1) / o_pre.clamp(min=1e-30), dt @ W)
    return dW, below


def test_linear_layer_gradient_equals_formulas():
    T, B, J, I, th = 80, 3, 7, 4, 5.0
    pre = random_trains(T, B, J, 0.2, seed=4)
    post = random_trains(T, B, I, 0.1, gap=3, seed=5)
    post[:, 2, 1] = 0
    pre[:, 1, 0] = 0
    op = nn.Linear(J, I, bias=False).double()
    torch.manual_seed(0)
    nn.init.uniform_(op.weight, -1, 1)
    delta = torch.randn(B, I, dtype=torch.float64) * 10
    e = brute_spsp_matrix(pre, post)
    want_dw, want_below = formulas(e, op.weight.detach(), post.sum(0), pre.sum(0), delta, th)
    (dw,), below = layer_gradient(op, pre, post, delta, th, N, need_input_error=True)
    assert torch.allclose(dw, want_dw, rtol=1e-9, atol=1e-9)
    assert torch.allclose(below, want_below, rtol=1e-9, atol=1e-9)


def test_conv_and_pool_layer_gradient_equals_formulas():
    """A conv layer shares weights: dW[co, ci, ky, kx] sums the per-synapse formula over output positions."""
    T, B, th = 60, 2, 3.0
    cin, cout, H = 2, 3, 5
    pre = random_trains(T, B, cin * H * H, 0.2, seed=6)
    op = nn.Conv2d(cin, cout, 3, bias=False).double()
    torch.manual_seed(1)
    nn.init.uniform_(op.weight, -1, 1)
    Ho = H - 2
    post = random_trains(T, B, cout * Ho * Ho, 0.1, gap=3, seed=7)
    delta = torch.randn(B, cout * Ho * Ho, dtype=torch.float64) * 5
    # the equivalent dense matrix of the conv, entry by entry
    W = torch.zeros(cout * Ho * Ho, cin * H * H, dtype=torch.float64)
    where = {}
    for co in range(cout):
        for y in range(Ho):
            for x in range(Ho):
                i = (co * Ho + y) * Ho + x
                for ci in range(cin):
                    for ky in range(3):
                        for kx in range(3):
                            j = (ci * H + y + ky) * H + x + kx
                            W[i, j] = op.weight[co, ci, ky, kx]
                            where[(i, j)] = (co, ci, ky, kx)
    e = brute_spsp_matrix(pre, post)
    dw_dense, want_below = formulas(e, W, post.sum(0), pre.sum(0), delta, th)
    want_dw = torch.zeros_like(op.weight)
    for (i, j), idx in where.items():
        want_dw[idx] += dw_dense[i, j]
    shape_in, shape_out = (T, B, cin, H, H), (T, B, cout, Ho, Ho)
    (dw,), below = layer_gradient(op, pre.reshape(shape_in), post.reshape(shape_out), delta.reshape(B, cout, Ho, Ho), th, N,
                                  need_input_error=True)
    assert torch.allclose(dw, want_dw, rtol=1e-9, atol=1e-9)
    assert torch.allclose(below.reshape(B, -1), want_below, rtol=1e-9, atol=1e-9)
    # a sum-pooling layer: no weights, the error goes down with w_ij = 1 on its window
    pool = SumPool2d(2)
    post_p = random_trains(T, B, cin * 2 * 2, 0.1, gap=3, seed=8)
    pre_p = random_trains(T, B, cin * 4 * 4, 0.2, seed=9)
    Wp = torch.zeros(cin * 4, cin * 16, dtype=torch.float64)
    for c in range(cin):
        for y in range(4):
            for x in range(4):
                Wp[(c * 2 + y // 2) * 2 + x // 2, (c * 4 + y) * 4 + x] = 1.0
    dp = torch.randn(B, cin * 4, dtype=torch.float64)
    _, want_p = formulas(brute_spsp_matrix(pre_p, post_p), Wp, post_p.sum(0), pre_p.sum(0), dp, 2.0)
    wg, below_p = layer_gradient(pool, pre_p.reshape(T, B, cin, 4, 4), post_p.reshape(T, B, cin, 2, 2),
                                 dp.reshape(B, cin, 2, 2), 2.0, N, True)
    assert wg == [] and torch.allclose(below_p.reshape(B, -1), want_p, rtol=1e-9, atol=1e-9)


def test_train_step_sets_the_chained_gradients():
    """Two layers, a batch of 3, one sample with a silent label neuron: p.grad = the formulas chained, / batch."""
    torch.manual_seed(0)
    method = METHODS["hm2bp"](T=60)
    net = method.build("hm2_mlp", 4, 1, input_shape=(1, 3, 3), widths=[6], thresholds=[1.5, 2.0]).double()
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64) * 3  # p = x / 5.5 per step
    y = torch.tensor([0, 2, 3])
    torch.manual_seed(42)
    trains = net.run(encode(x, 60, net).double())
    torch.manual_seed(42)
    out = method.train_step(net, x, y, NoOpOptimizer())
    s0, s1, s2 = (t.reshape(60, 3, -1) for t in trains)
    assert torch.equal(out.logits, s2.sum(0))
    delta = count_errors(s2.sum(0), y)
    post = inject_label_spikes(s2, y)
    W1, W2 = net.ops[0][1].weight.detach(), net.ops[1].weight.detach()
    dw2, d1 = formulas(brute_spsp_matrix(s1, post), W2, post.sum(0), s1.sum(0), delta, 2.0)
    dw1, _ = formulas(brute_spsp_matrix(s0, s1), W1, s1.sum(0), s0.sum(0), d1, 1.5)
    assert torch.allclose(net.ops[1].weight.grad, dw2 / 3, rtol=1e-9, atol=1e-10)
    assert torch.allclose(net.ops[0][1].weight.grad, dw1 / 3, rtol=1e-9, atol=1e-10)
    assert out.loss.item() == pytest.approx(0.5 * (delta ** 2).sum(1).mean().item())


def test_loss_targets_margin_and_label_injection():
    counts = torch.tensor([[0.0, 3.0, 12.0], [33.0, 7.0, 11.0]])
    y = torch.tensor([0, 0])
    d = count_errors(counts, y)
    assert d.tolist() == [[-35.0, 0.0, 7.0], [0.0, 0.0, 6.0]]  # targets 35 / 5, |error| <= 5 ignored
    out = torch.zeros(100, 2, 3)
    out[10, 1, 0] = 1
    inj = inject_label_spikes(out, y)
    assert inj[:, 0, 0].sum() == 35 and torch.equal(inj[:, 1], out[:, 1]) and out[:, 0, 0].sum() == 0
    gaps = torch.diff(torch.nonzero(inj[:, 0, 0]).flatten())
    assert gaps.min() >= 2 and gaps.max() <= 3  # evenly spaced over T=100


def reference_neuron(currents: list[float], th: float, n=N) -> list[int]:
    """One neuron, step by step, float64, from the S-PSP rule of HM2-BP."""
    v = c = 0.0
    ref = 0
    out = []
    for t in range(len(currents)):
        v *= 1 - 1 / n.tau_m
        c *= 1 - 1 / n.tau_s
        if t >= 1:
            c += currents[t - 1]
        v += c / n.tau_s
        if ref > 0:
            v = 0.0
            ref -= 1
        if v > th - 1e-6:
            out.append(1)
            v = 0.0
            ref = n.refractory
        else:
            out.append(0)
    return out


def test_forward_dynamics_equal_step_by_step_reference():
    g = torch.Generator().manual_seed(3)
    T, B, n = 200, 3, 5
    cur = torch.rand(T, B, n, generator=g, dtype=torch.float64) * 3 - 0.5
    th = 4.0
    s = simulate(cur, th)
    total = 0
    for b in range(B):
        for i in range(n):
            want = reference_neuron(cur[:, b, i].tolist(), th)
            assert s[:, b, i].tolist() == want
            total += sum(want)
            times = [t for t, v in enumerate(want) if v]
            assert all(t2 - t1 >= 3 for t1, t2 in zip(times, times[1:]))  # 2 refractory steps after each spike
    assert total > 20


def test_supports_only_its_architectures():
    m = METHODS["hm2bp"](T=10)
    assert m.supports("hm2_mlp") and m.supports("hm2_cnn") and not m.supports("resnet18")
    assert not METHODS["bptt_m"](T=2).supports("hm2_mlp")
    net = m.build("hm2_cnn", 10, 1, input_shape=(1, 28, 28))
    assert [type(o).__name__ for o in net.ops] == ["Conv2d", "SumPool2d", "Conv2d", "SumPool2d", "Sequential", "Linear"]
    assert net.ops[4][1].in_features == 640 and net.ops[4][1].out_features == 300
    assert m.build("hm2_mlp", 10, 2, input_shape=(2, 34, 34)).ops[0][1].in_features == 2312


def test_encoding_poisson_and_events():
    torch.manual_seed(0)
    net = METHODS["hm2bp"](T=2000).build("hm2_mlp", 10, 1, input_shape=(1, 2, 2))
    x = torch.tensor([[[[0.0, 0.55], [1.0, 0.3]]]])
    s = encode(x, 2000, net)
    assert s.shape == (2000, 1, 1, 2, 2) and set(s.unique().tolist()) <= {0.0, 1.0}
    rate = s.mean(0).flatten()
    assert rate[0] == 0 and abs(rate[1] - 0.1) < 0.02 and abs(rate[2] - 1 / 5.5) < 0.025
    ev = torch.zeros(7, 2, 2, 3, 3)
    ev[3, 1, 0, 1, 1] = 1
    assert torch.equal(encode(ev, 7, net), ev)


@pytest.mark.parametrize("dataset", ["digits", "nmnist"])
def test_train_cell_end_to_end(tmp_path, dataset):
    """Through the harness: Poisson spikes from digits, binary 600 us bins from miniature N-MNIST files."""
    from bench.grid import Cell
    from bench.runner import run_cell

    from .test_datasets import write_nmnist

    if dataset == "nmnist":
        write_nmnist(tmp_path)
    cell = Cell(method="hm2bp", arch="hm2_mlp", dataset=dataset, T=30, epochs=1, batch_size=8, eval_batch_size=64,
                optimizer="adam", lr=0.01, schedule="invsqrt", weight_decay=0.0, warmup_steps=0, train_subset=64,
                arch_options={"widths": [16], "thresholds": [3.0, 3.0]})
    res = run_cell(cell, data_root=str(tmp_path))
    assert res.status == "ok", res.row["error"]
    assert 0 <= res.row["acc_top1"] <= 100 and res.row["num_params"] == (64 if dataset == "digits" else 2312) * 16 + 16 * 10
