import pytest
import torch

from methods import ARCHS, METHODS, MethodConfig
from methods.layers import count_parameters

# the official models' parameter counts (issue: spiking core)
COUNTS = [
    ("resnet18", 10, 3, 11_173_962),
    ("resnet18", 100, 3, 11_220_132),
    ("resnet19", 10, 3, 12_697_994),
    ("vgg11", 10, 3, 11_001_354),
    ("vgg13", 10, 3, 9_416_010),
    ("vggsnn_cifar", 10, 3, 9_272_074),
    ("vggsnn_dvs", 10, 2, 9_271_498),
    ("sew_resnet34", 1000, 3, 21_806_184),
    ("preact_resnet34", 1000, 3, 21_806_184),
]


@pytest.mark.parametrize("arch,classes,cin,count", COUNTS)
def test_parameter_counts(arch, classes, cin, count):
    assert count_parameters(ARCHS[arch](num_classes=classes, in_channels=cin)) == count


SHAPES = {"resnet18": (3, 32), "resnet19": (3, 32), "vgg11": (3, 32), "vgg13": (3, 32), "vggsnn_cifar": (3, 32),
          "vggsnn_dvs": (2, 48), "sew_resnet34": (3, 64), "preact_resnet34": (3, 64), "cnn_digits": (1, 8), "mlp": (1, 8),
          "hm2_mlp": (1, 8), "hm2_cnn": (1, 28)}


def test_every_arch_is_tested():
    assert set(SHAPES) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_every_method_runs_every_arch(arch):
    cin, hw = SHAPES[arch]
    x = torch.rand(2, cin, hw, hw)
    y = torch.tensor([0, 1])
    small = arch in ("cnn_digits", "mlp", "hm2_mlp", "hm2_cnn")
    names = [n for n in sorted(METHODS) if METHODS[n](MethodConfig(T=2)).supports(arch)]
    assert names  # every architecture has a method that trains it
    for name in names if small else ("bptt_m", "rate_m"):
        method = METHODS[name](MethodConfig(T=2))
        model = method.build(arch, num_classes=5, in_channels=cin, input_shape=(cin, hw, hw))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        out = method.train_step(model, x, y, opt)
        assert torch.isfinite(out.loss) and out.logits.shape == (2, 5)
        assert method.infer(model, x).shape == (2, 5)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_event_input_shape_checked():
    method = METHODS["bptt_m"](MethodConfig(T=3))
    model = method.build("cnn_digits", 10, 1)
    assert method.infer(model, torch.rand(3, 4, 1, 8, 8)).shape == (4, 10)
    with pytest.raises(ValueError, match="time steps"):
        method.infer(model, torch.rand(5, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="neither"):
        method.infer(model, torch.rand(8, 8))


def test_bad_T_and_option():
    with pytest.raises(ValueError, match="positive"):
        MethodConfig(T=0)
    with pytest.raises(ValueError, match="unknown option"):
        METHODS["rate_s"](MethodConfig(T=2, options={"nope": 1}))
