import pytest

from bench.errors import UsageError
from bench.grid import Cell, expand, load_grid, parse_filters, parse_sets

SPEC = {
    "axes": {"method": ["bptt_m", "rate_m", "rate_s"], "arch": ["cnn_digits", "mlp"], "dataset": ["digits"], "T": [1, 2, 4]},
    "fixed": {"epochs": 2, "lr": 0.05},
    "exclude": [{"method": "rate_s", "T": [1, 2]}],
    "override": [{"match": {"method": "rate_m"}, "set": {"lr": 0.2}}],
}


def test_cartesian_product_exclude_override():
    cells = expand(SPEC, "g")
    assert len(cells) == 3 * 2 * 3 - 2 * 2
    assert not any(c.method == "rate_s" and c.T in (1, 2) for c in cells)
    assert {c.lr for c in cells if c.method == "rate_m"} == {0.2}
    assert {c.lr for c in cells if c.method != "rate_m"} == {0.05}
    assert all(c.epochs == 2 and c.grid == "g" for c in cells)


def test_filter_and_set():
    cells = expand(SPEC, "g", parse_filters(["method=rate_m,bptt_m", "T=1,4"]), parse_sets(["epochs=5", "lr=0.3"]))
    assert sorted({(c.method, c.T) for c in cells}) == [("bptt_m", 1), ("bptt_m", 4), ("rate_m", 1), ("rate_m", 4)]
    assert all(c.epochs == 5 and c.lr == 0.3 for c in cells)


def test_key_covers_result_fields_only():
    a = Cell("rate_m", "mlp", "digits", 4)
    assert a.key == Cell("rate_m", "mlp", "digits", 4).key
    assert a.key == Cell("rate_m", "mlp", "digits", 4, grid="other").key
    for change in ({"T": 2}, {"seed": 1}, {"lr": 0.01}, {"method_options": {"bn_last_step": True}}, {"device": "cuda"}):
        assert Cell(**{**a.config(), **change}).key != a.key, change


@pytest.mark.parametrize("bad,msg", [
    ({"axes": {**SPEC["axes"], "method": ["nope"]}}, "unknown method 'nope'; valid: bptt_m"),
    ({"axes": {**SPEC["axes"], "arch": ["resnet1000"]}}, "unknown arch 'resnet1000'; valid:"),
    ({"axes": {**SPEC["axes"], "dataset": ["cifar11"]}}, "unknown dataset 'cifar11'; valid: cifar10, cifar100, cifar10_dvs, digits, imagenet, mnist, nmnist"),
    ({"axes": {**SPEC["axes"], "T": [0]}}, "T must be a positive integer"),
    ({"axes": {**SPEC["axes"], "T": ["x"]}}, "T must be int"),
    ({"axes": SPEC["axes"], "fixed": {"epochz": 1}}, "unknown cell field 'epochz'"),
    ({"axes": {"method": ["bptt_m"]}}, "axis 'arch' is missing"),
])
def test_bad_grid_values(bad, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(")):
        expand(bad, "g")


def test_bad_filters():
    with pytest.raises(UsageError, match="unknown method"):
        parse_filters(["method=bogus"])
    with pytest.raises(UsageError, match="positive"):
        parse_filters(["T=-1"])
    with pytest.raises(UsageError, match="FIELD=VALUE"):
        parse_sets(["epochs"])


def test_malformed_and_missing_grid_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[axes\nmethod = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_grid(bad)
    with pytest.raises(UsageError, match="not found; grids here: ci_cpu, ci_gpu, default"):
        load_grid("no_such_grid")


def test_shipped_grids_expand():
    for name, n in (("default", 20 + 5 * 2 + 1 + 24), ("profile_cpu", 36), ("paper_cifar", 9 * 3 * 2 * 3 * 3), ("paper_cost", 16),
                    ("paper_imagenet", 6), ("paper_dvs", 27), ("ci_cpu", 20), ("ci_gpu", 20), ("paper_hm2bp", 15), ("hm2bp_cost", 12)):
        gname, spec = load_grid(name)
        cells = expand(spec, gname)
        assert len(cells) == n
    _, spec = load_grid("default")
    cells = expand(spec, "default")
    assert {c.method for c in cells} == {"bptt_m", "bptt_s", "rate_m", "rate_s", "ottt_a", "ottt_o", "sltt", "sltt_k", "os", "hm2bp"}
    assert [(c.arch, c.T, c.optimizer, c.schedule) for c in cells if c.method == "hm2bp"] == [("hm2_mlp", 100, "adam", "invsqrt")]
    assert {c.T for c in cells if c.method in ("bptt_m", "rate_m")} == {1, 2, 4, 6, 8}
