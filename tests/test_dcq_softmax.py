"""The margin softmax's per-row extra column (`row_centers`), same-label exclusion (`column_labels`)
and row selection (`valid`) against an independent dense float64 reference, for W = 1..4."""
import functools

import pytest
import torch
import torch.nn.functional as F

from parallel.collectives import gather_batch
from parallel.groups import ParallelState
from parallel.margins import Margin
from parallel.sharding import ClassShard
from parallel.softmax import margin_softmax_loss

MARGINS = {
    "cosface": Margin(1.0, 0.0, 0.3, 6.0, "exact"),
    "arcface": Margin(1.0, 0.5, 0.0, 6.0, "exact"),
    "arcface_filtered": Margin(1.0, 0.5, 0.0, 6.0, "exact", 0.2),
}


def problem(world, batch, columns, dim, seed):
    """Rows of three kinds: target in the row's own extra column (on its home rank), target in an
    ordinary column, invalid (no target). Few labels so same-label columns are common."""
    g = torch.Generator().manual_seed(seed)
    bg = world * batch
    X = torch.randn(bg, dim, generator=g, dtype=torch.float64)
    Wc = torch.randn(columns, dim, generator=g, dtype=torch.float64)
    RC = torch.randn(bg, dim, generator=g, dtype=torch.float64)
    col_labels = torch.randint(0, 5, (columns,), generator=g)
    row_labels = torch.randint(0, 5, (bg,), generator=g)
    kind = torch.arange(bg) % 3                       # 0: row column, 1: ordinary column, 2 with odd row: invalid
    target = torch.randint(0, columns, (bg,), generator=g)
    target = torch.where(kind == 1, target, torch.full_like(target, -1))
    use_row = kind == 0
    valid = ~((kind == 2) & (torch.arange(bg) // 3 % 2 == 0))
    # kind-2 valid rows need a target: give them an ordinary column of their own label when one exists
    for i in range(bg):
        if kind[i] == 2 and valid[i]:
            same = (col_labels == row_labels[i]).nonzero().flatten()
            if same.numel():
                target[i] = same[0]
            else:
                use_row[i] = True
    # a target column never carries a different label than its row in DCQ; mix both cases here
    return X, Wc, RC, col_labels, row_labels, target, use_row, valid


def dense_reference(X, Wc, RC, col_labels, row_labels, target, use_row, valid, margin: Margin):
    """Plain autograd over the whole (Bg, A + 1) logit matrix, valid rows only."""
    X = X.clone().requires_grad_(True)
    Wc = Wc.clone().requires_grad_(True)
    RC = RC.clone().requires_grad_(True)
    rows = valid.nonzero().flatten()
    xn = F.normalize(X[rows], dim=1)
    cos = (xn @ F.normalize(Wc, dim=1).t()).clamp(-1, 1)                      # (N, A)
    cos_row = (xn * F.normalize(RC[rows], dim=1)).sum(1).clamp(-1, 1)         # (N,)
    a = Wc.shape[0]
    full = torch.cat([cos, cos_row[:, None]], 1)                              # (N, A + 1)
    tpos = torch.where(use_row[rows], torch.full_like(target[rows], a), target[rows])
    onehot = F.one_hot(tpos, a + 1).bool()
    if margin.interclass_filter > 0:
        full = torch.where((full > margin.interclass_filter) & ~onehot, torch.zeros_like(full), full)
    ct = full.gather(1, tpos[:, None]).squeeze(1)
    theta = torch.acos(ct)
    psi = torch.cos(margin.m1 * theta + margin.m2) - margin.m3
    psi = torch.where(margin.m1 * theta + margin.m2 <= torch.pi, psi, ct - margin.m3 - margin.m2 * torch.sin(
        torch.tensor(margin.m2, dtype=ct.dtype)))
    logits = torch.where(onehot, psi[:, None].expand_as(full), full) * margin.scale
    excluded = torch.zeros_like(onehot)
    excluded[:, :a] = row_labels[rows][:, None] == col_labels[None, :]
    excluded[:, a] = ~use_row[rows]
    logits = logits.masked_fill(excluded & ~onehot, float("-inf"))
    loss = F.cross_entropy(logits, tpos)
    loss.backward()
    return loss.detach(), X.grad, Wc.grad, RC.grad


def rank_run(state, world, batch, columns, dim, seed, chunks):
    X, Wc, RC, col_labels, row_labels, target, use_row, valid = problem(world, batch, columns, dim, seed)
    shard = ClassShard(columns, world, state.rank)
    lo, hi = shard.start, shard.stop
    home = torch.arange(world * batch) // batch == state.rank
    target_col = torch.where((target >= lo) & (target < hi), target - lo, torch.full_like(target, -1))
    out = {}
    for name, margin in MARGINS.items():
        for chunk in chunks:
            x = X[state.rank * batch:(state.rank + 1) * batch].clone().requires_grad_(True)
            centers = Wc[lo:hi].clone().requires_grad_(True)
            rc = RC.clone().requires_grad_(True)
            x_global = gather_batch(x, state.head_group)
            loss = margin_softmax_loss(x_global, centers, target_col, margin=margin, group=state.head_group,
                                       chunk_size=chunk, compute_dtype=torch.float64,
                                       row_centers=rc, row_center_mask=use_row & home,
                                       column_labels=col_labels[lo:hi], row_labels=row_labels, valid=valid,
                                       cache_bytes=0 if chunk % 2 else 1 << 20)  # recompute / reuse pass 1
            loss.backward()
            out[(name, chunk)] = dict(loss=loss.detach(), grad_x=x.grad, grad_centers=centers.grad,
                                      grad_rc=rc.grad)
    return out


WORLDS = (1, 2, 3, 4)
BATCH, COLUMNS, DIM, CHUNKS = 5, 11, 6, (1, 4, 10**6)


def in_subgroups(state, fn, *args):
    """Runs `fn(sub_state, world, *args)` on the first `world` ranks for every world in WORLDS, each
    over its own process group, so one spawn of max(WORLDS) ranks covers every world size."""
    import torch.distributed as dist

    out = {}
    for world in WORLDS:
        group = dist.new_group(list(range(world))) if state.world_size > 1 else None
        if state.rank < world:
            sub = ParallelState(rank=state.rank, world_size=world, local_rank=state.local_rank,
                                device=state.device, head_group=group, data_group=group)
            out[world] = fn(sub, world, *args)
    return out


def softmax_case(sub, world):
    return rank_run(sub, world, BATCH, COLUMNS, DIM, 100 + world, CHUNKS)


def all_memory_head_cases(state):
    """Every multi-rank case of the DCQ / F2C tests (process start-up dominates their cost)."""
    import test_dcq_head
    import test_f2c_head

    cases = {"softmax": softmax_case, "dcq": test_dcq_head.dcq_case, "f2c": test_f2c_head.f2c_case}
    return in_subgroups(state, lambda sub, world: {name: fn(sub, world) for name, fn in cases.items()})


@functools.lru_cache(maxsize=None)
def memory_head_runs() -> dict:
    """{case: {world: [per-rank result]}} from one spawn of max(WORLDS) ranks, shared by the modules."""
    from multirank import run_ranks
    per_rank = run_ranks(all_memory_head_cases, max(WORLDS))
    return {case: {w: [pr[w][case] for pr in per_rank[:w]] for w in WORLDS} for case in ("softmax", "dcq", "f2c")}


@pytest.fixture(scope="module")
def per_world():
    return memory_head_runs()["softmax"]


@pytest.mark.parametrize("world", WORLDS)
def test_row_centers_exclusion_and_valid_rows_match_dense_float64_reference(per_world, world):
    batch, columns, dim, seed, chunks = BATCH, COLUMNS, DIM, 100 + world, CHUNKS
    per_rank = per_world[world]
    X, Wc, RC, col_labels, row_labels, target, use_row, valid = problem(world, batch, columns, dim, seed)
    assert use_row.any() and (target >= 0).any() and (~valid).any()
    for name, margin in MARGINS.items():
        loss, dX, dW, dRC = dense_reference(X, Wc, RC, col_labels, row_labels, target, use_row, valid, margin)
        for chunk in chunks:
            res = [pr[(name, chunk)] for pr in per_rank]
            for r, rr in enumerate(res):
                torch.testing.assert_close(rr["loss"], loss, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(rr["grad_x"], dX[r * batch:(r + 1) * batch], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(torch.cat([rr["grad_centers"] for rr in res]), dW, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(sum(rr["grad_rc"] for rr in res), dRC, rtol=1e-10, atol=1e-12)
    # invalid rows get exactly no gradient
    bad = (~valid).nonzero().flatten()
    for r, pr in enumerate(per_rank):
        mine = bad[(bad >= r * batch) & (bad < (r + 1) * batch)] - r * batch
        assert torch.count_nonzero(pr[("cosface", 4)]["grad_x"][mine]) == 0


def test_invalid_row_without_any_column_keeps_loss_and_gradients_finite():
    margin = MARGINS["cosface"]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    # row 2: label 7 like every column, no target, not valid -> every entry excluded, log Z = -inf
    loss = margin_softmax_loss(x, centers, torch.tensor([0, 1, -1]), margin=margin, compute_dtype=torch.float64,
                               column_labels=torch.tensor([7, 7]), row_labels=torch.tensor([1, 2, 7]),
                               valid=torch.tensor([True, True, False]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(centers.grad).all()
    assert torch.count_nonzero(x.grad[2]) == 0
    ref = margin_softmax_loss(x[:2].detach(), centers.detach(), torch.tensor([0, 1]), margin=margin,
                              compute_dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-12, atol=0)


def test_valid_row_without_exactly_one_target_is_an_error():
    margin = MARGINS["cosface"]
    x = torch.randn(2, 4, dtype=torch.float64)
    centers = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="row 1 of the global batch is valid but has 0 targets"):
        margin_softmax_loss(x, centers, torch.tensor([0, -1]), margin=margin)
    with pytest.raises(ValueError, match="row 0 has its target both in row_centers and in column 2"):
        margin_softmax_loss(x, centers, torch.tensor([2, 1]), margin=margin, row_centers=torch.randn(2, 4),
                            row_center_mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="column_labels and row_labels go together"):
        margin_softmax_loss(x, centers, torch.tensor([0, 1]), margin=margin, column_labels=torch.zeros(3))
