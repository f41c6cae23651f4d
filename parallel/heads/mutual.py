"""MutualFace: Partial FC plus a per-class queue of hard negative classes and a mutual
sample-center interaction (see ALGORITHMS.md and `MutualConfig`).

State beside the center bank, on the rank that owns each class:
    hard_queue (C_r, Q) int32   global ids of hard negative classes of each local class, -1 empty
    hard_score (C_r, Q) float32 their scores (`score` update only; `fifo` keeps recency in the order)
so the queue costs 4 * C_r * Q bytes (+ as much again for scores), nothing of size C * Q * D.

One step:
    publish   owners fill the queue rows of the batch's labels into a (Bg, Q) table, all-reduce MAX
    select    positives, then queued negatives that live here (slot order, lowest slot first, at
              most floor(hard_share * n) and what room n leaves), then uniform random fill up to
              n = floor(rho * C_r)                                              (sampling.sample_rows)
    softmax   the fused margin softmax, which also returns this rank's top-h negatives of every row
    route     all-gather the (Bg, h) ids and cosines; each owner keeps the rows of its classes
    step      SGD on the active rows; merge the routed candidates into the queues; M1 refresh
Selection and merge are deterministic given the per-rank random stream of Partial FC. Every tensor
of the step has a size fixed by the configuration and the batch (rows whose class lives elsewhere
point at a spare index C_r, unused hard-negative slots likewise), so the step makes no host read
(parallel/host_sync.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.collectives import all_gather_rows, all_reduce_, reduce_to_replicated
from parallel.groups import ParallelState
from parallel.heads.base import HeadOutput
from parallel.heads.config import HeadConfig, MutualConfig
from parallel.heads.parametric import ParametricHead
from parallel.heads.sampling import ActiveSet, local_targets, sample_rows
from parallel.host_sync import first_true
from parallel.softmax import margin_softmax_loss

EMPTY_SCORE = -1.0  # score of an empty slot; real scores are (1 + cos) / 2 * decay^k >= 0


@dataclass
class QueueCandidates:
    """What one forward sends to this rank's queues: every row of the global batch."""

    classes: torch.Tensor   # (R,) local class id of each row, C_r where the class lives on another rank
    ids: torch.Tensor       # (R, W*h) global ids of the hardest negatives every rank saw, -1 empty
    cos: torch.Tensor       # (R, W*h) their cosines
    x_hat: torch.Tensor     # (R, D) normalized embeddings of those rows (M1 refresh)


def run_starts(sorted_values: torch.Tensor) -> torch.Tensor:
    """(N,) bool: where a run of equal values starts in a sorted (N,) tensor."""
    starts = torch.ones(sorted_values.shape, dtype=torch.bool, device=sorted_values.device)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    return starts


def merge_queue_rows(old_ids: torch.Tensor, old_key: torch.Tensor, classes: torch.Tensor,
                     new_ids: torch.Tensor, new_key: torch.Tensor, queue_size: int, num_ids: int):
    """Merges candidates into queue rows: per class, distinct ids by best key, the `queue_size` best
    (key descending, ties to the lower id).

    Row r of the inputs belongs to class `classes[r]` (R,) (rows may share a class: a class's entries
    are those of all its rows); old_ids, old_key (R, Q): that class's current queue row; new_ids,
    new_key (R, K): candidates of the row (-1 ids ignored everywhere). Returns ids (R, Q) long and
    keys (R, Q) float64 (EMPTY_SCORE on empty slots): the merged queue of each row's class, the same
    for rows of the same class. Sizes are fixed (sorts of R * (Q + K) entries, no compaction)."""
    rows = old_ids.shape[0]
    device = old_ids.device
    ids = torch.cat([old_ids, new_ids], 1).reshape(-1)
    key = torch.cat([old_key, new_key], 1).to(torch.float64).reshape(-1)
    group = classes[:, None].expand(rows, ids.numel() // max(rows, 1)).reshape(-1)
    empty = ids < 0
    key = key.masked_fill(empty, -math.inf)
    # distinct (class, id), best key first: one int64 key per pair (ids lie in [-1, num_ids))
    pair = group * (num_ids + 1) + ids + 1
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(pair[order], stable=True)]
    pair, key, ids, group = pair[order], key[order], ids[order], group[order]
    key = key.masked_fill(~run_starts(pair), -math.inf)
    # per class: key descending, ties to the lower id (ids ascend within a class already)
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    key, ids, group = key[order], ids[order], group[order]
    first = torch.searchsorted(group, classes)                                  # (R,) start of each class
    slot = first[:, None] + torch.arange(queue_size, device=device)             # (R, Q)
    at = slot.clamp_max(max(group.numel() - 1, 0))
    taken = (slot < group.numel()) & (group[at] == classes[:, None]) & (key[at] > -math.inf)
    out_ids = torch.where(taken, ids[at], torch.full_like(at, -1))
    out_key = torch.where(taken, key[at], torch.full_like(key[at], EMPTY_SCORE))
    return out_ids, out_key


def copy_rows_(dest: torch.Tensor, index: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
    """dest[index[r]] = values[r] for the rows r where `valid` (R,), without compacting them: the
    other rows write the first valid row again (or dest[0] onto itself when none is valid). Rows
    sharing an index must carry the same values (then the result does not depend on the write order)."""
    if index.numel() == 0:
        return
    any_valid, first = first_true(valid)
    first_index = index.index_select(0, first.view(1))
    fallback_index = torch.where(any_valid, first_index, torch.zeros_like(first_index))
    fallback_value = torch.where(any_valid, values.index_select(0, first.view(1)), dest[:1].to(values.dtype))
    index = torch.where(valid, index, fallback_index)
    values = torch.where(valid.view(-1, *([1] * (values.dim() - 1))), values, fallback_value)
    dest.index_copy_(0, index, values.to(dest.dtype))


def class_representatives(classes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(R,) bool: the first valid row of each distinct class (a fixed-size sort, no compaction)."""
    order = torch.argsort(classes, stable=True)
    return torch.zeros_like(valid).scatter_(0, order, run_starts(classes[order])) & valid


class MutualHead(ParametricHead):
    """Positives + queued hard negatives + random fill over the parametric bank (MutualFace)."""

    name = "mutual"

    def __init__(self, cfg: HeadConfig, state: ParallelState, num_classes: int, embedding_size: int):
        super().__init__(cfg, state, num_classes, embedding_size)
        self.mutual = MutualConfig.from_extra(cfg.extra)
        shape = (self.shard.count, self.mutual.queue_size)
        self.register_buffer("hard_queue", torch.full(shape, -1, dtype=torch.int32, device=state.device))
        self.register_buffer("hard_score", torch.full(shape, EMPTY_SCORE, dtype=torch.float32, device=state.device)
                             if self.mutual.update == "score" else None)
        # non-empty slots of this rank's queues (a device count: the step never reads it)
        self._filled = torch.zeros((), dtype=torch.long, device=state.device)
        self._candidates: list[QueueCandidates] = []
        self._last_hard = torch.empty(0, dtype=torch.long, device=state.device)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_sample(self) -> int:
        return int(math.floor(self.cfg.sample_rate * self.shard.count))

    @property
    def queue_memory_bytes(self) -> int:
        """Bytes of this rank's hard-queue state: 4 * C_r * Q, doubled by the scores of `score` update."""
        return sum(t.numel() * t.element_size() for t in (self.hard_queue, self.hard_score) if t is not None)

    # -- selection -----------------------------------------------------------------------------
    def publish_queues(self, labels_global: torch.Tensor) -> torch.Tensor:
        """(Bg, Q) long: the queue row of each row's class, filled by its owner, -1 empty."""
        local, local_id = local_targets(labels_global, self.shard)
        rows = self.hard_queue.index_select(0, local_id.clamp(0, self.shard.count - 1)).to(torch.long)
        table = torch.where(local[:, None], rows, torch.full_like(rows, -1))
        return all_reduce_(table, self.group, op=dist.ReduceOp.MAX)

    @property
    def hard_cap(self) -> int:
        """Most queued negatives a step activates on this rank: floor(hard_share * n), n = floor(rho * C_r)."""
        return int(math.floor(self.mutual.hard_share * self.num_sample))

    def hard_rows(self, table: torch.Tensor, labels_global: torch.Tensor) -> torch.Tensor:
        """(min(hard_cap, Bg * Q),) local rows of the published queued negatives living here, not
        positives, best first: lowest slot over all rows naming it, then lowest id; taken up to
        hard_cap and the room n = floor(rho * C_r) leaves after the positives. Unused places hold
        C_r (no row). A fixed-size sort of the Bg * Q table entries; nothing of size C_r."""
        count, q = self.shard.count, table.shape[1]
        cap = min(self.hard_cap, table.numel())
        if cap == 0:
            return torch.empty(0, dtype=torch.long, device=table.device)
        local, local_id = local_targets(labels_global, self.shard)
        positives = torch.where(local, local_id, torch.full_like(local_id, count)).sort().values   # (Bg,)
        num_positive = (run_starts(positives) & (positives < count)).sum()
        flat = table.reshape(-1)
        row = flat - self.shard.start
        here = (flat >= self.shard.start) & (flat < self.shard.stop)
        at = torch.searchsorted(positives, row.clamp(0, count)).clamp_max(positives.numel() - 1)
        row = torch.where(here & (positives[at] != row), row, torch.full_like(row, count))
        slot = torch.arange(q, device=table.device).repeat(table.shape[0])
        # entries by (row, slot): the first of each row carries its best slot
        order = torch.argsort(row * q + slot)
        row, slot = row[order], slot[order]
        first = run_starts(row)
        never = (q + 1) * (count + 1)
        key = torch.where(first & (row < count), slot * (count + 1) + row, torch.full_like(row, never))
        best = torch.topk(key, cap, largest=False, sorted=True)
        room = torch.arange(cap, device=table.device) < (self.num_sample - num_positive)
        return torch.where((best.values < never) & room, row[best.indices], torch.full_like(best.indices, count))

    def select_with_queue(self, labels_global: torch.Tensor) -> tuple[ActiveSet, torch.Tensor]:
        """(active set, hard local rows activated, padded with C_r)."""
        hard = self.hard_rows(self.publish_queues(labels_global), labels_global)
        return sample_rows(labels_global, self.shard, self.num_sample, self.generator, forced=hard), hard

    def select(self, labels_global):
        return self.select_with_queue(labels_global)[0]

    @property
    def last_hard(self) -> torch.Tensor:
        """The queued negatives the last forward activated (local rows, best first). Reads the device:
        for inspection, not for the step."""
        return self._last_hard[self._last_hard < self.shard.count]

    # -- the step ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor, batch: dict | None = None) -> HeadOutput:
        mc = self.mutual
        pending, labels_global = self.start_gather(x, labels)
        active, hard = self.select_with_queue(labels_global)                   # overlaps the gather
        softmax = dict(margin=self.margin, group=self.group, chunk_size=self.cfg.chunk_size,
                       cache_bytes=self.cfg.logit_cache_bytes, compute_dtype=self.compute_dtype,
                       errors=self.errors)
        stats: dict = {}
        out_stats: dict[str, torch.Tensor] = {}
        if mc.interaction == "dual":
            # M3: features see the hard-negative set with centers detached; centers see an independent
            # uniform set with features detached. Only the center view's rows have a gradient, and
            # only they are stepped.
            center_view = sample_rows(labels_global, self.shard, self.num_sample, self.generator)
            rows = center_view.rows
            centers = self.active_centers(rows, out=self._spare_rows)
            feature_centers = self.bank.rows(active.rows).to(centers.dtype)
            # the feature view's softmax reduce-scatters its gradient to x
            loss_x = margin_softmax_loss(pending.rows(), feature_centers, active.target_col,
                                         stats=stats, top_negatives=mc.top_h, **softmax)
            loss_w = margin_softmax_loss(pending.value, centers, center_view.target_col, **softmax)
            loss = loss_x + loss_w
            out_stats.update(loss_feature_view=loss_x.detach(), loss_center_view=loss_w.detach())
            feature_view = feature_centers
        else:
            rows = active.rows
            centers = self.active_centers(rows, out=self._spare_rows)
            # pull: a second consumer of x_global's gradient, so the gather's own backward reduces it
            x_global = pending.wait() if mc.interaction == "pull" else pending.rows()
            loss = margin_softmax_loss(x_global, centers, active.target_col, stats=stats,
                                       top_negatives=mc.top_h, **softmax)
            if mc.interaction == "pull":
                pull = self.pull_loss(x_global, centers, active.target_col)
                out_stats["pull_loss"] = pull.detach()
                loss = loss + pull
            feature_view = centers.detach()
        self._spare_rows = None
        self._pending.append((rows, centers))
        self.last_active, self._last_hard = active, hard
        x_hat = torch.nn.functional.normalize(pending.value.to(centers.dtype), dim=1, eps=1e-12)
        self._route_candidates(labels_global, active.rows, stats, x_hat)
        out_stats.update(self._metrics(active, hard, x_hat, feature_view))
        return HeadOutput(loss, out_stats)

    def pull_loss(self, x_global: torch.Tensor, centers: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
        """M2: pull_weight * mean over rows of (1 - cos(x_i, W_yi)), each row's term computed by the
        owner of its class, summed over ranks (same value everywhere; each rank's backward reaches its
        own positive centers and its share of x_global)."""
        has = target_col >= 0
        x_hat = torch.nn.functional.normalize(x_global.to(centers.dtype), dim=1, eps=1e-12)
        w_hat = torch.nn.functional.normalize(centers.index_select(0, target_col.clamp_min(0)), dim=1, eps=1e-12)
        cos = torch.where(has, (x_hat * w_hat).sum(1), torch.ones_like(x_hat[:, 0]))   # no term where absent
        term = (1.0 - cos).sum() * (self.mutual.pull_weight / target_col.numel())
        return reduce_to_replicated(term, self.group)

    def _route_candidates(self, labels_global, view_rows, stats, x_hat) -> None:
        """Sends every rank's top-h negatives (global ids, cosines) of each row to the row's owner:
        an all-gather of (Bg, h), O(W * Bg * h) and independent of C. Every row is kept; a row whose
        class lives elsewhere has class C_r (no row) and is ignored by the step."""
        cols = stats["top_negative_col"]                                    # (Bg, h) column of view_rows
        ids = torch.where(cols >= 0, view_rows[cols.clamp_min(0)] + self.shard.start, torch.full_like(cols, -1))
        world = self.state.head_world
        bg, h = ids.shape
        all_ids = all_gather_rows(ids, self.group).view(world, bg, h).permute(1, 0, 2).reshape(bg, world * h)
        all_cos = all_gather_rows(stats["top_negative_cos"].to(torch.float64), self.group)
        all_cos = all_cos.view(world, bg, h).permute(1, 0, 2).reshape(bg, world * h)
        local, local_id = local_targets(labels_global, self.shard)
        classes = torch.where(local, local_id, torch.full_like(local_id, self.shard.count))
        self._candidates.append(QueueCandidates(classes, all_ids, all_cos, x_hat))

    @torch.no_grad()
    def _metrics(self, active: ActiveSet, hard: torch.Tensor, x_hat: torch.Tensor,
                 centers: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global figures (one all-reduce of 6 numbers, results left on the device): queue fill, share
        of active negatives from the queue, mean cosine of (row, queued negative) and (row, random
        negative) pairs. The mean cosine over all rows and a set of columns is mean(x^) . sum(w^) / |set|:
        O(A * D). `centers (A, D)`: the active rows' values of this forward."""
        rows = active.rows
        a = rows.numel()
        w_hat = torch.nn.functional.normalize(centers.to(x_hat.dtype), dim=1)
        col_cos = w_hat @ x_hat.mean(0)                                     # (A,) mean cosine per column
        # flags per active column, with a spare column A for the rows that are not there
        hard_col = torch.zeros(a + 1, dtype=torch.bool, device=rows.device)
        hard_col.index_fill_(0, torch.searchsorted(rows, hard), True)
        pos_col = torch.zeros(a + 1, dtype=torch.bool, device=rows.device)
        target = active.target_col
        pos_col.index_fill_(0, torch.where(target >= 0, target, torch.full_like(target, a)), True)
        hard_col, pos_col = hard_col[:a], pos_col[:a]
        random_col = ~hard_col & ~pos_col
        f64 = dict(dtype=torch.float64, device=rows.device)
        figures = torch.stack([self._filled.to(**f64), torch.tensor(float(self.hard_queue.numel()), **f64),
                               hard_col.sum().to(**f64), random_col.sum().to(**f64),
                               (col_cos * hard_col).sum().to(**f64), (col_cos * random_col).sum().to(**f64)])
        all_reduce_(figures, self.group)
        filled, slots, n_hard, n_random, cos_hard, cos_random = figures.unbind()
        nan = torch.full_like(filled, math.nan)
        negatives = n_hard + n_random
        return {
            "active_classes": torch.tensor(float(active.num_active), dtype=torch.float64),
            "hard_queue_fill": filled / slots,
            "hard_negative_share": torch.where(negatives > 0, n_hard / negatives.clamp_min(1), torch.zeros_like(filled)),
            "hard_negative_cos": torch.where(n_hard > 0, cos_hard / n_hard.clamp_min(1), nan),
            "random_negative_cos": torch.where(n_random > 0, cos_random / n_random.clamp_min(1), nan),
        }

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        super().step(lr, grad_scale)
        candidates, self._candidates = self._candidates, []
        for c in candidates:
            self.merge_candidates(c.classes, c.ids, c.cos)
        if self.mutual.interaction == "refresh" and candidates:
            self.refresh_centers(torch.cat([c.classes for c in candidates]), torch.cat([c.x_hat for c in candidates]))

    def skip_step(self) -> None:
        super().skip_step()
        self._candidates.clear()

    @torch.no_grad()
    def merge_candidates(self, classes: torch.Tensor, ids: torch.Tensor, cos: torch.Tensor) -> None:
        """Merges candidate hard negatives into the queues of local classes.

        classes (R,) local class ids (may repeat; C_r: a row whose class lives elsewhere, ignored),
        ids (R, K) global class ids (-1 empty), cos (R, K). `score`: key (1 + cos) / 2 for candidates,
        stored score * decay for queued ids; `fifo`: candidates first (by cosine), then the queued ids
        in their order. Per class the Q distinct ids of best key."""
        if classes.numel() == 0:
            return
        mc = self.mutual
        count = self.shard.count
        local = classes < count
        index = classes.clamp_max(count - 1)
        old_ids = self.hard_queue.index_select(0, index).to(torch.long)                     # (R, Q)
        old_ids = torch.where(local[:, None], old_ids, torch.full_like(old_ids, -1))
        if mc.update == "score":
            old_key = self.hard_score.index_select(0, index).to(torch.float64) * mc.decay
            new_key = (1.0 + cos.to(torch.float64)) / 2.0
        else:
            old_key = -torch.arange(mc.queue_size, dtype=torch.float64, device=old_ids.device).expand_as(old_ids)
            new_key = 2.0 + cos.to(torch.float64)
        own = (classes + self.shard.start)[:, None]
        new_ids = torch.where((ids == own) | ~local[:, None], torch.full_like(ids, -1), ids)  # never a class's own id
        out_ids, out_key = merge_queue_rows(old_ids, old_key, classes, new_ids, new_key, mc.queue_size,
                                            self.num_classes)
        first = class_representatives(classes, local)
        self._filled += ((out_ids >= 0).sum(1) - (old_ids >= 0).sum(1)).mul(first).sum()
        copy_rows_(self.hard_queue, index, out_ids, local)
        if self.hard_score is not None:
            copy_rows_(self.hard_score, index, out_key, local)

    @torch.no_grad()
    def refresh_centers(self, classes: torch.Tensor, x_hat: torch.Tensor) -> None:
        """M1: W_c <- |W_c| * normalize((1 - alpha) W_c / |W_c| + alpha * mean x^ of class c), for the
        local classes of the step's rows (C_r: a row of another rank's class, ignored). The row keeps
        its norm (so the optimizer's effective step on it is unchanged); its momentum is left as it is."""
        alpha = self.mutual.refresh_alpha
        count = self.shard.count
        local = classes < count
        # rows grouped by class: a fixed-size sort, group g of each row, sums and counts per group
        order = torch.argsort(classes, stable=True)
        group = torch.empty_like(classes).scatter_(0, order, run_starts(classes[order]).long().cumsum(0) - 1)
        sums = torch.zeros(classes.numel(), x_hat.shape[1], dtype=torch.float64, device=x_hat.device)
        sums.index_add_(0, group, x_hat.to(torch.float64))
        sizes = torch.zeros(classes.numel(), dtype=torch.float64, device=x_hat.device)
        sizes.index_add_(0, group, torch.ones_like(sizes))
        mean = (sums / sizes.clamp_min(1)[:, None]).index_select(0, group)                  # (R, D)
        index = classes.clamp_max(count - 1)
        w = self.bank.weight.index_select(0, index).to(torch.float64)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-12)
        direction = torch.nn.functional.normalize((1.0 - alpha) * w / norm + alpha * mean, dim=1, eps=1e-12)
        copy_rows_(self.bank.weight, index, direction * norm, local)

    # -- checkpoint ----------------------------------------------------------------------------
    def sharded_state(self) -> dict:
        state = super().sharded_state()
        state["hard_queue"] = self.hard_queue
        if self.hard_score is not None:
            state["hard_score"] = self.hard_score
        return state

    def load_sharded_state(self, state: dict) -> None:
        super().load_sharded_state(state)
        keys = ["hard_queue"] + (["hard_score"] if self.hard_score is not None else [])
        for key in keys:
            if key not in state:
                raise ValueError(f"head state for classes [{self.shard.start}, {self.shard.stop}) has no "
                                 f"{key!r} (mutual head with update={self.mutual.update!r})")
            if tuple(state[key].shape) != tuple(self.hard_queue.shape):
                raise ValueError(f"head state {key!r} has shape {tuple(state[key].shape)}, expected "
                                 f"{tuple(self.hard_queue.shape)} (classes x queue_size)")
            getattr(self, key).copy_(state[key])
        self._filled = (self.hard_queue >= 0).sum()
