"""The fused softmax's optional top-h negatives output against a brute-force reference."""
import pytest
import torch

from parallel.margins import Margin
from parallel.softmax import margin_softmax_loss


def brute_force_top_negatives(X, C, target_col, h, tau=0.0, row_labels=None, column_labels=None):
    """Per row, the h largest clamped cosines over columns that are not the target, not excluded and
    not filtered; ties to the lower column; padded with (-inf, -1)."""
    cos = (X / X.norm(dim=1, keepdim=True)) @ (C / C.norm(dim=1, keepdim=True)).t()
    cos = cos.clamp(-1, 1)
    out_v = torch.full((X.shape[0], h), float("-inf"), dtype=X.dtype)
    out_c = torch.full((X.shape[0], h), -1, dtype=torch.long)
    for i in range(X.shape[0]):
        entries = []
        for j in range(C.shape[0]):
            if j == int(target_col[i]):
                continue
            if row_labels is not None and int(row_labels[i]) == int(column_labels[j]):
                continue
            if tau > 0 and float(cos[i, j]) > tau:
                continue
            entries.append((-float(cos[i, j]), j))
        for k, (neg_v, j) in enumerate(sorted(entries)[:h]):
            out_v[i, k] = -neg_v
            out_c[i, k] = j
    return out_v, out_c


def run(X, C, target_col, h, chunk, tau=0.0, **kw):
    stats = {}
    margin = Margin(1.0, 0.5, 0.0, 8.0, "exact", tau)
    x = X.clone().requires_grad_(True)
    c = C.clone().requires_grad_(True)
    # rows without a target here take no part in the loss but still report their negatives
    loss = margin_softmax_loss(x, c, target_col, margin=margin, chunk_size=chunk, compute_dtype=torch.float64,
                               stats=stats, top_negatives=h, valid=target_col >= 0,
                               cache_bytes=0 if chunk % 2 else 1 << 20, **kw)  # recompute / reuse pass 1
    loss.backward()
    return loss.detach(), x.grad, c.grad, stats


@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_top_negatives_match_brute_force_for_every_chunk_size(tau):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(9, 6, generator=g, dtype=torch.float64)
    C = torch.randn(13, 6, generator=g, dtype=torch.float64)
    target_col = torch.tensor([0, 3, -1, 12, 5, -1, 7, 7, 1])
    row_labels = torch.tensor([100, 103, 200, 112, 105, 201, 107, 107, 101])
    column_labels = torch.arange(100, 113)
    column_labels[4] = 103      # excluded for row 1 (same label, not its target)
    column_labels[9] = 200      # excluded for row 2
    for h in (1, 3, 13):
        want_v, want_c = brute_force_top_negatives(X, C, target_col, h, tau, row_labels, column_labels)
        base = run(X, C, target_col, 0, 10**9, tau, row_labels=row_labels, column_labels=column_labels)
        for chunk in (1, 2, 5, 10**9):
            loss, gx, gc, stats = run(X, C, target_col, h, chunk, tau, row_labels=row_labels,
                                      column_labels=column_labels)
            assert torch.equal(stats["top_negative_col"], want_c), (h, chunk)
            torch.testing.assert_close(stats["top_negative_cos"], want_v, rtol=1e-12, atol=1e-14)
            if chunk == 10**9:  # the extra output leaves loss and gradients bit-for-bit as they were
                assert torch.equal(loss, base[0]) and torch.equal(gx, base[1]) and torch.equal(gc, base[2])
    if tau == 0:  # h = 13 columns: row 1 has 11 negatives (its target and one excluded column drop out)
        assert torch.equal(stats["top_negative_col"][1, 11:], torch.tensor([-1, -1]))
        assert torch.isneginf(stats["top_negative_cos"][1, 11:]).all() and (stats["top_negative_col"][1, :11] >= 0).all()


def test_top_negative_ties_go_to_the_lower_column_whatever_the_chunking():
    # axis-aligned rows: every cosine is one coordinate of a normalized center, exact in any GEMM order,
    # and duplicated centers give exactly tied cosines across chunk boundaries
    D = 4
    X = torch.eye(D, dtype=torch.float64) * 3.0
    base = torch.tensor([[1.0, 2.0, 0.5, -1.0], [2.0, 1.0, -0.5, 0.25], [0.5, 0.5, 2.0, 1.0]], dtype=torch.float64)
    C = torch.cat([base, base[[1]], base, base[[0]]])          # columns 3, 4.., 7 repeat earlier ones
    target_col = torch.tensor([-1, 2, -1, 0])
    want_v, want_c = brute_force_top_negatives(X, C, target_col, 4)
    for chunk in (1, 2, 3, 4, 10**9):
        stats = run(X, C, target_col, 4, chunk)[3]
        assert torch.equal(stats["top_negative_col"], want_c), chunk
        assert torch.equal(stats["top_negative_cos"], want_v), chunk
    # the duplicates really tie, and the lower column comes first
    assert want_v[0, 0] == want_v[0, 1] and want_c[0, 0] < want_c[0, 1]


def test_top_negatives_needs_stats_and_a_non_negative_count():
    X, C = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="needs a stats dict"):
        margin_softmax_loss(X, C, torch.tensor([0, 1]), margin=Margin(), top_negatives=2)
    with pytest.raises(ValueError, match="top_negatives must be >= 0"):
        margin_softmax_loss(X, C, torch.tensor([0, 1]), margin=Margin(), stats={}, top_negatives=-1)
