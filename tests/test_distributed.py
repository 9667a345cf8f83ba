"""Data parallelism (methods/distributed.py): two gloo ranks, each on half of a global batch, take the same step as
one process on the whole batch: the same gradients (to float32 reduction tolerance), the same BN running
statistics, the same parameters after the optimizer's step; for every method that supports it."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.multiprocessing as mp

from methods import METHODS, MethodConfig
from methods.layers import BatchNorm

# method -> arch; each with BN (OTTT also with its scaled WS, no BN), HM2-BP with its hand-made gradient
CASES = {"bptt_m": "cnn_digits", "bptt_s": "cnn_digits", "rate_m": "cnn_digits", "rate_s": "cnn_digits",
         "sltt": "cnn_digits", "sltt_k": "cnn_digits", "ottt_a": "cnn_digits", "ottt_o": "cnn_digits",
         "ottt_o/ws": "cnn_digits", "os": "cnn_digits", "os/2": "cnn_digits", "rate_m/mlp": "mlp",
         "hm2bp": "hm2_mlp"}
BATCH, T, WORLD = 16, 4, 2


def build(case: str, seed: int = 0):
    name = case.split("/")[0]
    options = {"norm": "ws"} if case.endswith("/ws") else {}
    method = METHODS[name](MethodConfig(T=T, options=options))
    torch.manual_seed(seed)
    model = method.build(CASES[case], num_classes=10, in_channels=1, input_shape=(1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return method, model, opt


def batch(case: str):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, 1, 8, 8, generator=g)
    if CASES[case] == "hm2_mlp":  # spike trains [T, B, ...]: the Poisson encoding of static input draws per rank
        x = (torch.rand(T, BATCH, 1, 8, 8, generator=g) < 0.3).float()
    return x, torch.randint(0, 10, (BATCH,), generator=g)


def share(x, y, rank):
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return (x[:, part] if x.dim() == 5 else x[part]), y[part]


def one_step(case: str, model, method, opt, x, y, seed: int = 2):
    torch.manual_seed(seed)  # sltt_k draws its K steps: the same on every rank and in the reference
    model.train()
    for _ in range(2 if case.endswith("/2") else 1):  # os/2: the second step renormalizes with running statistics
        method.train_step(model, x, y, opt)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    return grads, params, stats


def _rank(rank: int, store: str, cases: list[str], out: str) -> None:
    import torch.distributed as dist

    from methods.distributed import data_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {}
    for case in cases:
        method, model, opt = build(case, seed=100 + rank)  # different inits: data_parallel broadcasts rank 0's
        torch.manual_seed(0)
        ref = build(case)[1]
        model.load_state_dict(ref.state_dict()) if rank == 0 else None
        data_parallel(model, opt)
        results[case] = one_step(case, model, method, opt, *share(*batch(case), rank))
        results[case] += ([m.synced for m in model.modules() if isinstance(m, BatchNorm)],)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_rank, args=(str(tmp / "store"), list(CASES), str(tmp / "out")), nprocs=WORLD,
                       start_method="spawn")
    return [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_take_the_step_of_one_process_on_the_whole_batch(case, ranks_results):
    method, model, opt = build(case)
    x, y = batch(case)
    grads, params, stats = one_step(case, model, method, opt, x, y)
    for r, res in enumerate(ranks_results):
        g, p, s, synced = res[case]
        assert set(g) == set(grads) and (grads or case.startswith("ottt_o")), case  # ottt_o: none after its last step
        for n in grads:  # the averaged gradient that went into the step
            torch.testing.assert_close(g[n], grads[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{case} rank {r} grad {n}: {m}")
        for n in params:
            torch.testing.assert_close(p[n], params[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{case} rank {r} {n}: {m}")
        for n in stats:  # BN running statistics: the global batch's
            torch.testing.assert_close(s[n], stats[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{case} rank {r} {n}: {m}")
        assert all(synced)


def test_the_check_can_fail_a_rank_without_synchronised_bn_differs():
    """The comparison above has teeth: half a batch with local BN statistics gives other gradients than the
    whole batch (and a rank's own loss mean is not the global one without the average)."""
    method, model, opt = build("bptt_m")
    x, y = batch("bptt_m")
    whole = one_step("bptt_m", model, method, opt, x, y)[0]
    method, model, opt = build("bptt_m")
    half = one_step("bptt_m", model, method, opt, *share(x, y, 0))[0]
    assert any(not torch.allclose(whole[n], half[n], rtol=1e-3, atol=1e-4) for n in whole)


def test_every_method_says_it_is_data_parallel():
    assert set(METHODS) == {c.split("/")[0] for c in CASES}
    assert all(METHODS[c.split("/")[0]].data_parallel is None for c in CASES)



# ---------------------------------------------------------------- a 2-rank cell through the CLI


def test_a_two_rank_cell_runs_through_the_cli_and_stores_one_row(tmp_path):
    """run --set devices=2: torch.distributed.run starts two gloo ranks, each on half of every batch of 64; one row
    is stored, with devices=2, per-rank memory (largest, and the sum), the slowest rank's step times, and the
    accuracy over the whole test set (360 digits: a multiple of 1/360)."""
    from reports.results import load_results

    from .helpers import cli, tiny_grid

    (tmp_path / "g.toml").write_text(tiny_grid(methods=("rate_m",), T=(2,), train_subset=256)
                                     .replace("batch_size = 128", "batch_size = 64"))
    r = cli("run", str(tmp_path / "g.toml"), "--set", "devices=2", "--out", str(tmp_path / "res"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    df = load_results(tmp_path / "res")
    assert len(df) == 1
    row = df.iloc[0]
    assert row["status"] == "ok" and row["devices"] == 2, row["error"]
    assert row["measured_steps"] == 3  # 256 samples: 4 global batches of 64 (32 per rank); the first measures memory
    assert row["peak_rss_mib_sum"] > row["peak_rss_mib"] > 0
    acc = row["acc_top1"] / 100 * 360
    assert abs(acc - round(acc)) < 1e-6 and 0 < row["acc_top1"] <= 100


def test_the_ranks_results_become_one_row():
    """combine: each step's time is the slowest rank's; memory the largest rank's and the sum; a failed rank fails
    the cell with its error, a rank without a result is named."""
    from bench.distributed import combine
    from bench.runner import Result

    def res(step_ms, rss, status="ok", error=None):
        return Result({"status": status, "error": error, "batch_size": 64, "peak_rss_mib": rss, "acc_top1": 50.0},
                      [{"epoch": 1}], [], {"step_ms": step_ms})

    c = combine([res([10.0, 30.0, 20.0], 100.0), res([12.0, 25.0, 21.0], 120.0)], 2)
    assert c.series["step_ms"] == [12.0, 30.0, 21.0] and c.row["step_time_ms_median"] == 21.0
    assert c.row["peak_rss_mib"] == 120.0 and c.row["peak_rss_mib_sum"] == 220.0 and c.row["devices"] == 2
    assert abs(c.row["throughput_samples_per_s"] - 64 * 3 / 0.063) < 1e-6 and c.epochs == [{"epoch": 1}]
    c = combine([res([1.0], 1.0, "error", "RuntimeError: peer closed"), res([1.0], 1.0, "oom", "CUDA out of memory"),
                 None], 3)
    assert c.row["status"] == "oom" and "rank 1: CUDA out of memory" in c.row["error"]
    assert "rank(s) 2: stopped" in c.row["error"] and c.epochs == []
    with pytest.raises(RuntimeError, match="rank\\(s\\) 1 of 2"):
        combine([res([1.0], 1.0), None], 2)


def test_multi_device_cells_that_cannot_run_exit_2(tmp_path):
    from .helpers import cli, tiny_grid

    (tmp_path / "g.toml").write_text(tiny_grid(methods=("bptt_m",), train_subset=100))
    r = cli("run", str(tmp_path / "g.toml"), "--set", "devices=3", "--out", str(tmp_path / "res"))
    assert r.returncode == 2 and "must be a multiple of 3" in r.stderr
    r = cli("run", str(tmp_path / "g.toml"), "--set", "devices=0", "--out", str(tmp_path / "res"))
    assert r.returncode == 2 and "devices must be a whole number >= 1" in r.stderr


def test_a_two_rank_cell_stopped_mid_epoch_resumes_exactly(tmp_path):
    """SIGUSR1 to a 2-rank cell's worker: it passes the request to both ranks, which agree on the step, rank 0
    checkpoints, the cell is stored as preempted; run again, every rank resumes from that checkpoint and the
    epochs' losses and accuracies are exactly those of the same cell run without a stop."""
    from bench.checkpoint import CellCheckpoint
    from bench.grid import Cell

    from .test_resume import a_moment_after, assert_same_training, run_worker, stored

    # the whole digits: 45 global batches per epoch; the stop goes 30 ms after epoch 1's checkpoint is on disk
    # (watched every 5 ms), so it lands inside epoch 2 however fast the steps are
    cell = Cell(method="bptt_m", arch="cnn_digits", dataset="digits", T=2, epochs=2, batch_size=32,
                eval_batch_size=360, devices=2)
    ref = tmp_path / "ref"
    assert run_worker(cell, ref)["status"] == "ok"
    st = run_worker(cell, tmp_path / "cut", sig=signal.SIGUSR1,
                    signal_when=a_moment_after(CellCheckpoint(tmp_path / "cut", cell.key).exists))
    assert st["rc"] == 0 and st["status"] == "preempted", st
    row, _ = stored(tmp_path / "cut", cell.key)
    assert "stopped by SIGUSR1 at epoch 2, batch" in row["error"] and row["devices"] == 2
    state = CellCheckpoint(tmp_path / "cut", cell.key).load()
    assert state["epoch"] == 2 and 0 < state["batch"] < 45
    assert run_worker(cell, tmp_path / "cut")["status"] == "ok"
    again = stored(tmp_path / "cut", cell.key)
    assert_same_training(again, stored(ref, cell.key))
    assert again[0]["restarts"] == 1 and again[0]["devices"] == 2


@pytest.mark.parametrize("n,batch,world", [(100, 16, 2), (100, 15, 3), (97, 32, 4), (5, 4, 2)])
def test_ranks_split_every_global_batch_and_the_test_set(n, batch, world):
    """Each rank's loader yields its part of every global batch of the epoch's order (the batch cut to a multiple
    of the ranks, so all parts are as large); together the ranks see each global batch once, in the same number of
    batches; the test set is split so that every sample is evaluated exactly once. For in-memory tensors and for
    the DataLoader path of on-disk datasets (EpochSampler)."""
    from bench.data import EpochSampler, TensorLoader, epoch_order, test_share

    x, y = torch.arange(n).float(), torch.arange(n)
    order = epoch_order(n, 7, 1)
    want = [order[i:i + batch][: len(order[i:i + batch]) - len(order[i:i + batch]) % world]
            for i in range(0, n, batch)]
    want = [w for w in want if len(w)]
    parts = [list(TensorLoader(x, y, batch, True, 7, shard=(r, world)).batches(1)) for r in range(world)]
    assert all(len(p) == len(want) == len(TensorLoader(x, y, batch, True, 7, shard=(r, world)))
               for r, p in enumerate(parts))
    for b, w in enumerate(want):
        got = torch.cat([parts[r][b][1] for r in range(world)])
        assert sorted(got.tolist()) == sorted(w.tolist()) and all(len(parts[r][b][1]) == len(w) // world
                                                                  for r in range(world))
    samplers = [EpochSampler(n, 7, batch, (r, world)) for r in range(world)]
    for s in samplers:
        s.epoch = 1
    seen = [i for s in samplers for i, _ in s]
    assert sorted(seen) == sorted(torch.cat(want).tolist()) and len(samplers[0]) == len(list(samplers[0]))
    for s in samplers:  # resumed after the first batch: the length still counts what it yields
        s.start = batch
        assert len(s) == len(list(s))
    tests = [list(test_share(n, (r, world))) for r in range(world)]
    assert sorted(sum(tests, [])) == list(range(n))
