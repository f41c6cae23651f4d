"""The sharded margin softmax and the full / partial heads against a dense float64 reference."""

import pytest
import torch
from reference_softmax import dense_margin_softmax

from parallel.heads import HeadConfig, build_head
from parallel.heads.config import MarginConfig, OptimizerConfig
from parallel.sharding import ClassShard, class_owner

MARGINS = {
    "arcface_exact": dict(m1=1.0, m2=0.5, m3=0.0, grad="exact"),
    "arcface_straight_through": dict(m1=1.0, m2=0.5, m3=0.0, grad="straight_through"),
    "cosface": dict(m1=1.0, m2=0.0, m3=0.4, grad="exact"),
    "combined_exact": dict(m1=1.2, m2=0.3, m3=0.2, grad="exact"),
    "combined_straight_through": dict(m1=0.9, m2=0.4, m3=0.15, grad="straight_through"),
    "arcface_filtered": dict(m1=1.0, m2=0.5, m3=0.0, grad="exact", tau=0.25),
}
SCALE = 8.0


def problem(num_classes, dim, batch, world, seed):
    """Global embeddings, centers and labels; some targets nearly opposite their embedding so the
    ArcFace guard (theta + m > pi) is exercised."""
    g = torch.Generator().manual_seed(seed)
    bg = batch * world
    X = torch.randn(bg, dim, generator=g, dtype=torch.float64)
    W = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    Y = torch.randint(0, num_classes, (bg,), generator=g)
    Y[0] = num_classes - 1  # the last class (on the last, smaller shard) is always a target
    flip = torch.arange(bg) % 3 == 1
    W[Y[flip]] = -X[flip] + 0.05 * torch.randn(int(flip.sum()), dim, generator=g, dtype=torch.float64)
    return X, W, Y


def head_config(kind, margin, chunk, dtype="float64", rate=1.0, seed=3, update="sparse", cache_mib=0):
    tau = margin.get("tau", 0.0)
    return HeadConfig(type=kind, sample_rate=rate, chunk_size=chunk, logit_cache_mib=cache_mib, compute_dtype=dtype,
                      storage_dtype="float64" if dtype == "float64" else "float32", seed=seed,
                      margin=MarginConfig(m1=margin["m1"], m2=margin["m2"], m3=margin["m3"], scale=SCALE,
                                          grad=margin["grad"], interclass_filter=tau),
                      optimizer=OptimizerConfig(update=update))


def run_head(state, cfg, X, W, Y, batch):
    """One forward/backward on this rank; returns loss, d x_local, active global ids, d centers."""
    head = build_head(cfg, state, W.shape[0], W.shape[1])
    start, count = head.shard.span
    head.bank.weight.copy_(W[start:start + count].to(head.bank.weight.dtype))
    lo = state.rank * batch
    dtype = torch.float64 if cfg.compute_dtype == "float64" else torch.float32
    x = X[lo:lo + batch].to(dtype).clone().requires_grad_(True)
    out = head(x, Y[lo:lo + batch])
    out.loss.backward()
    (rows, grad), = head.pending_grads()
    rows = torch.arange(count) if rows is None else rows
    return dict(loss=out.loss.detach().double(), grad_x=x.grad.double() / state.data_world,
                active=rows + start, grad_centers=grad.double())


def rank_case_grid(state, num_classes, dim, batch, seed):
    X, W, Y = problem(num_classes, dim, batch, state.world_size, seed)
    out = {}
    for name, margin in MARGINS.items():
        # without a logit cache pass 2 recomputes every chunk but the last; with one it reuses them all
        for chunk in (1, 3, 10**9):
            out[("full", name, chunk)] = run_head(state, head_config("full", margin, chunk), X, W, Y, batch)
        out[("full", name, "3 cached")] = run_head(state, head_config("full", margin, 3, cache_mib=1), X, W, Y, batch)
        out[("partial", name, 4)] = run_head(state, head_config("partial", margin, 4, rate=0.4), X, W, Y, batch)
    fp32 = head_config("full", MARGINS["arcface_exact"], 5, dtype="float32")
    out[("full", "fp32", 5)] = run_head(state, fp32, X, W, Y, batch)
    bf16 = head_config("full", MARGINS["arcface_exact"], 5, dtype="bfloat16")
    out[("full", "bf16", 5)] = run_head(state, bf16, X, W, Y, batch)
    return out


def reference_for(results, X, W, Y, margin):
    active = torch.cat([r["active"] for r in results])
    assert torch.equal(active, torch.unique(active)), "active sets must be disjoint and ordered by rank"
    pos = torch.searchsorted(active, Y)
    assert torch.equal(active[pos], Y), "every target must be active"
    return dense_margin_softmax(X, W[active], pos, m1=margin["m1"], m2=margin["m2"], m3=margin["m3"], s=SCALE,
                                grad=margin["grad"], tau=margin.get("tau", 0.0)), active


def assert_close_in_norm(actual, expected, rel):
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    assert err <= rel, f"relative error {err:.2e} in norm exceeds {rel:.0e}"


def assert_matches_bf16(results, X, W, Y, margin, batch, rel=5e-2):
    """bf16 GEMMs round embeddings and centers to 8 mantissa bits (2^-9 relative): cosines move by
    ~1e-3 and the GEMM output is rounded to bf16 too; the softmax math is float32. With s = 8 and
    few classes the probabilities move by a few percent: we accept 5% relative error in norm."""
    (loss, dX, dW), _ = reference_for(results, X, W, Y, margin)
    for r, res in enumerate(results):
        assert_close_in_norm(res["loss"], loss, rel)
        assert_close_in_norm(res["grad_x"], dX[r * batch:(r + 1) * batch], rel)
    assert_close_in_norm(torch.cat([res["grad_centers"] for res in results]), dW, rel)


def assert_matches(results, X, W, Y, margin, batch, rtol, atol):
    (loss, dX, dW), active = reference_for(results, X, W, Y, margin)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["loss"], loss, rtol=rtol, atol=atol)
        torch.testing.assert_close(res["grad_x"], dX[r * batch:(r + 1) * batch], rtol=rtol, atol=atol)
    dW_sharded = torch.cat([res["grad_centers"] for res in results])
    torch.testing.assert_close(dW_sharded, dW, rtol=rtol, atol=atol)


@pytest.mark.parametrize("world,num_classes,dim,batch", [(1, 23, 7, 5), (2, 23, 16, 3), (3, 23, 7, 4),
                                                         (4, 23, 9, 3)])
def test_heads_match_dense_float64_reference_uneven_shards(spawn_ranks, world, num_classes, dim, batch):
    seed = 11 + world
    per_rank = spawn_ranks(rank_case_grid, world, args=(num_classes, dim, batch, seed))
    X, W, Y = problem(num_classes, dim, batch, world, seed)
    for key in per_rank[0]:
        kind, name, chunk = key
        results = [pr[key] for pr in per_rank]
        margin = MARGINS.get(name, MARGINS["arcface_exact"])
        if name == "fp32":
            assert_matches(results, X, W, Y, margin, batch, rtol=1e-5, atol=1e-6)
        elif name == "bf16":
            assert_matches_bf16(results, X, W, Y, margin, batch)
        else:
            assert_matches(results, X, W, Y, margin, batch, rtol=1e-10, atol=1e-12)
    # chunk-size invariance: chunks of 1, an odd size and everything at once agree to rounding; reusing
    # pass 1's logits gives the recomputed ones exactly
    for name in MARGINS:
        a, b, c, d = ([pr[("full", name, ch)] for pr in per_rank] for ch in (1, 3, 10**9, "3 cached"))
        for ra, rb, rc, rd in zip(a, b, c, d):
            for k in ("loss", "grad_x", "grad_centers"):
                torch.testing.assert_close(ra[k], rc[k], rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(rb[k], rc[k], rtol=1e-12, atol=1e-14)
                assert torch.equal(rb[k], rd[k]), (name, k)


def test_class_owner_and_shard_ranges_cover_every_class_once():
    for num_classes in (1, 5, 23, 100):
        for world in (1, 2, 3, 4, 7):
            if num_classes < world:
                continue
            spans = ClassShard(num_classes, world, 0).ranges()
            assert sum(c for _, c in spans) == num_classes
            assert [s for s, _ in spans] == [sum(c for _, c in spans[:r]) for r in range(world)]
            labels = torch.arange(num_classes)
            owner = class_owner(labels, num_classes, world)
            expected = torch.tensor([next(r for r, (s, c) in enumerate(spans) if s <= y < s + c) for y in labels])
            assert torch.equal(owner, expected)


def test_chunked_softmax_in_float32_matches_float64_reference_single_process():
    from parallel.groups import ParallelState
    X, W, Y = problem(37, 24, 16, 1, seed=5)
    cfg = head_config("full", MARGINS["arcface_exact"], 6, dtype="float32")
    res = run_head(ParallelState.single("cpu"), cfg, X, W, Y, 16)
    assert_matches([res], X, W, Y, MARGINS["arcface_exact"], 16, rtol=1e-5, atol=1e-6)


def test_label_outside_range_names_label_and_position():
    from parallel.groups import ParallelState
    head = build_head(HeadConfig(type="full"), ParallelState.single("cpu"), 10, 4)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"label 10 at position 2 .* outside \[0, 10\)"):
        head(x, torch.tensor([1, 2, 10]))
    with pytest.raises(ValueError, match=r"label -1 at position 0"):
        head(x, torch.tensor([-1, 2, 3]))


def test_backward_hands_over_the_forward_gradient_and_refuses_a_second_pass():
    from parallel.margins import Margin
    from parallel.softmax import margin_softmax_loss
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 10, 5, 5, 2])
    margin = Margin(1.0, 0.5, 0.0, 8.0, "exact", 0.0)
    loss = margin_softmax_loss(x, centers, target, margin=margin, compute_dtype=torch.float64)
    (2.5 * loss).backward()  # the upstream gradient scales the handed-over tensors in place
    (ref_loss, ref_dx, ref_dw) = dense_margin_softmax(x.detach(), centers.detach(), target, m1=1.0, m2=0.5, m3=0.0,
                                                      s=8.0, grad="exact", tau=0.0)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, 2.5 * ref_dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(centers.grad, 2.5 * ref_dw, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
@pytest.mark.parametrize("given_norms", [False, True])
def test_center_gradient_written_over_the_centers_matches_the_reference(cache_bytes, given_norms):
    """The gradient may replace the centers chunk by chunk (a head's private copy of its rows), with the
    rows' norms handed in or measured: same loss and gradients as the dense float64 reference, whether
    chunks are recomputed in pass 2 (no cache) or kept."""
    from parallel.margins import Margin
    from parallel.softmax import margin_softmax_loss
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(11, 8, generator=g, dtype=torch.float64)
    centers = rows.clone().requires_grad_(True)
    target = torch.tensor([0, 3, 10, 5, 5, 2])
    margin = Margin(1.0, 0.5, 0.0, 8.0, "exact", 0.0)
    norms = torch.linalg.vector_norm(rows, dim=1) if given_norms else None
    loss = margin_softmax_loss(x, centers, target, margin=margin, compute_dtype=torch.float64, chunk_size=4,
                               cache_bytes=cache_bytes, center_grad_buffer=centers.detach(), center_norms=norms)
    loss.backward()
    ref_loss, ref_dx, ref_dw = dense_margin_softmax(x.detach(), rows, target, m1=1.0, m2=0.5, m3=0.0, s=8.0,
                                                    grad="exact", tau=0.0)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(centers.grad, ref_dw, rtol=1e-10, atol=1e-12)
    assert centers.grad.data_ptr() == centers.data_ptr()       # no second (A, D) tensor
    with pytest.raises(ValueError, match=r"center_norms must be \(11,\), got \(10,\)"):
        margin_softmax_loss(x, rows, target, margin=margin, center_norms=torch.ones(10, dtype=torch.float64))


def test_negative_logit_cache_is_refused():
    from parallel.margins import Margin
    from parallel.softmax import margin_softmax_loss
    with pytest.raises(ValueError, match=r"cache_bytes must be >= 0, got -1"):
        margin_softmax_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]),
                            margin=Margin(1.0, 0.5, 0.0, 8.0, "exact", 0.0), cache_bytes=-1)


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_gemms_warn_once_where_the_cpu_emulates_them(monkeypatch, native):
    import warnings

    from parallel import softmax
    monkeypatch.setattr(softmax, "cpu_has_native_bfloat16_gemms", lambda: native)
    softmax.warn_if_bfloat16_gemms_are_emulated.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            softmax.warn_if_bfloat16_gemms_are_emulated(torch.bfloat16, "cpu")
        softmax.warn_if_bfloat16_gemms_are_emulated(torch.float32, "cpu")
    softmax.warn_if_bfloat16_gemms_are_emulated.cache_clear()
    messages = [str(w.message) for w in caught if "bfloat16 matrix multiply" in str(w.message)]
    assert len(messages) == (0 if native else 1), messages


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("kind,rate", [("full", 1.0), ("partial", 1.0), ("partial", 0.3)])
def test_recycled_center_gradient_changes_nothing(kind, rate, storage):
    """The head writes each step's center gradient over its copy of the rows (the bank's own tensor:
    into the last step's consumed gradient) and gathers the next step's rows into it: same rows after
    several steps, bit for bit, as a head that allocates a new gradient every step beside its rows."""
    from parallel.groups import init_parallel
    state = init_parallel()
    compute = "float64" if storage == "float64" else "float32"
    cfg = HeadConfig(type=kind, sample_rate=rate, chunk_size=7, seed=5, storage_dtype=storage, compute_dtype=compute)
    heads = [build_head(cfg, state, 61, 9) for _ in range(2)]
    heads[1].leaf_is_a_copy = lambda centers: False   # the reference: the gradient beside the rows
    g = torch.Generator().manual_seed(8)
    ptrs = []
    for _ in range(4):
        x = torch.randn(6, 9, generator=g, dtype=torch.float64 if storage == "float64" else torch.float32)
        y = torch.randint(0, 61, (6,), generator=g)
        for i, head in enumerate(heads):
            if i == 1:
                head._spare_rows = None          # the reference: a fresh gradient every step
            loss = head(x.clone().requires_grad_(True), y).loss
            loss.backward()
            leaf = head._pending[0][1]
            if i == 0:
                ptrs.append(leaf.grad.data_ptr())
                if rate < 1.0:
                    assert leaf.grad.data_ptr() == leaf.data_ptr()   # one (A, D) tensor, not two
            else:
                assert leaf.grad.data_ptr() != leaf.data_ptr()
            head.step(lr=0.5)
    assert len(set(ptrs[1:])) == 1                # the buffer really is reused
    assert torch.equal(heads[0].bank.weight, heads[1].bank.weight)
    assert torch.equal(heads[0].bank.momentum, heads[1].bank.momentum)


@pytest.mark.parametrize("cache_bytes,overlaps", [(1 << 20, True), (0, False)])
def test_embedding_gradient_scatter_starts_before_the_center_gradient_when_every_chunk_is_kept(cache_bytes,
                                                                                              overlaps):
    """Through GatheredRows the softmax hands d x_global to the reduce-scatter as soon as it is complete:
    before any center gradient is written when every chunk's logits are kept (the transfer overlaps
    that work), at the end otherwise. Gradients equal the dense float64 reference either way."""
    from parallel.collectives import GatheredRows
    from parallel.margins import Margin
    from parallel.softmax import margin_softmax_loss

    class Spy(GatheredRows):
        def start_scatter(self, grad_global):
            self.centers_written_at_start = int(torch.isfinite(buffer).all(dim=1).sum())
            super().start_scatter(grad_global)

    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(11, 8, generator=g, dtype=torch.float64)
    centers = rows.clone().requires_grad_(True)
    buffer = torch.full_like(rows, float("nan"))
    target = torch.tensor([0, 3, 10, 5, 5, 2])
    gathered = Spy(x, x.detach(), None, 3.0)     # one rank; grad_scale 3 as for 3 data-parallel ranks
    loss = margin_softmax_loss(gathered, centers, target, margin=Margin(1.0, 0.5, 0.0, 8.0, "exact", 0.0),
                               compute_dtype=torch.float64, chunk_size=4, cache_bytes=cache_bytes,
                               center_grad_buffer=buffer)
    (2.0 * loss).backward()
    assert gathered.centers_written_at_start == (0 if overlaps else 11)
    ref_loss, ref_dx, ref_dw = dense_margin_softmax(x.detach(), rows, target, m1=1.0, m2=0.5, m3=0.0, s=8.0,
                                                    grad="exact", tau=0.0)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, 6.0 * ref_dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(centers.grad, 2.0 * ref_dw, rtol=1e-10, atol=1e-12)


def test_gathered_rows_without_an_embedding_gradient_still_give_the_centers_theirs():
    """x (B, D) not requiring grad behind GatheredRows: no reduce-scatter starts, backward returns
    nothing for x and the centers' gradient equals the reference."""
    from parallel.collectives import GatheredRows
    from parallel.margins import Margin
    from parallel.softmax import margin_softmax_loss
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    rows = torch.randn(7, 6, generator=g, dtype=torch.float64)
    centers = rows.clone().requires_grad_(True)
    target = torch.tensor([0, 6, 3, 3, 1])
    loss = margin_softmax_loss(GatheredRows(x, x, None, 1.0), centers, target,
                               margin=Margin(1.0, 0.0, 0.35, 8.0, "exact", 0.0), compute_dtype=torch.float64,
                               chunk_size=3)
    loss.backward()
    _, _, ref_dw = dense_margin_softmax(x, rows, target, m1=1.0, m2=0.0, m3=0.35, s=8.0, grad="exact", tau=0.0)
    torch.testing.assert_close(centers.grad, ref_dw, rtol=1e-10, atol=1e-12)
    assert x.grad is None
