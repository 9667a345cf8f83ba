"""Data parallelism (methods/distributed.py): two gloo ranks, each on half of a global batch, take the same step as
one process on the whole batch: the same gradients (to float32 reduction tolerance), the same BN running
statistics, the same parameters after the optimizer's step; for every method that supports it."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from methods import METHODS, MethodConfig
from methods.layers import BatchNorm

# method -> arch; each with BN (OTTT also with its scaled WS, no BN), HM2-BP with its hand-made gradient
CASES = {"bptt_m": "cnn_digits", "bptt_s": "cnn_digits", "rate_m": "cnn_digits", "rate_s": "cnn_digits",
         "sltt": "cnn_digits", "sltt_k": "cnn_digits", "ottt_a": "cnn_digits", "ottt_o": "cnn_digits",
         "ottt_o/ws": "cnn_digits", "rate_m/mlp": "mlp", "hm2bp": "hm2_mlp"}
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


def test_os_says_it_is_not_data_parallel():
    assert METHODS["os"].data_parallel is not None
    assert all(METHODS[c.split("/")[0]].data_parallel is None for c in CASES)

