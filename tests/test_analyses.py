"""The paper's analyses for every method: gradient fidelity, where the memory goes, behaviour over time steps, and
the report sections that show them (checked in a real browser and by pdflatex)."""

import copy
import json
import shutil
import subprocess

import pytest
import torch
from torch import nn

from methods import METHODS, MethodConfig
from methods.fidelity import GradientTap, compare_gradients, method_gradient, weight_names
from methods.layers import LIF
from methods.neuron import get_preset

from .helpers import cli

# ---------------------------------------------------------------- gradient fidelity: the method layer


def _gradients(name, ref, T, x, y, options=None, arch="cnn_digits"):
    """(method's gradient, reference's gradient, weight names, scale) on the same float64 weights and batch."""
    m = METHODS[name](MethodConfig(T=T, options=options or {}))
    r = METHODS[ref](MethodConfig(T=T))
    torch.manual_seed(0)
    model = m.build(arch, 10, 1).double()
    ref_model = r.build(arch, 10, 1).double()
    ref_model.load_state_dict(copy.deepcopy(model.state_dict()))
    scale = m.gradient_scale() / r.gradient_scale()
    return method_gradient(m, model, x, y), method_gradient(r, ref_model, x, y), weight_names(model), scale


@pytest.mark.parametrize("name,ref,options", [
    ("rate_m", "bptt_m", {}), ("rate_s", "bptt_s", {}),
    ("sltt", "bptt_s", {"mse_weight": 0.0}),  # SLTT's loss is BPTT's only without its MSE term
    ("bptt_m", "bptt_m", {}), ("rate_m", "rate_m", {}),  # a method against itself
])
def test_fidelity_is_exact_where_theory_says_so(digits_batch, name, ref, options):
    """At T=1 rate-BP and SLTT compute BPTT's gradient (rate-BP's / T, T = 1): cosine 1 and norm ratio 1 in float64,
    per layer and over all weights; so does any method against itself at any T."""
    x, y = digits_batch
    x = x.double()
    for T in ((1,) if name != ref else (1, 4)):
        g, gr, names, scale = _gradients(name, ref, T, x, y, options)
        rows = compare_gradients(g, gr, names, scale)
        assert len(rows) == len(names) + 1 and rows[-1]["name"] == "all"
        for r in rows:
            assert r["cosine"] == pytest.approx(1.0, abs=1e-12) and r["norm_ratio"] == pytest.approx(1.0, abs=1e-12), (T, r)


def test_fidelity_measures_a_difference_and_matches_numpy(digits_batch):
    """At T=4 rate_m is close to, not equal to, bptt_m; every figure equals the cosine and ratio numpy computes from
    the flattened gradients (rate_m's scaled by T), per layer and concatenated."""
    import numpy as np

    x, y = digits_batch
    g, gr, names, scale = _gradients("rate_m", "bptt_m", 4, x.double(), y)
    assert scale == 4.0
    rows = compare_gradients(g, gr, names, scale)
    for r in rows:
        if r["layer"] >= 0:
            a, b = (scale * g[r["name"]]).numpy().ravel(), gr[r["name"]].numpy().ravel()
        else:
            a = np.concatenate([(scale * g[n]).numpy().ravel() for n in names])
            b = np.concatenate([gr[n].numpy().ravel() for n in names])
        assert r["cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
        assert r["norm_ratio"] == pytest.approx(np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
        assert r["numel"] == a.size
    assert 0.9 < rows[-1]["cosine"] < 1.0 - 1e-6


def test_gradient_tap_changes_no_weight_and_sums_online_steps(digits_batch):
    """The tap leaves every parameter as it was; OTTT_O, which steps at every time step, gives the sum of its T
    per-step gradients on the same weights, which is OTTT_A's one gradient."""
    x, y = digits_batch
    x = x.double()
    ga, gb, _, _ = _gradients("ottt_o", "ottt_a", 3, x, y)
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-10, atol=1e-14)
    m = METHODS["bptt_m"](MethodConfig(T=2))
    model = m.build("cnn_digits", 10, 1)
    before = copy.deepcopy(model.state_dict())
    tap = GradientTap(model)
    m.train_step(model, x.float(), y, tap)
    assert tap.steps == 1 and set(tap.sums) == {n for n, _ in model.named_parameters()}
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BN statistics move in any training forward
            assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- where the memory goes


def _conv_lif_net(C: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, C, 3, padding=1, bias=False), LIF(get_preset("rbp")), nn.Flatten(),
                         nn.Linear(C * 64, 10))


@pytest.mark.parametrize("name", ["bptt_m", "rate_m"])
def test_saved_bytes_attributed_as_computed_by_hand(name):
    """A conv, a LIF layer and a linear readout, B=4, C=3, 8x8, T=4, float32 (4 bytes). By hand:
    bptt_m: the conv keeps its time-folded input (T B 64), the LIF its membrane at each step (the surrogate's
    argument, T B C 64), the linear its input: the spikes (T B C 64); rate_m: one rate pass: the conv its input
    (B 64), the LIF the eligibility (B C 64), the linear the rates (B C 64). Both: the loss keeps log-softmax
    (B 10 floats), the targets (B int64) and NLL's total weight (one float)."""
    from bench.profile import SavedTensorsMeter

    B, C, T = 4, 3, 4
    torch.manual_seed(0)
    model = _conv_lif_net(C)
    x, y = torch.rand(B, 1, 8, 8), torch.randint(0, 10, (B,))
    with SavedTensorsMeter(exclude=list(model.parameters()), model=model) as meter:
        METHODS[name](MethodConfig(T=T)).train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    n = T if name == "bptt_m" else 1
    want = {("conv", "activation"): n * B * 64 * 4,
            ("lif", "membrane" if name == "bptt_m" else "eligibility"): n * B * C * 64 * 4,
            ("linear", "spike" if name == "bptt_m" else "rate"): n * B * C * 64 * 4,
            ("other", "activation"): B * 10 * 4 + B * 8 + 4}
    got = {(r["module"], r["tensor"]): r["bytes"] for r in meter.breakdown()}
    assert got == want
    assert sum(got.values()) == meter.peak_bytes


# ---------------------------------------------------------------- behaviour over time steps


def _loader(x, y, batch):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def _trained(name, T, x, y, steps=15, arch="cnn_digits", **build):
    m = METHODS[name](MethodConfig(T=T))
    torch.manual_seed(0)
    model = m.build(arch, 10, **build)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(steps):
        m.train_step(model, x, y, opt)
    return m, model


def _direct_accuracy(method, model, batches):
    model.eval()
    hits = sum(int((method.infer(model, xb).argmax(1) == yb).sum()) for xb, yb in batches)
    model.train()
    return 100.0 * hits / sum(len(yb) for _, yb in batches)


@pytest.mark.parametrize("name", ["bptt_m", "os"])
def test_anytime_and_layer_rates_on_digits_match_direct_evaluation(digits_batch, name):
    """On the digits, after a few steps of training with T=4: the any-time accuracy at t equals the accuracy of
    the same network evaluated as a T=t network; the last equals the reported accuracy; each layer's firing rate
    equals the mean of its spikes counted by hooks of the test's own; there is no shuffle on static input."""
    from bench.runner import evaluate

    x, y = digits_batch
    method, model = _trained(name, 4, x, y, in_channels=1)
    batches = _loader(x, y, 16)
    acc, rate, details = evaluate(method, model, batches, torch.device("cpu"), analyses=True)
    anytime = {r["t"]: r["acc"] for r in details["anytime"]}
    assert sorted(anytime) == [1, 2, 3, 4] and all(r["analysis"] == "anytime" for r in details["anytime"])
    for t in range(1, 5):
        assert anytime[t] == pytest.approx(_direct_accuracy(METHODS[name](MethodConfig(T=t)), model, batches), abs=1e-9)
    assert anytime[4] == acc
    lifs = [(n, m) for n, m in model.named_modules() if isinstance(m, LIF)]
    seen = {n: [] for n, _ in lifs}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen[n].append(float(o.float().mean()))) for n, m in lifs]
    model.eval()
    for xb, _ in batches:
        method.infer(model, xb)
    for h in hooks:
        h.remove()
    assert [r["name"] for r in details["layers"]] == [n for n, _ in lifs]
    for r in details["layers"]:
        assert r["firing_rate"] == pytest.approx(sum(seen[r["name"]]) / len(seen[r["name"]]), rel=1e-6)
    assert 0.0 < rate < 1.0


def test_temporal_shuffle_on_event_frames_matches_direct_evaluation():
    """Synthetic event frames [T, B, 2, 8, 8] with a class signal in their order in time: each shuffle row's
    accuracy equals a direct evaluation of the frames permuted by its stored order, the in-order accuracy is the
    cell's, and the permutations are the fixed ones (the same on every call)."""
    from bench.runner import SHUFFLES, evaluate

    T, n = 4, 96
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(T, n, 2, 8, 8, generator=g) * 0.3
    x[0, y == 1] += 0.7  # class 1: events early; class 0: late
    x[-1, y == 0] += 0.7
    method, model = _trained("bptt_m", T, x, y, steps=20, arch="mlp", in_channels=2, input_shape=(2, 8, 8))
    batches = [(x[:, i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]
    acc, _, details = evaluate(method, model, batches, torch.device("cpu"), analyses=True)
    shuffles = [r for r in details["anytime"] if r["analysis"] == "shuffle"]
    assert len(shuffles) == SHUFFLES and {r["t"] for r in shuffles} == {T}
    assert acc == pytest.approx(_direct_accuracy(method, model, batches))
    for r in shuffles:
        perm = torch.tensor([int(v) for v in r["order"].split(",")])
        assert sorted(perm.tolist()) == list(range(T))
        want = _direct_accuracy(method, model, [(xb[perm], yb) for xb, yb in batches])
        assert r["acc"] == pytest.approx(want, abs=1e-9)
    again = evaluate(method, model, batches, torch.device("cpu"), analyses=True)[2]
    assert [r["order"] for r in again["anytime"] if r["analysis"] == "shuffle"] == [r["order"] for r in shuffles]


# ---------------------------------------------------------------- fidelity cells through the command line

GRID = """name = "analyses"
[axes]
method = ["bptt_m", "rate_m", "sltt"]
arch = ["cnn_digits"]
dataset = ["digits"]
T = [1, 2]
kind = ["train", "fidelity"]
[fixed]
epochs = 1
batch_size = 32
train_subset = 256
eval_batch_size = 360
warmup_steps = 1
steps = 2
[[exclude]]
kind = "train"
method = ["rate_m", "sltt"]
[[exclude]]
kind = "fidelity"
method = "bptt_m"
[[override]]
match = { kind = "fidelity" }
set = { trained_by = "bptt_m", weights_at = [0, -1] }
[[override]]
match = { kind = "train" }
set = { save_weights_at = [-1] }
"""


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A real run: bptt_m trains at T=1, 2 and keeps its last weights; fidelity cells of rate_m and sltt compare
    with BPTT at initialisation and with those weights."""
    root = tmp_path_factory.mktemp("analyses")
    grid = root / "analyses.toml"
    grid.write_text(GRID)
    out = root / "res"
    r = cli("run", str(grid), "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return grid, out


def test_fidelity_cells_store_what_a_direct_computation_gives(analysed):
    """Each fidelity cell's stored rows equal methods.fidelity on the train cell's kept weights (and the initial
    weights its seed builds), recomputed here; rate_m at T=1 has cosine and ratio 1 to float32 rounding."""
    from bench.data import get_loaders
    from reports.results import load_results

    _, out = analysed
    cells = load_results(out)
    fid = load_results(out, "fidelity")
    f = cells[cells["kind"] == "fidelity"]
    assert len(f) == 4 and (f["status"] == "ok").all()
    assert set(fid["epoch"]) == {0, 1}
    rate1 = f[(f["method"] == "rate_m") & (f["T"] == 1)].iloc[0]
    assert rate1["grad_cosine_init"] == pytest.approx(1.0, abs=1e-5)
    assert rate1["grad_norm_ratio_trained"] == pytest.approx(1.0, abs=1e-5)
    row = f[(f["method"] == "sltt") & (f["T"] == 2)].iloc[0]
    train = cells[(cells["kind"] == "train") & (cells["T"] == 2)].iloc[0]
    weights = torch.load(out / "weights" / train["key"] / "epoch_1.pt", weights_only=True)
    m, ref = METHODS["sltt"](MethodConfig(T=2)), METHODS["bptt_s"](MethodConfig(T=2))
    model, ref_model = m.build("cnn_digits", 10, 1), ref.build("cnn_digits", 10, 1)
    loader, _ = get_loaders("digits", 32, 360, 0, "cpu", None, 256, 2)
    x, y = next(iter(loader.batches(0, 0)))
    model.load_state_dict(weights)
    ref_model.load_state_dict(weights)
    want = compare_gradients(method_gradient(m, model, x, y), method_gradient(ref, ref_model, x, y), weight_names(model))
    got = fid[(fid["key"] == row["key"]) & (fid["epoch"] == 1) & (fid["batch"] == 0)].sort_values("layer")
    for w in want:
        g = got[got["layer"] == w["layer"]].iloc[0]
        assert g["cosine"] == pytest.approx(w["cosine"], abs=1e-6) and g["norm_ratio"] == pytest.approx(w["norm_ratio"], rel=1e-5)
    assert row["fidelity_reference"] == "bptt_s" and rate1["fidelity_reference"] == "bptt_m"


def test_fidelity_cell_without_weights_fails_alone_with_the_reason(analysed, tmp_path):
    """A fidelity cell whose train cell kept no weights ends with status error and says which weights it needs;
    a fidelity cell of a method without a reference, or on several devices, is refused before anything runs."""
    from reports.results import load_results

    grid, _ = analysed
    out = tmp_path / "res"
    r = cli("run", str(grid), "--out", str(out), "--filter", "kind=fidelity", "--filter", "method=rate_m",
            "--filter", "T=1")
    assert r.returncode == 1
    row = load_results(out).iloc[0]
    assert row["status"] == "error" and "run that train cell first" in row["error"]
    r = cli("run", str(grid), "--out", str(out), "--filter", "kind=fidelity", "--set", "method=hm2bp",
            "--set", "arch=hm2_mlp")
    assert r.returncode == 2 and "hm2bp names no reference method" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", str(grid), "--out", str(out), "--filter", "kind=fidelity", "--set", "weights_at=0,-3")
    assert r.returncode == 2 and "weights_at" in r.stderr and "Traceback" not in r.stderr


def test_train_cells_store_behaviour_and_memory_parts(analysed):
    from reports.results import load_results

    _, out = analysed
    cells = load_results(out)
    train = cells[cells["kind"] == "train"]
    layers, anytime, saved, ops = (load_results(out, k) for k in ("layers", "anytime", "saved", "ops"))
    assert set(layers["key"]) == set(train["key"]) == set(saved["key"]) == set(anytime["key"])
    for _, r in train.iterrows():
        a = anytime[anytime["key"] == r["key"]]
        assert sorted(a["t"]) == list(range(1, r["T"] + 1))
        assert a[a["t"] == r["T"]]["acc"].iloc[0] == pytest.approx(r["acc_top1"])
        s = saved[saved["key"] == r["key"]]
        assert s["bytes"].sum() == pytest.approx(r["saved_for_backward_mib"] * 2**20)
        assert set(s["module"]) >= {"conv", "bn", "lif"}
        assert len(layers[layers["key"] == r["key"]]) == 3  # cnn_digits' three LIF layers
        o = ops[ops["key"] == r["key"]]
        assert list(o["op"]) == ["conv", "conv", "conv", "linear"]  # cnn_digits' weight layers, in order
        assert r["ops_effective_acs"] == pytest.approx(o["effective_acs"].sum())
        assert r["ops_dense_macs"] == pytest.approx(o["dense_macs"].sum())
        # pixels into the first conv and average-pooled spikes into the last two: MACs; spikes into the second: ACs
        # (a silent layer gives zeros of either kind)
        assert o["effective_macs"].iloc[0] > 0 and o["effective_macs"].iloc[1] == 0
        assert (o["effective_acs"].iloc[[0, 2, 3]] == 0).all()


def test_report_shows_the_analyses(analysed, tmp_path):
    from reports import render_report

    _, out = analysed
    rep = render_report(out, tmp_path / "report")
    md = rep["summary"].read_text()
    for title in ("## Gradient fidelity", "## Where the memory goes", "## Behaviour over time steps"):
        assert title in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| rate_m") and "init" in ln)
    assert "1.000" in line
    assert "no training energy measured: no RAPL domain" in md or "energy per training step" in md
    for name in ("fig_fidelity_layers", "fig_fidelity_epochs", "fig_saved_parts", "fig_firing_layers", "fig_anytime",
                 "fig_ops"):
        assert (tmp_path / "report" / f"{name}.png").is_file() and (tmp_path / "report" / f"{name}.pdf").is_file()
    tex = (tmp_path / "report" / "table_fidelity.tex").read_text()
    assert "\\toprule" in tex and "rate\\_m" in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_analysis_tables_compile_with_pdflatex(analysed, tmp_path):
    from reports import render_report

    _, out = analysed
    render_report(out, tmp_path / "report")
    doc = tmp_path / "doc.tex"
    rep = (tmp_path / "report").as_posix()
    doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[utf8]{inputenc}\\begin{document}\n"
                   + "".join(f"\\input{{{rep}/{t}}}\n\n" for t in ("table_fidelity.tex", "table_shuffle.tex",
                                                                   "table_cost.tex", "table_accuracy.tex"))
                   + "\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]


def _browser():
    import os

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("SNNBENCH_REQUIRE_BROWSER"):
            pytest.fail("SNNBENCH_REQUIRE_BROWSER is set but chromium and chromedriver are not on PATH "
                        "(Debian: apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_index_html_renders_in_a_browser(analysed, tmp_path):
    """index.html opened in headless Chromium: every figure loads (decoded, with a size), every section is there,
    the page logs no console error."""
    from reports import render_report

    _, out = analysed
    rep = render_report(out, tmp_path / "report")
    n_figs = rep["index"].read_text().count("<figure>")
    browser = _browser()
    try:
        browser.get(rep["index"].resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        headings = browser.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        log = browser.get_log("browser")
    finally:
        browser.quit()
    assert len(images) == n_figs >= 9
    bad = [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)]
    assert not bad, f"figures that did not load: {bad}"
    assert {"Gradient fidelity", "Where the memory goes", "Behaviour over time steps"} <= set(headings)
    errors = [e for e in log if e.get("level") == "SEVERE"]
    assert not errors, json.dumps(errors, indent=1)


# ---------------------------------------------------------------- operation counts


def test_operation_counts_of_a_conv_lif_net_equal_hand_counts(digits_batch):
    """A conv (real-valued input: MACs), a LIF layer, a linear readout (spike input: ACs), T=4, evaluated on 64
    digits. By hand, per sample over the T steps: dense = T x outputs x fan-in; the conv's effective MACs = T x C x
    the non-zero pixels under each 3x3 window (zero padding), counted by a loop over the image; the linear's ACs
    = its 10 outputs x the spikes it received, recorded by a hook of the test's own."""
    import numpy as np

    from bench.runner import evaluate

    C, T = 3, 4
    x, y = digits_batch
    torch.manual_seed(0)
    model = _conv_lif_net(C)
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # so that the layer fires
    method = METHODS["bptt_m"](MethodConfig(T=T))
    spikes = []
    h = model[1].register_forward_hook(lambda m, i, o: spikes.append(o.detach().clone()))
    _, _, details = evaluate(method, model, _loader(x, y, 16), torch.device("cpu"), analyses=True)
    h.remove()
    ops = {r["op"]: r for r in details["ops"]}
    n = len(y)
    img = np.pad((x[:, 0].numpy() != 0).astype(int), ((0, 0), (1, 1), (1, 1)))
    windows = sum(img[:, i:i + 3, j:j + 3].sum() for i in range(8) for j in range(8))
    conv = ops["conv"]
    assert conv["dense_macs"] == T * C * 64 * 9
    assert conv["effective_macs"] == pytest.approx(T * C * windows / n) and conv["effective_acs"] == 0.0
    assert conv["input_sparsity"] == pytest.approx(float((x == 0).float().mean()))
    s = torch.cat(spikes)
    lin = ops["linear"]
    assert 0 < float(s.mean()) < 1
    assert lin["dense_macs"] == T * C * 64 * 10
    assert lin["effective_acs"] == pytest.approx(10 * float(s.sum()) / n) and lin["effective_macs"] == 0.0
    assert lin["input_sparsity"] == pytest.approx(1 - float(s.mean()))


def test_operation_counts_of_a_small_mlp(digits_batch):
    """mlp (Linear 64-16, BN, LIF, Linear 16-10): every linear layer's dense MACs are T x in x out per sample; the
    first, fed pixels, counts MACs = out x the non-zero pixels, the readout, fed spikes, ACs = out x the spikes,
    per sample, each input recorded by a hook of the test's own."""
    from bench.runner import evaluate

    x, y = digits_batch
    T = 2
    method = METHODS["bptt_m"](MethodConfig(T=T))
    torch.manual_seed(0)
    model = method.build("mlp", 10, 1, input_shape=(1, 8, 8), widths=[16])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        linears[0].weight.mul_(8.0)  # so that the hidden layer fires at initialisation
    seen = {i: [] for i in range(len(linears))}
    hooks = [m.register_forward_hook(lambda mod, a, o, i=i: seen[i].append(a[0].detach().clone()))
             for i, m in enumerate(linears)]
    _, _, details = evaluate(method, model, _loader(x, y, 32), torch.device("cpu"), analyses=True)
    for hk in hooks:
        hk.remove()
    rows = details["ops"]
    assert [r["op"] for r in rows] == ["linear"] * len(linears)
    for r, m in zip(rows, linears):
        inp = torch.cat(seen[r["layer"]])
        assert r["dense_macs"] == T * m.in_features * m.out_features
        eff = m.out_features * float((inp != 0).sum()) / len(y)
        binary = bool(((inp == 0) | (inp == 1)).all())
        assert (r["effective_acs"] if binary else r["effective_macs"]) == pytest.approx(eff)
    assert rows[0]["effective_macs"] > 0 and rows[-1]["effective_acs"] > 0  # pixels in, spikes further on
