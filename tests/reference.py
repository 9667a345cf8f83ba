"""Independent float64 reference networks for the gradient tests: plain functional code, the spike
non-linearity written as a straight-through surrogate, unrolled by hand in time."""

import torch
import torch.nn.functional as F


def spike(z, alpha=4.0):
    sig = torch.sigmoid(alpha * z)
    return (z >= 0).to(z.dtype) + (sig - sig.detach())


def bn(z, gamma, beta, dims, eps=1e-5):
    mean = z.mean(dims, keepdim=True)
    var = ((z - mean) ** 2).mean(dims, keepdim=True)
    shape = [1, -1] + [1] * (z.dim() - 2)
    return (z - mean) / torch.sqrt(var + eps) * gamma.view(shape) + beta.view(shape)


def lif_seq(zs, decay=0.2, threshold=1.0):
    """zs: list over t of input currents; soft reset, reset detached."""
    v, out = None, []
    for z in zs:
        h = z if v is None else decay * v + z
        s = spike(h - threshold)
        v = h - threshold * s.detach()
        out.append(s)
    return out


class CNNRef:
    """The cnn_digits architecture: 3 x (conv3x3 no bias -> BN -> LIF), avgpool after the 2nd, GAP, Linear."""

    def __init__(self, model):
        p = dict(model.named_parameters())
        f = "features."
        self.convs = [p[f + "0.weight"], p[f + "3.weight"], p[f + "7.weight"]]
        self.bns = [(p[f + "1.weight"], p[f + "1.bias"]), (p[f + "4.weight"], p[f + "4.bias"]), (p[f + "8.weight"], p[f + "8.bias"])]
        self.fc = (p["classifier.weight"], p["classifier.bias"])

    def multi(self, x, T):
        """BPTT-m: layer by layer over all T, BN statistics over T*B."""
        s = [x] * T
        for i, (w, (g, b)) in enumerate(zip(self.convs, self.bns)):
            z = F.conv2d(torch.cat(s), w, padding=1)
            z = bn(z, g, b, (0, 2, 3))
            s = lif_seq(list(z.chunk(T)))
            if i == 1:
                s = [F.avg_pool2d(v, 2) for v in s]
        outs = [F.linear(v.mean((2, 3)), *self.fc) for v in s]
        return torch.stack(outs).mean(0)

    def single(self, x, T):
        """BPTT-s: step by step, BN statistics per step, membrane carried between steps."""
        v = [None] * 3
        outs = []
        for _ in range(T):
            h = x
            for i, (w, (g, b)) in enumerate(zip(self.convs, self.bns)):
                z = bn(F.conv2d(h, w, padding=1), g, b, (0, 2, 3))
                hh = z if v[i] is None else 0.2 * v[i] + z
                s = spike(hh - 1.0)
                v[i] = hh - s.detach()
                h = F.avg_pool2d(s, 2) if i == 1 else s
            outs.append(F.linear(h.mean((2, 3)), *self.fc))
        return torch.stack(outs).mean(0)


def online_loss(o, y, T, w=0.05, target="ones"):
    tgt = torch.ones_like(o) if target == "ones" else F.one_hot(y, o.shape[1]).to(o.dtype)
    return ((1 - w) * F.cross_entropy(o, y) + w * F.mse_loss(o, tgt)) / T


def cnn_online(ref: "CNNRef", x, y, T, target="ones"):
    """SLTT on cnn_digits: per-step BN statistics, V detached between steps, per-step loss; returns the
    summed objective (its gradient is the sum of the per-step gradients: the steps share no graph)."""
    v = [None] * 3
    total = 0.0
    for _ in range(T):
        h = x
        for i, (w, (g, b)) in enumerate(zip(ref.convs, ref.bns)):
            z = bn(F.conv2d(h, w, padding=1), g, b, (0, 2, 3))
            hh = z if v[i] is None else 0.2 * v[i].detach() + z
            s = spike(hh - 1.0)
            v[i] = hh - s.detach()
            h = F.avg_pool2d(s, 2) if i == 1 else s
        total = total + online_loss(F.linear(h.mean((2, 3)), *ref.fc), y, T, target=target)
    return total
