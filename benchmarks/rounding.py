"""Why a fused kernel's spikes can differ from eager torch's on a GPU: the membrane update with one rounding (a fused
multiply-add) or two (a multiply, then an add), in float32, counted on a CPU.

    python benchmarks/rounding.py                    # cnn_digits on the digits, batch 64, T=4 (the backend test's step)
    python benchmarks/rounding.py --arch resnet18 --dataset synthetic:cifar10 --batch 16

Eager torch charges the membrane as two kernels, ``decay * v`` then ``+ x``: two roundings to float32. A compiled
Triton kernel (and torch.compile's) contracts the same expression into one fused multiply-add by default
(``enable_fp_fusion``): one rounding. The two differ by at most one unit in the last place, and a membrane that
lands within that of the threshold fires in one and not in the other; from there the two runs part. Triton's CPU
interpreter computes with numpy and never fuses, so the CPU tests cannot see it.

Here a fused multiply-add is emulated exactly enough: float32 operands are exact in float64, so is their product
(48 significant bits), and the sum is rounded once to float64 and then to float32 (a double rounding that can
differ from a true single rounding only at an exact halfway case of the second, vanishingly rare). Two figures:

- ``neurons``: every LIF layer's input currents of a real forward pass of the model, run through the LIF
  recurrence both ways: how many of the neuron-steps fire differently;
- ``step``: a whole training step of each method with the torch backend, its membrane update made fused: the
  largest relative difference of any parameter's gradient from the eager step (what
  tests/test_backends.py::test_method_gradient_is_the_same_on_every_backend holds to 1e-6), and the loss's.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.neuron import charge as eager_charge  # noqa: E402  (before fused_membrane replaces it)


def fused_charge(v, x, cfg):
    """methods.neuron.charge with ``decay * v + x`` rounded once (an emulated fused multiply-add)."""
    import torch

    if v is None:
        return eager_charge(v, x, cfg)
    decay = torch.tensor(cfg.decay, dtype=torch.float32).double()  # the float32 constant the kernels use
    h = (decay * v.double() + x.double()).to(x.dtype)
    if cfg.reset == "hard" and cfg.v_reset:
        h = h + (1.0 - cfg.decay) * cfg.v_reset
    return h


@contextmanager
def fused_membrane():
    """Every torch-backend LIF charges its membrane with one rounding while inside."""
    import methods.layers
    import methods.neuron
    import methods.online

    mods = (methods.neuron, methods.layers, methods.online)
    old = [m.charge for m in mods]
    for m in mods:
        m.charge = fused_charge
    try:
        yield
    finally:
        for m, f in zip(mods, old):
            m.charge = f


def _batch(dataset: str, batch: int, seed: int = 0):
    import torch

    from bench.data import dataset_info

    info = dataset_info(dataset)
    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images[:batch] / 16.0, dtype=torch.float32).unsqueeze(1)
        return x, torch.tensor(d.target[:batch], dtype=torch.long), info
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *info.shape, generator=g), torch.randint(info.num_classes, (batch,), generator=g), info


def flips(currents: list, cfg) -> tuple[int, int]:
    """(neuron-steps that fire differently, neuron-steps) over the layers' input currents [T, ...], each run through
    the LIF recurrence with the membrane update rounded twice (eager) and once (fused)."""
    from methods.neuron import reset

    differ = total = 0
    for xs in currents:
        v_e = v_f = None
        for t in range(xs.shape[0]):
            h_e, h_f = eager_charge(v_e, xs[t], cfg), fused_charge(v_f, xs[t], cfg)
            s_e, s_f = (h_e >= cfg.threshold).float(), (h_f >= cfg.threshold).float()
            differ += int((s_e != s_f).sum())
            total += s_e.numel()
            v_e, v_f = reset(h_e, s_e, cfg), reset(h_f, s_f, cfg)
    return differ, total


def neuron_figures(a) -> None:
    import torch

    from methods import METHODS, MethodConfig
    from methods.layers import LIF

    x, _, info = _batch(a.dataset, a.batch)
    m = METHODS["bptt_m"](MethodConfig(T=a.T))
    torch.manual_seed(0)
    model = m.build(a.arch, info.num_classes, info.shape[0], input_shape=info.shape)
    currents, cfgs = [], []
    for lif in (mod for mod in model.modules() if isinstance(mod, LIF)):
        lif.register_forward_pre_hook(lambda mod, args: currents.append(args[0].detach().view(a.T, -1)))
        cfgs.append(lif.neuron)
    with torch.no_grad():
        m.infer(model, x)
    differ, total = flips(currents, cfgs[0])
    print(f"neurons: {a.arch} on {a.dataset}, batch {a.batch}, T={a.T}: {len(currents)} LIF layers, {total} "
          f"neuron-steps; {differ} fire differently with one rounding instead of two "
          f"({differ / total * 1e6:.2f} per million)")


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def step_figures(a) -> None:
    import torch

    from methods import METHODS, MethodConfig
    from methods.layers import LIF

    x, y, info = _batch(a.dataset, a.batch)
    print(f"step: {a.arch} on {a.dataset}, batch {a.batch}, T={a.T}; fused against eager membrane update")
    print(f"{'method':10s} {'max rel grad diff':>18s} {'loss rel diff':>14s} {'spikes differ':>14s}")
    for name in a.methods:
        out = {}
        for fused in (False, True):
            m = METHODS[name](MethodConfig(T=a.T))
            torch.manual_seed(0)
            model = m.build(a.arch, info.num_classes, info.shape[0], input_shape=info.shape)
            spikes = []
            for lif in (mod for mod in model.modules() if isinstance(mod, LIF)):
                lif.register_forward_hook(lambda mod, args, s: spikes.append(s.detach().clone()))
            torch.manual_seed(1)  # sltt_k draws its backward steps
            with fused_membrane() if fused else _nothing():
                loss = m.train_step(model, x, y, _NoStep()).loss
            out[fused] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                          spikes)
        (l0, g0, s0), (l1, g1, s1) = out[False], out[True]
        grad = max(_rel(g1[k], g0[k]) for k in g0)
        nspk = sum(int((p != q).sum()) for p, q in zip(s0, s1) if p.shape == q.shape)
        print(f"{name:10s} {grad:18.2e} {abs(l1 - l0) / abs(l0):14.2e} {nspk:14d}")


@contextmanager
def _nothing():
    yield


class _NoStep:
    def zero_grad(self, set_to_none: bool = True):
        pass

    def step(self):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default in (("--arch", "cnn_digits"), ("--dataset", "digits"), ("--batch", 64), ("--T", 4)):
        p.add_argument(flag, default=default, type=type(default))
    p.add_argument("--methods", help="comma-separated (default: every method whose neurons are LIF modes, "
                                      "the ones the fused backends run)")
    a = p.parse_args(argv)
    from methods import METHODS

    a.methods = [m for m in a.methods.split(",") if m] if a.methods else \
        sorted(n for n, cls in METHODS.items() if cls.torch_only is None)

    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; valid: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return 2
    neuron_figures(a)
    step_figures(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
