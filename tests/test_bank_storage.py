"""Lean storage of the center bank: bfloat16 rows with stochastic rounding, bfloat16 / int8 momentum."""
import torch

from parallel.bank import CenterBank, round_to_bfloat16
from parallel.sharding import ClassShard


def test_stochastic_rounding_to_bfloat16_is_unbiased_and_lands_on_neighbours():
    x = torch.full((200_000,), 1.0 + 2.0 ** -10)          # 1/8 of the way from 1 to the next bf16 (1 + 2^-7)
    gen = torch.Generator().manual_seed(0)
    r = round_to_bfloat16(x, gen).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    up = (r > 1).float().mean().item()
    assert abs(up - 0.125) < 0.005, up
    assert abs(r.double().mean().item() - (1.0 + 2.0 ** -10)) < 2e-5
    neg = round_to_bfloat16(-x, gen).float()
    assert set(neg.unique().tolist()) == {-1.0, -1.0 - 2.0 ** -7}
    assert torch.equal(round_to_bfloat16(x, None).float(), torch.ones_like(x)), "nearest rounds 1+2^-10 down"


def test_bfloat16_rows_accumulate_small_updates_only_with_stochastic_rounding():
    shard = ClassShard(64, 1, 0)
    banks = {mode: CenterBank(shard, 32, dtype=torch.bfloat16, momentum_dtype=torch.float32, rounding=mode, seed=1)
             for mode in ("stochastic", "nearest")}
    for bank in banks.values():
        bank.weight.fill_(1.0)
    index = torch.arange(64)
    grad = torch.full((64, 32), 1e-4)
    for _ in range(500):
        for bank in banks.values():
            bank.sgd_step(index, grad, lr=1.0, momentum=0.0, weight_decay=0.0)
    exact = 1.0 - 500 * 1e-4
    assert torch.all(banks["nearest"].weight.float() == 1.0), "nearest rounding loses every 1e-4 step"
    mean = banks["stochastic"].weight.float().mean().item()
    assert abs(mean - exact) < 2e-3, (mean, exact)


def test_low_precision_sparse_step_leaves_other_rows_untouched_and_tracks_float32():
    shard = ClassShard(40, 1, 0)
    ref = CenterBank(shard, 16, seed=3)
    lean = {dt: CenterBank(shard, 16, seed=3, dtype=torch.bfloat16, momentum_dtype=dt)
            for dt in (torch.bfloat16, torch.int8)}
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 7, 8, 39])
    before = {dt: (b.weight.clone(), b.momentum.clone()) for dt, b in lean.items()}
    for _ in range(5):
        grad = torch.randn(4, 16, generator=g) * 0.01
        ref.sgd_step(index, grad, lr=0.1, momentum=0.9, weight_decay=5e-4)
        for bank in lean.values():
            bank.sgd_step(index, grad, lr=0.1, momentum=0.9, weight_decay=5e-4)
    rest = torch.ones(40, dtype=torch.bool)
    rest[index] = False
    for dt, bank in lean.items():
        w0, m0 = before[dt]
        assert torch.equal(bank.weight[rest], w0[rest]) and torch.equal(bank.momentum[rest], m0[rest])
        w_err = (bank.rows(index) - ref.rows(index)).abs().max().item()
        assert w_err < 0.02 * ref.rows(index).abs().max().item(), (dt, w_err)
        m_err = (bank.momentum_rows(index) - ref.momentum_rows(index)).abs().max().item()
        assert m_err < 0.02 * ref.momentum_rows(index).abs().max().item(), (dt, m_err)


def test_int8_momentum_round_trip_error_is_within_half_a_step_of_the_row_scale():
    shard = ClassShard(8, 1, 0)
    bank = CenterBank(shard, 64, momentum_dtype=torch.int8)
    values = torch.randn(8, 64) * torch.logspace(-4, 1, 8)[:, None]
    bank.momenta.write(None, values, None)
    back = bank.momentum_rows(None)
    step = values.abs().amax(1, keepdim=True) / 127.0
    assert torch.all((back - values).abs() <= step / 2 + 1e-12)


def test_state_bytes_per_class_and_dimension():
    shard = ClassShard(1000, 1, 0)
    assert CenterBank(shard, 64).state_bytes == 1000 * 64 * 8
    assert CenterBank(shard, 64, dtype=torch.bfloat16, momentum_dtype=torch.bfloat16).state_bytes == 1000 * 64 * 4
    assert CenterBank(shard, 64, dtype=torch.bfloat16, momentum_dtype=torch.int8).state_bytes == 1000 * (64 * 3 + 4)
