"""Partial FC sampling statistics and the head's sparse / dense SGD."""
import pytest
import torch

from parallel.bank import DTYPES, CenterBank, initial_rows
from parallel.groups import ParallelState
from parallel.heads import HeadConfig, build_head
from parallel.heads.config import MarginConfig, OptimizerConfig
from parallel.heads.sampling import sample_rows
from parallel.sharding import ClassShard


@pytest.mark.parametrize("path", ["kernel", "topk"])
@pytest.mark.parametrize("forced", [None, [50, 61, 3]])
def test_sampling_keeps_positives_and_draws_negatives_uniformly(monkeypatch, path, forced):
    import parallel.heads.sampling as sampling
    if path == "topk":
        monkeypatch.setattr(sampling, "select_rows_", lambda priority, k: None)
    else:
        assert sampling.select_rows_(torch.rand(10), 4) is not None, "the CPU selection kernel is in use"
    shard = ClassShard(100, 1, 0)
    labels = torch.tensor([3, 3, 17, 42, 99])
    always = {3, 17, 42, 99} | set(forced or [])
    forced = None if forced is None else torch.tensor(forced)
    gen = torch.Generator().manual_seed(0)
    draws, num_sample = 4000, 20
    counts = torch.zeros(100)
    for _ in range(draws):
        active = sample_rows(labels, shard, num_sample, gen, forced=forced)
        rows = active.rows
        assert rows.numel() == num_sample
        assert torch.equal(rows, torch.unique(rows)), "active rows are sorted and distinct"
        assert always <= set(rows.tolist())
        assert torch.equal(rows[active.target_col], labels), "targets map to their columns"
        counts[rows] += 1
    negatives = [c for c in range(100) if c not in always]
    observed = counts[negatives]
    expected = draws * (num_sample - len(always)) / len(negatives)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(negatives) - 1  # 95 or 93: mean dof, sd ~13.7; dof + 65 is beyond the 0.9999 quantile
    assert chi2 < dof + 65, f"negatives not uniform: chi2={chi2:.1f}"
    assert chi2 > dof - 55, f"negatives suspiciously regular: chi2={chi2:.1f}"


def test_sampling_with_more_positives_than_budget_keeps_only_positives():
    shard = ClassShard(50, 1, 0)
    labels = torch.arange(0, 40, 2)
    active = sample_rows(labels, shard, 5, torch.Generator().manual_seed(1))
    assert torch.equal(active.rows, labels)


def test_sampling_rate_zero_means_positives_only():
    head = build_head(HeadConfig(type="partial", sample_rate=0.0), ParallelState.single("cpu"), 30, 4)
    labels = torch.tensor([5, 9, 5])
    out = head(torch.randn(3, 4), labels)
    assert torch.equal(head.last_active.rows, torch.tensor([5, 9]))
    assert out.stats["active_classes"].item() == 2


def _negatives_per_rank(state, seed):
    head = build_head(HeadConfig(type="partial", sample_rate=0.2, seed=seed), state, 4001, 8)
    labels = torch.tensor([0, 1]) + 2000 * state.rank
    draws = []
    for _ in range(3):
        head(torch.randn(2, 8), labels)
        draws.append(head.last_active.rows.clone())
        head.skip_step()
    return draws


def test_ranks_draw_different_negatives_reproducibly(spawn_ranks):
    first = spawn_ranks(_negatives_per_rank, 2, args=(5,))
    again = spawn_ranks(_negatives_per_rank, 2, args=(5,))
    other = spawn_ranks(_negatives_per_rank, 2, args=(6,))
    for r in range(2):
        for a, b in zip(first[r], again[r]):
            assert torch.equal(a, b), "same seed, same draws"
    assert not torch.equal(first[0][0], first[1][0]), "ranks must not draw the same local negatives"
    assert not torch.equal(first[0][0], first[0][1]), "negatives are redrawn every step"
    assert not torch.equal(first[0][0], other[0][0]), "the seed changes the draws"


def test_initial_rows_differ_per_shard_and_do_not_depend_on_world_size():
    whole = initial_rows(0, 200_000, 4, 0.01, seed=3)
    for world in (1, 2, 3):
        parts = [initial_rows(*ClassShard(200_000, world, r).span, 4, 0.01, seed=3) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole[:10], whole[100_000:100_010])


@pytest.mark.parametrize("start,count,dim", [(0, 140_000, 4), (70_000, 70_001, 512), (131_000, 3000, 5)])
def test_initial_rows_drawn_in_pieces_equal_one_draw_of_each_block(start, count, dim):
    """The rows are drawn a few MB at a time, with the numbers of one draw per seeded block (so a
    checkpoint-free restart, or another world size, starts from the same rows)."""
    from parallel.bank import INIT_BLOCK
    got = initial_rows(start, count, dim, 0.02, seed=11, dtype=torch.bfloat16)
    blocks = range(start // INIT_BLOCK, (start + count - 1) // INIT_BLOCK + 1)
    drawn = torch.cat([torch.randn(INIT_BLOCK, dim, generator=torch.Generator().manual_seed(11 * 1_000_003 + b))
                       for b in blocks]) * 0.02
    first = blocks[0] * INIT_BLOCK
    assert torch.equal(got, drawn[start - first:start - first + count].to(torch.bfloat16))


def _bank_with_state(seed=0, rows=12, dim=5):
    bank = CenterBank(ClassShard(rows, 1, 0), dim, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    bank.weight.copy_(torch.randn(rows, dim, generator=g, dtype=torch.float64))
    bank.momentum.copy_(torch.randn(rows, dim, generator=g, dtype=torch.float64))
    return bank


def _torch_sgd_reference(weight, momentum_buf, grad, lr, mu, wd):
    p = torch.nn.Parameter(weight.clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=mu, weight_decay=wd)
    opt.state[p]["momentum_buffer"] = momentum_buf.clone()
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]


def test_sparse_sgd_leaves_unsampled_rows_bit_for_bit_and_matches_torch_sgd_on_sampled_rows():
    bank = _bank_with_state()
    w0, m0 = bank.weight.clone(), bank.momentum.clone()
    index = torch.tensor([1, 4, 7, 11])
    grad = torch.randn(4, 5, dtype=torch.float64)
    bank.sgd_step(index, grad, lr=0.1, momentum=0.9, weight_decay=5e-4, update="sparse")
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(bank.weight[untouched], w0[untouched])
    assert torch.equal(bank.momentum[untouched], m0[untouched])
    w_ref, m_ref = _torch_sgd_reference(w0[index], m0[index], grad, 0.1, 0.9, 5e-4)
    torch.testing.assert_close(bank.weight[index], w_ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(bank.momentum[index], m_ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("storage", ["float64", "bfloat16"])
def test_sparse_sgd_with_the_callers_rows_equals_gathering_them_and_leaves_them_untouched(storage):
    dtype = DTYPES[storage]
    banks = [CenterBank(ClassShard(12, 1, 0), 5, seed=3, dtype=dtype) for _ in range(2)]
    index = torch.tensor([0, 5, 6, 11])
    grad = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(
        banks[0].math_dtype)
    values = banks[1].rows(index, raw=True)  # what a head's forward took as its leaf
    before = values.clone()
    banks[0].sgd_step(index, grad, lr=0.1, momentum=0.9, weight_decay=5e-4)
    banks[1].sgd_step(index, grad, lr=0.1, momentum=0.9, weight_decay=5e-4, values=values)
    assert torch.equal(banks[0].weight, banks[1].weight) and torch.equal(banks[0].momentum, banks[1].momentum)
    assert torch.equal(values, before)
    with pytest.raises(ValueError, match=r"values \(3, 5\) do not match the gradient \(4, 5\)"):
        banks[1].sgd_step(index, grad, lr=0.1, momentum=0.9, weight_decay=5e-4, values=values[:3])


def test_dense_sgd_matches_torch_sgd_on_a_full_gradient():
    bank = _bank_with_state(seed=1)
    w0, m0 = bank.weight.clone(), bank.momentum.clone()
    index = torch.tensor([0, 5, 6])
    grad = torch.randn(3, 5, dtype=torch.float64)
    bank.sgd_step(index, grad, lr=0.05, momentum=0.9, weight_decay=5e-4, update="dense")
    dense_grad = torch.zeros(12, 5, dtype=torch.float64)
    dense_grad[index] = grad
    w_ref, m_ref = _torch_sgd_reference(w0, m0, dense_grad, 0.05, 0.9, 5e-4)
    torch.testing.assert_close(bank.weight, w_ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(bank.momentum, m_ref, rtol=0, atol=1e-15)


def test_sparse_step_allocates_no_dense_gradient():
    """The step's temporaries scale with the active rows, not the shard: measured with the allocator
    profile of a large bank and a handful of active rows."""
    from torch.profiler import ProfilerActivity, profile
    cfg = HeadConfig(type="partial", sample_rate=0.0, optimizer=OptimizerConfig(update="sparse"))
    head = build_head(cfg, ParallelState.single("cpu"), 200_000, 64)
    x = torch.randn(8, 64, requires_grad=True)
    labels = torch.randint(0, 200_000, (8,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        head(x, labels).loss.backward()
        head.step(lr=0.1)
    shard_bytes = 200_000 * 64 * 4
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    # one value per class (the sampling priorities, shard/64 here) is fine; a (C_r, D) gradient is not
    assert largest < shard_bytes / 16, f"a {largest}-byte allocation in a sparse step (shard {shard_bytes})"


@pytest.mark.parametrize("rows", ["all", "most"])
def test_bfloat16_bank_step_makes_no_float32_copy_of_the_gradient(rows):
    """A bfloat16 bank's gradient is bfloat16 (the lean mode): the step converts it a block at a time,
    never as a whole (at rho = 1 that copy is the size of the shard in float32); the result is that of
    converting it whole."""
    from torch.profiler import ProfilerActivity, profile
    count, dim = 60_000, 64
    banks = [CenterBank(ClassShard(count, 1, 0), dim, dtype=torch.bfloat16, momentum_dtype=torch.bfloat16,
                        rounding="nearest") for _ in range(2)]
    index = None if rows == "all" else torch.arange(0, count, 2)
    n = count if index is None else index.numel()
    grad = torch.randn(n, dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        banks[0].sgd_step(index, grad, lr=0.1, momentum=0.9, weight_decay=5e-4)
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert largest < n * dim * 4 / 4, f"a {largest}-byte allocation (float32 gradient: {n * dim * 4})"
    banks[1].sgd_step(index, grad.float(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert torch.equal(banks[0].weight, banks[1].weight) and torch.equal(banks[0].momentum, banks[1].momentum)


def test_accumulating_micro_batches_equals_one_step_on_the_whole_batch():
    """k micro-batches, each backpropagated, then step(grad_scale=1/k) == one step on the k-times batch."""
    torch.manual_seed(0)
    cfg = HeadConfig(type="full", compute_dtype="float64", storage_dtype="float64", seed=2)
    micro, b = 3, 6
    x = torch.randn(micro * b, 8, dtype=torch.float64)
    y = torch.randint(0, 37, (micro * b,))
    accumulated = build_head(cfg, ParallelState.single("cpu"), 37, 8)
    for k in range(micro):
        accumulated(x[k * b:(k + 1) * b], y[k * b:(k + 1) * b]).loss.backward()
    accumulated.step(lr=0.1, grad_scale=1.0 / micro)
    whole = build_head(cfg, ParallelState.single("cpu"), 37, 8)
    whole(x, y).loss.backward()
    whole.step(lr=0.1)
    torch.testing.assert_close(accumulated.bank.weight, whole.bank.weight, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(accumulated.bank.momentum, whole.bank.momentum, rtol=1e-12, atol=1e-15)
    assert accumulated._pending == []


def _linear_backbone_step(state, inputs, labels, weight, centers, batch):
    """Each rank: x = inputs_local @ A; head loss; backward; then the data-parallel average of A.grad."""
    import torch.distributed as dist
    cfg = HeadConfig(type="full", compute_dtype="float64", storage_dtype="float64",
                     margin=MarginConfig(scale=16.0))
    head = build_head(cfg, state, centers.shape[0], centers.shape[1])
    start, count = head.shard.span
    head.bank.weight.copy_(centers[start:start + count])
    A = weight.clone().requires_grad_(True)
    lo = state.rank * batch
    x = inputs[lo:lo + batch] @ A
    head(x, labels[lo:lo + batch]).loss.backward()
    grad = A.grad.clone()
    if state.world_size > 1:
        dist.all_reduce(grad, group=state.data_group)
        grad /= state.data_world          # what DDP / DeepSpeed do to the backbone's gradients
    return grad


@pytest.mark.parametrize("world", [2, 3])
def test_backbone_gradient_after_data_parallel_averaging_equals_single_process_global_batch(spawn_ranks, world):
    from reference_softmax import dense_margin_softmax
    g = torch.Generator().manual_seed(world)
    batch, d_in, dim, num_classes = 4, 6, 5, 11
    inputs = torch.randn(world * batch, d_in, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (world * batch,), generator=g)
    weight = torch.randn(d_in, dim, generator=g, dtype=torch.float64)
    centers = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    grads = spawn_ranks(_linear_backbone_step, world, args=(inputs, labels, weight, centers, batch))
    A = weight.clone().requires_grad_(True)
    X = inputs @ A
    _, dX, _ = dense_margin_softmax(X, centers, labels, m1=1.0, m2=0.5, m3=0.0, s=16.0)
    reference = torch.autograd.grad(X, A, dX)[0]
    for grad in grads:
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-13)
