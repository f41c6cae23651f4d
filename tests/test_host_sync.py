"""The head's step makes no host read of device values where reads are not cheap (an accelerator;
imposed on the CPU with host_reads(False)): proven under a dispatch mode that fails on every op that
reads a device value on the host or sizes its output by the data. Results match the CPU path, and a
bad label is reported at the next step, its row left out of the loss meanwhile."""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.heads import HeadConfig, build_head
from parallel.heads.config import MarginConfig, OptimizerConfig
from parallel.host_sync import DeferredErrors, host_reads
from parallel.margins import Margin
from parallel.softmax import margin_softmax_loss

aten = torch.ops.aten
# ops that wait for the device to answer on the host, or whose output size depends on the data
READS = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.nonzero_static.default,
         aten.masked_select.default, aten._unique.default, aten._unique2.default, aten.unique_dim.default,
         aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.is_nonzero.default}


class NoHostReads(TorchDispatchMode):
    """Fails on any host read of a tensor value (boolean-mask indexing and `tolist` included: the
    latter copies without an op the dispatcher sees). The one `tolist` allowed is DeferredErrors
    reading its copy once the copy has landed (on an accelerator, a pinned host tensor)."""

    def __enter__(self):
        self._tolist = original = torch.Tensor.tolist

        def tolist(t):
            caller = sys._getframe(1).f_code
            if caller is DeferredErrors._raise_if_found.__code__:
                return original(t)
            raise AssertionError("host read: Tensor.tolist")
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            raise AssertionError(f"host read: {func}")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"boolean-mask indexing: {func}")
        return func(*args, **kwargs)


def test_detector_catches_reads():
    t = torch.ones(3)
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        bool((t > 0).any())
    with pytest.raises(AssertionError, match="boolean-mask"), NoHostReads():
        t[t > 0]
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        torch.unique(t)
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        t.tolist()
    assert t.tolist() == [1.0, 1.0, 1.0]   # restored


# DCQ: a queue of 3 global batches, filled over the first steps (so its columns grow, then wrap)
EXTRA = {"dcq-sharded": dict(queue_size=20, layout="sharded"), "dcq-replicated": dict(queue_size=20, layout="replicated"),
         # F2C: 5 slots per rank, 3 gallery rows per rank and direction: full after two steps, then evicting
         "f2c": dict(pool_size=10)}
# MutualFace: queues filled at the first step and used from the second (hard negatives, capped by the room
# the positives leave), every interaction and both queue updates
MUTUAL = {"mutual-refresh": dict(queue_size=4, top_h=2, hard_share=0.5, update="score", decay=0.8,
                                 interaction="refresh", refresh_alpha=0.3),
          "mutual-pull": dict(queue_size=3, top_h=2, hard_share=0.75, update="fifo", interaction="pull"),
          "mutual-dual": dict(queue_size=3, top_h=1, hard_share=0.5, update="score", interaction="dual")}


def head_step(state, kind, rate, labels_fn, classes, dim, batch, steps, watch):
    torch.manual_seed(0)
    margin = MarginConfig(m1=1.0, m2=0.3, m3=0.1, scale=16.0, interclass_filter=0.4)
    if kind in EXTRA:   # memory heads take their margin from head.extra
        cfg = HeadConfig(type=kind.split("-")[0], chunk_size=5, logit_cache_mib=0, seed=1,
                         extra=dict(EXTRA[kind], margin=margin))
    else:
        cfg = HeadConfig(type=kind.split("-")[0], sample_rate=rate, chunk_size=5, logit_cache_mib=0, seed=1,
                         margin=margin, extra=MUTUAL.get(kind, {}),
                         optimizer=OptimizerConfig(update="dense" if kind.endswith("-dense") else "sparse"))
    head = build_head(cfg, state, classes, dim)
    out = []
    gen = torch.Generator().manual_seed(7 + state.rank)
    batch += batch % 2 if kind == "f2c" else 0   # F2C takes cat[x side, y side]: an even row count
    for step in range(steps):
        x = torch.randn(batch, dim, generator=gen, requires_grad=True)
        labels = labels_fn(step, state.rank, gen, batch)
        extra = {key: torch.randn(batch, dim, generator=gen) for key in getattr(head, "needs", ())}
        try:
            if watch:
                with NoHostReads():
                    res = head(x, labels, extra)
                    res.loss.backward()
                    head.step(lr=0.1)
            else:
                res = head(x, labels, extra)
                res.loss.backward()
                head.step(lr=0.1)
        except ValueError as e:
            out.append(("error", str(e)))
            break
        out.append((res.loss.detach(), x.grad.clone()))
        if kind in MUTUAL:
            out[-1] += (head.hard_queue.clone(), dict(res.stats))
    out.append(head.keys.clone() if kind.startswith("dcq") else head.pool.clone() if kind == "f2c"
               else head.bank.weight.clone())
    return out


CLASSES, DIM, BATCH = 61, 6, 5  # partial: 12 of ~30 rows per rank, >= the global batch
BAD_LABEL = CLASSES + 4


def random_labels(step, rank, gen, batch=BATCH):
    return torch.randint(0, CLASSES, (batch,), generator=gen)


def labels_with_one_bad(step, rank, gen, batch=BATCH):
    y = random_labels(step, rank, gen, batch)
    if step == 1 and rank == 1:
        y[3] = BAD_LABEL
    return y


def run_head(state, kind, rate, reads, labels_fn=random_labels, steps=3):
    with host_reads(reads):
        return head_step(state, kind, rate, labels_fn, CLASSES, DIM, BATCH, steps=steps, watch=not reads)


@pytest.mark.parametrize("kind,rate,steps", [("full", 1.0, 3), ("partial", 0.4, 3), ("partial-dense", 0.4, 3),
                                             ("dcq-sharded", 1.0, 5),
                                             ("dcq-replicated", 1.0, 5), ("f2c", 1.0, 5), ("mutual-refresh", 0.4, 4),
                                             ("mutual-pull", 0.4, 4), ("mutual-dual", 0.4, 4)])
def test_head_step_makes_no_host_read_and_matches_the_cpu_path(spawn_ranks, kind, rate, steps):
    watched = spawn_ranks(run_head, 2, args=(kind, rate, False, random_labels, steps))
    plain = spawn_ranks(run_head, 2, args=(kind, rate, True, random_labels, steps))
    for w, p in zip(watched, plain):
        assert len(w) == steps + 1 and all(not isinstance(step[0], str) for step in w[:-1]), w
        for step_w, step_p in zip(w[:-1], p[:-1]):
            torch.testing.assert_close(step_w[:2], step_p[:2], rtol=1e-6, atol=1e-7)
            if kind in MUTUAL:   # the queues after the step, and the step's figures
                assert torch.equal(step_w[2], step_p[2])
                torch.testing.assert_close(step_w[3], step_p[3], rtol=1e-6, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(w[-1], p[-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["full", "dcq-sharded", "f2c", "mutual-refresh"])
def test_bad_label_is_reported_at_the_next_step_and_left_out_of_the_loss(spawn_ranks, kind):
    results = spawn_ranks(run_head, 2, args=(kind, 1.0, False, labels_with_one_bad))
    for r, res in enumerate(results):
        assert res[2][0] == "error", res[2]  # step 2 raises the error of step 1, no read in step 1 itself
        if r == 1:
            assert f"label {BAD_LABEL} at position 3 of rank 1's batch" in res[2][1]
        loss, grad = res[1][:2]
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # that row of rank 1 got no gradient; the others did
    assert torch.count_nonzero(results[1][1][1][3]) == 0
    assert torch.count_nonzero(results[1][1][1][2]) > 0


def test_softmax_without_host_reads_matches_with_reads_on_every_input_kind():
    """Exclusions, the per-row extra column, validity and hard-negative mining, float64."""
    g = torch.Generator().manual_seed(3)
    bg, a, d = 7, 11, 5
    x = torch.randn(bg, d, generator=g, dtype=torch.float64)
    centers = torch.randn(a, d, generator=g, dtype=torch.float64)
    centers[2] = x[0] * 3.0   # a cosine of 1 up to rounding: the clamp path
    target_col = torch.tensor([2, -1, 4, 0, -1, 9, 10])
    row_mask = target_col < 0
    row_centers = torch.randn(bg, d, generator=g, dtype=torch.float64)
    column_labels = torch.randint(0, 4, (a,), generator=g)
    row_labels = torch.randint(0, 4, (bg,), generator=g)
    valid = torch.tensor([1, 1, 1, 0, 1, 1, 1], dtype=torch.float64)
    margin = Margin(1.0, 0.4, 0.05, 10.0, "exact", 0.3)

    def run(reads):
        xs, cs, rs = (t.clone().requires_grad_(True) for t in (x, centers, row_centers))
        stats = {}
        with host_reads(reads), (NoHostReads() if not reads else torch.enable_grad()):
            loss = margin_softmax_loss(xs, cs, target_col, margin=margin, chunk_size=3, compute_dtype=torch.float64,
                                       row_centers=rs, row_center_mask=row_mask, column_labels=column_labels,
                                       row_labels=row_labels, valid=valid, stats=stats, top_negatives=2,
                                       cache_bytes=100, errors=DeferredErrors())
            loss.backward()
        return loss, xs.grad, cs.grad, rs.grad, stats["top_negative_cos"], stats["top_negative_col"]

    for got, want in zip(run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
