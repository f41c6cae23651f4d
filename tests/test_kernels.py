"""The fused CPU kernels (parallel/kernels.py) against plain float64 PyTorch, odd sizes, edge values."""

import os

import pytest
import torch

from parallel import kernels

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="the kernels are built for AVX2")


switched_off = pytest.mark.skipif(os.environ.get("SHARDFACE_CPU_KERNELS") == "0",
                                  reason="kernels switched off (the test is of the kernel itself)")


@switched_off
def test_kernels_are_built_where_the_cpu_has_avx2():
    assert kernels._module() is not None  # otherwise every step silently takes the slower path


@switched_off
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_values", [False, True])
def test_sgd_rows_matches_torch_sgd_and_leaves_other_rows_bit_for_bit(dtype, with_values):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(41, 13, generator=g, dtype=dtype)
    momentum = torch.randn(41, 13, generator=g, dtype=dtype) * 0.1
    index = torch.tensor([0, 3, 4, 17, 40])
    grad = torch.randn(5, 13, generator=g, dtype=dtype)
    w0, m0 = weight.clone(), momentum.clone()
    values = weight[index].clone() if with_values else None
    assert kernels.sgd_rows_(weight, momentum, index, grad, values, 0.1, 0.9, 5e-4)
    p = w0[index].double().clone().requires_grad_(False)
    opt = torch.optim.SGD([torch.nn.Parameter(p)], lr=0.1, momentum=0.9, weight_decay=5e-4)
    param = opt.param_groups[0]["params"][0]
    param.grad = grad.double()
    opt.state[param]["momentum_buffer"] = m0[index].double().clone()
    opt.step()
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(weight[index].double(), param.detach(), **tol)
    torch.testing.assert_close(momentum[index].double(), opt.state[param]["momentum_buffer"], **tol)
    others = torch.ones(41, dtype=torch.bool)
    others[index] = False
    assert torch.equal(weight[others], w0[others]) and torch.equal(momentum[others], m0[others])
    if values is not None:
        assert torch.equal(values, w0[index])


@switched_off
def test_sgd_rows_refuses_a_row_out_of_range():
    w, m = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="row 4 out of range"):
        kernels.sgd_rows_(w, m, torch.tensor([1, 4]), torch.zeros(2, 3), None, 0.1, 0.9, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_out_rows_matches_the_radial_term(dtype):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(37, 19, generator=g, dtype=dtype)
    w = torch.randn(37, 19, generator=g, dtype=dtype)
    inv = torch.rand(37, generator=g, dtype=dtype) + 0.5
    ud, wd, invd = u.double(), w.double(), inv.double()
    want = ud - wd * ((wd * ud).sum(1) * invd * invd)[:, None]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    in_place = u.clone()
    got = kernels.project_out_rows_(in_place, w, inv)
    assert got.data_ptr() == in_place.data_ptr()
    torch.testing.assert_close(got.double(), want, **tol)
    # written over the rows themselves (the head's leaf becoming its gradient); u is left as it was
    rows, u_before = w.clone(), u.clone()
    over_rows = kernels.project_out_rows_(u, rows, inv, out=rows)
    assert over_rows.data_ptr() == rows.data_ptr() and torch.equal(u, u_before)
    torch.testing.assert_close(over_rows.double(), want, **tol)


@switched_off
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 9, 16, 37])
def test_gather_rows_copies_the_rows_and_measures_them(dtype, dim):
    g = torch.Generator().manual_seed(4 + dim)
    source = torch.randn(23, dim, generator=g, dtype=dtype)
    index = torch.tensor([22, 0, 5, 5, 17, 3, 9], dtype=torch.long)
    out = torch.full((7, dim), float("nan"), dtype=dtype)
    norms = kernels.gather_rows_(source, index, out)
    assert torch.equal(out, source[index])
    tol = dict(rtol=1e-6, atol=0) if dtype == torch.float32 else dict(rtol=1e-14, atol=0)
    torch.testing.assert_close(norms.double(), source[index].double().norm(dim=1), **tol)
    with pytest.raises(RuntimeError, match="row 23 out of range"):
        kernels.gather_rows_(source, torch.tensor([1, 23]), torch.empty(2, dim, dtype=dtype))
    assert kernels.gather_rows_(source, index, torch.empty(7, dim, dtype=torch.bfloat16)) is None
    assert kernels.gather_rows_(source, index.int(), torch.empty(7, dim, dtype=dtype)) is None


@switched_off
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_columns_scales_and_reports_the_range(dtype):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 29, generator=g, dtype=dtype)
    scale = torch.rand(29, generator=g, dtype=dtype) * 3
    want = logits.double() * scale.double()[None, :]
    lowest, highest = kernels.scale_columns_(logits, scale)
    torch.testing.assert_close(logits.double(), want, rtol=1e-6, atol=1e-7)
    assert lowest == pytest.approx(float(want.min()), rel=1e-6) and highest == pytest.approx(float(want.max()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 7, 8, 29, 64])
def test_exp_rows_against_float64(dtype, width):
    g = torch.Generator().manual_seed(3 + width)
    logits = torch.randn(6, width, generator=g, dtype=dtype) * 20
    logits[1, 0] = float("-inf")                     # an excluded entry
    logits[2] = float("-inf")                        # a row with nothing left
    prev = torch.tensor([-1e30, 3.0, -1e30, 50.0, -1e30, 0.0], dtype=dtype)
    ref = logits.double()
    shift = torch.maximum(prev.double(), ref.amax(dim=1))
    want = torch.exp(ref - shift[:, None])
    exps, sums, got_shift = kernels.exp_rows_(logits.clone(), prev, given_shift=False)
    tol = dict(rtol=2e-6, atol=1e-30) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-300)
    torch.testing.assert_close(got_shift.double(), shift, rtol=0, atol=0)
    torch.testing.assert_close(exps.double(), want, **tol)
    torch.testing.assert_close(sums.double(), want.sum(1), **tol)
    assert torch.equal(prev, torch.tensor([-1e30, 3.0, -1e30, 50.0, -1e30, 0.0], dtype=dtype))  # not modified
    # with the shift given: exactly what the pass above produced (pass 2 recomputes chunks this way)
    again, _, same = kernels.exp_rows_(logits.clone(), got_shift, given_shift=True)
    assert torch.equal(again, exps) and torch.equal(same, got_shift)
    # with a column factor: the exps scaled, the sums still those of the unscaled exps
    col_scale = torch.rand(width, generator=g, dtype=dtype) + 0.25
    scaled, scaled_sums, _ = kernels.exp_rows_(logits.clone(), prev, given_shift=False, col_scale=col_scale)
    torch.testing.assert_close(scaled.double(), want * col_scale.double()[None, :], **tol)
    torch.testing.assert_close(scaled_sums.double(), want.sum(1), **tol)
    scaled_again = kernels.exp_rows_(logits.clone(), got_shift, given_shift=True, col_scale=col_scale)[0]
    assert torch.equal(scaled_again, scaled)


def test_every_row_step_of_the_bank_matches_torch_sgd():
    from parallel.bank import CenterBank
    from parallel.sharding import ClassShard
    bank = CenterBank(ClassShard(30, 1, 0), 7, seed=2, dtype=torch.float64)
    bank.momentum.normal_(generator=torch.Generator().manual_seed(4))
    w0, m0 = bank.weight.clone(), bank.momentum.clone()
    grad = torch.randn(30, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    bank.sgd_step(None, grad, lr=0.2, momentum=0.9, weight_decay=1e-3)
    param = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([param], lr=0.2, momentum=0.9, weight_decay=1e-3)
    param.grad = grad.clone()
    opt.state[param]["momentum_buffer"] = m0.clone()
    opt.step()
    torch.testing.assert_close(bank.weight, param.detach(), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(bank.momentum, opt.state[param]["momentum_buffer"], rtol=1e-14, atol=1e-15)


@switched_off
def test_select_rows_takes_the_marked_rows_and_exactly_k_sorted():
    g = torch.Generator().manual_seed(4)
    priority = torch.rand(1001, generator=g)
    marked = torch.tensor([0, 7, 500, 1000])
    priority[marked] = torch.tensor([3.0, 2.0, 3.0, 2.0])
    for k in (4, 5, 333, 1000, 1001):
        rows = kernels.select_rows_(priority, k)
        assert rows.dtype == torch.int64 and rows.numel() == k
        assert torch.equal(rows, rows.unique())                 # sorted, no repeats
        assert bool(torch.isin(marked, rows).all())
        assert int(rows.min()) >= 0 and int(rows.max()) < 1001
    assert torch.equal(kernels.select_rows_(priority, 1001), torch.arange(1001))
    assert kernels.select_rows_(priority, 3) is None            # more marked than k: the caller ranks them
    assert kernels.select_rows_(priority.double(), 10) is None  # not float32: the PyTorch path
    # the same draws give the same rows
    assert torch.equal(kernels.select_rows_(priority, 333), kernels.select_rows_(priority.clone(), 333))
