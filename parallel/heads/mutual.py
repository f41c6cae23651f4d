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
Selection and merge are deterministic given the per-rank random stream of Partial FC.
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
from parallel.softmax import margin_softmax_loss

EMPTY_SCORE = -1.0  # score of an empty slot; real scores are (1 + cos) / 2 * decay^k >= 0


@dataclass
class QueueCandidates:
    """What one forward sends to this rank's queues: rows whose class this rank owns."""

    classes: torch.Tensor   # (R,) local class id of each row
    ids: torch.Tensor       # (R, W*h) global ids of the hardest negatives every rank saw, -1 empty
    cos: torch.Tensor       # (R, W*h) their cosines
    x_hat: torch.Tensor     # (R, D) normalized embeddings of those rows (M1 refresh)


def merge_queue_rows(old_ids: torch.Tensor, old_key: torch.Tensor, group: torch.Tensor,
                     new_ids: torch.Tensor, new_key: torch.Tensor, queue_size: int):
    """Merges candidates into queue rows: per row, distinct ids by best key, the `queue_size` best
    (key descending, ties to the lower id).

    old_ids, old_key (U, Q): current rows (-1 ids ignored); group (N,) row in [0, U) of each
    candidate new_ids (N,), new_key (N,) (-1 ids ignored). Returns ids (U, Q) long, keys (U, Q)
    float64 (EMPTY_SCORE on empty slots)."""
    u_count, q = old_ids.shape
    device = old_ids.device
    u = torch.cat([torch.arange(u_count, device=device).repeat_interleave(q), group])
    ids = torch.cat([old_ids.reshape(-1), new_ids])
    key = torch.cat([old_key.reshape(-1), new_key]).to(torch.float64)
    keep = ids >= 0
    u, ids, key = u[keep], ids[keep], key[keep]
    # distinct (row, id), best key first
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(ids[order], stable=True)]
    order = order[torch.argsort(u[order], stable=True)]
    u, ids, key = u[order], ids[order], key[order]
    first = torch.ones_like(keep[:u.numel()])
    first[1:] = (u[1:] != u[:-1]) | (ids[1:] != ids[:-1])
    u, ids, key = u[first], ids[first], key[first]
    # per row: key descending, ties to the lower id (ids are ascending within a row already)
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(u[order], stable=True)]
    u, ids, key = u[order], ids[order], key[order]
    pos = torch.arange(u.numel(), device=device) - torch.searchsorted(u, u)
    sel = pos < queue_size
    out_ids = torch.full((u_count, queue_size), -1, dtype=torch.long, device=device)
    out_key = torch.full((u_count, queue_size), EMPTY_SCORE, dtype=torch.float64, device=device)
    out_ids[u[sel], pos[sel]] = ids[sel]
    out_key[u[sel], pos[sel]] = key[sel]
    return out_ids, out_key


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
        self._filled = 0                       # non-empty slots of this rank's queues
        self._candidates: list[QueueCandidates] = []

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
        table = torch.full((labels_global.numel(), self.mutual.queue_size), -1, dtype=torch.long,
                           device=labels_global.device)
        table[local] = self.hard_queue[local_id[local]].to(torch.long)
        return all_reduce_(table, self.group, op=dist.ReduceOp.MAX)

    def hard_rows(self, table: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Local rows of the published queued negatives living here, not positives, best first:
        lowest slot over all rows naming it, then lowest id; capped by hard_share and by the room
        floor(rho * C_r) leaves after the positives."""
        n = self.num_sample
        cap = min(int(math.floor(self.mutual.hard_share * n)), max(0, n - positives.numel()))
        if cap == 0:
            return torch.empty(0, dtype=torch.long, device=table.device)
        slot = torch.arange(table.shape[1], device=table.device).expand_as(table)
        mine = (table >= self.shard.start) & (table < self.shard.stop)
        rows, slots = table[mine] - self.shard.start, slot[mine]
        is_positive = torch.zeros(self.shard.count, dtype=torch.bool, device=table.device)
        is_positive[positives] = True
        keep = ~is_positive[rows]
        rows, slots = rows[keep], slots[keep]
        if rows.numel() == 0:
            return rows
        unique_rows, inverse = torch.unique(rows, return_inverse=True)
        best = torch.full_like(unique_rows, table.shape[1]).scatter_reduce(0, inverse, slots, "amin")
        order = torch.argsort(best * self.shard.count + unique_rows)
        return unique_rows[order[:cap]]

    def select_with_queue(self, labels_global: torch.Tensor) -> tuple[ActiveSet, torch.Tensor]:
        """(active set, hard local rows activated)."""
        table = self.publish_queues(labels_global)
        local, local_id = local_targets(labels_global, self.shard)
        positives = torch.unique(local_id[local])
        hard = self.hard_rows(table, positives)
        return sample_rows(labels_global, self.shard, self.num_sample, self.generator, forced=hard), hard

    def select(self, labels_global):
        return self.select_with_queue(labels_global)[0]

    # -- the step ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor, batch: dict | None = None) -> HeadOutput:
        mc = self.mutual
        x_global, labels_global = self.gather_inputs(x, labels)               # (Bg, D), (Bg,)
        active, hard = self.select_with_queue(labels_global)
        softmax = dict(margin=self.margin, group=self.group, chunk_size=self.cfg.chunk_size,
                       cache_bytes=self.cfg.logit_cache_bytes, compute_dtype=self.compute_dtype)
        stats: dict = {}
        out_stats: dict[str, torch.Tensor] = {}
        if mc.interaction == "dual":
            # M3: features see the hard-negative set with centers detached; centers see an independent
            # uniform set with features detached
            center_view = sample_rows(labels_global, self.shard, self.num_sample, self.generator)
            rows = torch.unique(torch.cat([active.rows, center_view.rows]))   # sorted union (A,)
            centers = self.active_centers(rows, out=self._spare_rows)
            feature_cols = torch.searchsorted(rows, active.rows)
            center_cols = torch.searchsorted(rows, center_view.rows)
            loss_x = margin_softmax_loss(x_global, centers[feature_cols].detach(), active.target_col,
                                         stats=stats, top_negatives=mc.top_h, **softmax)
            loss_w = margin_softmax_loss(x_global.detach(), centers[center_cols], center_view.target_col,
                                         **softmax)
            loss = loss_x + loss_w
            out_stats.update(loss_feature_view=loss_x.detach(), loss_center_view=loss_w.detach())
        else:
            rows = active.rows
            centers = self.active_centers(rows, out=self._spare_rows)
            loss = margin_softmax_loss(x_global, centers, active.target_col, stats=stats,
                                       top_negatives=mc.top_h, **softmax)
            if mc.interaction == "pull":
                pull = self.pull_loss(x_global, centers, active.target_col)
                out_stats["pull_loss"] = pull.detach()
                loss = loss + pull
        self._spare_rows = None
        self._pending.append((rows, centers))
        self.last_active, self.last_hard = active, hard
        x_hat = torch.nn.functional.normalize(x_global.detach().to(centers.dtype), dim=1, eps=1e-12)
        self._route_candidates(labels_global, active.rows, stats, x_hat)
        out_stats.update(self._metrics(active, hard, x_hat))
        return HeadOutput(loss, out_stats)

    def pull_loss(self, x_global: torch.Tensor, centers: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
        """M2: pull_weight * mean over rows of (1 - cos(x_i, W_yi)), each row's term computed by the
        owner of its class, summed over ranks (same value everywhere; each rank's backward reaches its
        own positive centers and its share of x_global)."""
        has = target_col >= 0
        x_hat = torch.nn.functional.normalize(x_global[has].to(centers.dtype), dim=1, eps=1e-12)
        w_hat = torch.nn.functional.normalize(centers[target_col[has]], dim=1, eps=1e-12)
        term = (1.0 - (x_hat * w_hat).sum(1)).sum() * (self.mutual.pull_weight / target_col.numel())
        return reduce_to_replicated(term, self.group)

    def _route_candidates(self, labels_global, view_rows, stats, x_hat) -> None:
        """Sends every rank's top-h negatives (global ids, cosines) of each row to the row's owner:
        an all-gather of (Bg, h), O(W * Bg * h) and independent of C."""
        cols = stats["top_negative_col"]                                    # (Bg, h) column of view_rows
        ids = torch.where(cols >= 0, view_rows[cols.clamp_min(0)] + self.shard.start, torch.full_like(cols, -1))
        world = self.state.head_world
        bg, h = ids.shape
        all_ids = all_gather_rows(ids, self.group).view(world, bg, h).permute(1, 0, 2).reshape(bg, world * h)
        all_cos = all_gather_rows(stats["top_negative_cos"].to(torch.float64), self.group)
        all_cos = all_cos.view(world, bg, h).permute(1, 0, 2).reshape(bg, world * h)
        local, local_id = local_targets(labels_global, self.shard)
        self._candidates.append(QueueCandidates(local_id[local], all_ids[local], all_cos[local], x_hat[local]))

    @torch.no_grad()
    def _metrics(self, active: ActiveSet, hard: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global figures (one all-reduce of 6 numbers): queue fill, share of active negatives from the
        queue, mean cosine of (row, queued negative) and (row, random negative) pairs. The mean
        cosine over all rows and a set of columns is mean(x^) . sum(w^) / |set|: O(A * D)."""
        is_pos = torch.zeros(self.shard.count, dtype=torch.bool, device=x_hat.device)
        rows = active.rows
        w_hat = torch.nn.functional.normalize(self.bank.weight.index_select(0, rows).to(x_hat.dtype), dim=1)
        mean_x = x_hat.mean(0)
        col_cos = w_hat @ mean_x                                            # (A,) mean cosine per column
        is_hard = torch.zeros(self.shard.count, dtype=torch.bool, device=x_hat.device)
        is_hard[hard] = True
        is_pos[rows[active.target_col[active.target_col >= 0]]] = True
        hard_col = is_hard[rows]
        random_col = ~hard_col & ~is_pos[rows]
        figures = torch.tensor([self._filled, self.hard_queue.numel(), float(hard_col.sum()),
                                float(random_col.sum()), 0.0, 0.0], dtype=torch.float64, device=x_hat.device)
        figures[4] = col_cos[hard_col].sum()
        figures[5] = col_cos[random_col].sum()
        all_reduce_(figures, self.group)
        filled, slots, n_hard, n_random, cos_hard, cos_random = figures.tolist()
        nan = float("nan")
        figures = {
            "active_classes": float(active.num_active),
            "hard_queue_fill": filled / slots,
            "hard_negative_share": n_hard / (n_hard + n_random) if n_hard + n_random else 0.0,
            "hard_negative_cos": cos_hard / n_hard if n_hard else nan,
            "random_negative_cos": cos_random / n_random if n_random else nan,
        }
        return {key: torch.tensor(value, dtype=torch.float64) for key, value in figures.items()}

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

        classes (R,) local class ids (may repeat), ids (R, K) global class ids (-1 empty), cos (R, K).
        `score`: key (1 + cos) / 2 for candidates, stored score * decay for queued ids; `fifo`: candidates
        first (by cosine), then the queued ids in their order. Per class the Q distinct ids of best key."""
        if classes.numel() == 0:
            return
        mc = self.mutual
        touched, inverse = torch.unique(classes, return_inverse=True)         # (U,), (R,)
        old_ids = self.hard_queue[touched].to(torch.long)                       # (U, Q)
        if mc.update == "score":
            old_key = self.hard_score[touched].to(torch.float64) * mc.decay
            new_key = (1.0 + cos.to(torch.float64)) / 2.0
        else:
            old_key = -torch.arange(mc.queue_size, dtype=torch.float64, device=old_ids.device).expand_as(old_ids)
            new_key = 2.0 + cos.to(torch.float64)
        k = ids.shape[1]
        new_ids = ids.reshape(-1)
        own = (touched + self.shard.start)[inverse].repeat_interleave(k)
        new_ids = torch.where(new_ids == own, torch.full_like(new_ids, -1), new_ids)  # never a class's own id
        out_ids, out_key = merge_queue_rows(old_ids, old_key, inverse.repeat_interleave(k), new_ids,
                                            new_key.reshape(-1), mc.queue_size)
        self._filled += int((out_ids >= 0).sum()) - int((old_ids >= 0).sum())
        self.hard_queue[touched] = out_ids.to(self.hard_queue.dtype)
        if self.hard_score is not None:
            self.hard_score[touched] = out_key.to(self.hard_score.dtype)

    @torch.no_grad()
    def refresh_centers(self, classes: torch.Tensor, x_hat: torch.Tensor) -> None:
        """M1: W_c <- |W_c| * normalize((1 - alpha) W_c / |W_c| + alpha * mean x^ of class c), for the
        local classes of the step's rows. The row keeps its norm (so the optimizer's effective step on
        it is unchanged); its momentum is left as it is."""
        alpha = self.mutual.refresh_alpha
        touched, inverse = torch.unique(classes, return_inverse=True)
        sums = torch.zeros(touched.numel(), x_hat.shape[1], dtype=torch.float64, device=x_hat.device)
        sums.index_add_(0, inverse, x_hat.to(torch.float64))
        mean = sums / torch.bincount(inverse, minlength=touched.numel()).to(torch.float64)[:, None]
        w = self.bank.weight.index_select(0, touched).to(torch.float64)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-12)
        direction = torch.nn.functional.normalize((1.0 - alpha) * w / norm + alpha * mean, dim=1, eps=1e-12)
        self.bank.weight.index_copy_(0, touched, (direction * norm).to(self.bank.weight.dtype))

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
        self._filled = int((self.hard_queue >= 0).sum())
