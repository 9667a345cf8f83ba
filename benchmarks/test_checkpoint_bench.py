"""The checkpoint benchmark runs, and what it reports is the checkpoint the runner writes: with SGD momentum it
holds every parameter twice (weights and momentum buffers), 4 bytes each, plus BN statistics and small state."""

import checkpoint_cost


def test_checkpoint_cost_small():
    r = checkpoint_cost.measure("cnn_digits", T=2, batch_size=16, device="cpu")
    two_copies_mib = 2 * r["params_m"] * 1e6 * 4 / 2**20
    assert two_copies_mib < r["checkpoint_mib"] < two_copies_mib + 1.0
    assert 0 < r["write_s"] < r["epoch_s"] and 0 < r["fraction"] < 1
