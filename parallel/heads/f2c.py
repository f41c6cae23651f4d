"""F2C, fast face classification (Wang et al., CVPR 2022): a dynamic class pool instead of class weights.

Probe net P (the trained backbone, used for evaluation) and gallery net G (its EMA, alpha = 0.99).
Per rank, the dual loaders give two aligned image sets x and y, each [identity-loader image (B),
instance half (B/2)]: identity pairs put two images of one identity at the same position of x and
y, the instance halves are ordinary samples. The engine concatenates them and passes

    x (n, D)              = P(cat[x_images, y_images])   n = 2 * (B + B/2), with gradient
    labels (n,)           = cat[x_labels, y_labels]
    batch["gallery"] (n, D) = G(cat[x_images, y_images])  no gradient

Dynamic class pool: K slots x 2 versions x D over all ranks; identity i lives only on the rank that
owns class i (`class_owner`, the same ranges as the parametric bank), which keeps about K/W slots,
each with its identity, a toggle and a recency tick. The gallery rows of a direction are written as
one batch (the rows of this rank's identities, in global batch order: rank order, then row):
- each distinct identity u with k rows is a hit if it is in the pool, else a miss; if there are
  more distinct identities than this rank has slots (S), only the S written last (by last row) are
  kept, as if the earlier ones had been written and evicted;
- misses, by first row, take the free slots (lowest first), then the slots of the least recently
  used identities that this batch does not write (evicted);
- u's rows write versions t, 1 - t, t, ... in row order (t = the slot's toggle for a hit, 0 for a
  miss: a miss's first row writes version 0); the toggle becomes (t + k) mod 2 and the slot is
  "refreshed" if it was a hit or k >= 2; u becomes the most recently used, by its last row.
This is the order of writing the rows one at a time except that a batch never evicts an identity it
writes, and it is computed with fixed-size sorts and scatters on the device (no host read, no
data-dependent shape).

One direction (probes p, gallery g): write g into the pool, then over two views of the pool,
view 0 = every occupied slot's version 0 and view 1 = version 1 for the slots refreshed in this
direction, version 0 elsewhere:
- probes whose identity is in the pool: margin softmax over the occupied slots (s = 32, ArcFace
  m = 0.5 by default), target = the identity's slot; mean over those probes (every slot is a column,
  the free ones excluded, so the columns' shape does not depend on the data);
- probes whose identity is not in the pool: outlier loss, the mean over those probes and their h
  highest cosines over the view of max(cos, 0), h = clip(floor(0.0002 K), 3, 10) (fewer if the pool
  holds fewer slots); gradient to the probes only;
direction loss = sum over both views of (softmax + outlier). Slots never written are not columns.

Each step runs x -> y (probes P(x), gallery G(y)) then y -> x; the first direction's writes are
tentative: they are computed as an overlay on the committed pool and dropped, so the second
direction starts from the committed pool, and its writes are committed by `step()` (with gradient
accumulation, when the next micro-batch starts; `skip_step()` drops the last micro-batch's writes
only). The loss is the sum of both directions. K >= 1.5 * Bg (Bg = gallery rows of one direction over all ranks) is
required (checked at the first step).

Checkpoint state (`sharded_state`): the occupied slots keyed by identity, in LRU order,
`identities (n,)`, `features (n, 2, D)`, `toggle (n,)`, `last_used (n,)` (a global recency tick); the
tables of all ranks concatenated (`merge_states`) load at any world size: each rank keeps the
identities it owns, the most recently used ones if there are more than its slots.

A bad label is found on the gathered batch (on an accelerator reported a step later through
`errors`, its row left out of the loss and of the pool meanwhile; every rank raises the same error).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.collectives import all_gather_rows, all_reduce_, gather_batch
from parallel.groups import ParallelState
from parallel.heads.base import HeadOutput, check_labels
from parallel.heads.config import F2cConfig, HeadConfig
from parallel.heads.memory import MemoryHead
from parallel.heads.mutual import run_starts
from parallel.host_sync import DeferredErrors
from parallel.sharding import ClassShard, class_owner
from parallel.softmax import margin_softmax_loss

TICK_STRIDE = 1 << 24   # recency tick = commit count * TICK_STRIDE + the identity's last row in the commit
_LAST = torch.iinfo(torch.long).max


@dataclass
class PoolWrites:
    """One direction's writes as an overlay on the committed pool (nothing of the pool is mutated):
    every slot's state after them, and per distinct identity of the batch (Bg places, the unused ones
    pointing at the scratch slot S) its slot and the gallery rows that write its two versions."""

    identity: torch.Tensor    # (S,) long, -1 for a free slot
    toggle: torch.Tensor      # (S,) long: the version the slot's next hit writes
    last_used: torch.Tensor   # (S,) long recency tick
    slot: torch.Tensor        # (Bg,) long: the identity's slot, S where none
    rows: torch.Tensor        # (2, Bg) long: the gallery row written into version 0 / 1 of `slot`, -1 for none
    refreshed: torch.Tensor   # (Bg,) long: `slot` where view 1 shows version 1, else S
    gallery: torch.Tensor     # (Bg, D) this direction's gallery rows, L2-normalized

    def written(self, v: int, scratch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(destination slots (Bg,), rows (Bg, D)) of version v's writes; no write goes to `scratch`."""
        rows = self.rows[v]
        return (torch.where(rows >= 0, self.slot, scratch),
                self.gallery.index_select(0, rows.clamp_min(0)).to(dtype))


def _per_run(values: torch.Tensor, run: torch.Tensor, runs: int, reduce: str, fill: int) -> torch.Tensor:
    """(runs,) `reduce` ("amin", "amax", "sum") of `values (N,)` over each run id `run (N,)`."""
    out = torch.full((runs,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, run, values, reduce, include_self=reduce != "sum")


class F2cHead(MemoryHead):
    name = "f2c"
    needs = ("gallery",)
    sampling = "dual"

    def __init__(self, cfg: HeadConfig, state: ParallelState, num_classes: int, embedding_size: int):
        options = F2cConfig.from_extra(cfg.extra)
        super().__init__(cfg, state, num_classes, embedding_size, options)
        self.pool_size = options.pool_size
        self.slots = ClassShard(self.pool_size, self.world, self.rank).count
        if self.slots == 0:
            raise ValueError(f"head.extra.pool_size: {self.pool_size} slots cannot be split over {self.world} ranks")
        self.hard = options.hard_count
        d = embedding_size
        # the pool, plus one scratch slot (index S) that the writes of nothing go to
        self.register_buffer("pool_rows", torch.zeros(self.slots + 1, 2, d, dtype=self.storage_dtype,
                                                      device=self.device))
        self.register_buffer("slot_identity", torch.full((self.slots,), -1, dtype=torch.long, device=self.device))
        self.register_buffer("toggle", torch.zeros(self.slots, dtype=torch.long, device=self.device))
        self.register_buffer("last_used", torch.full((self.slots,), -1, dtype=torch.long, device=self.device))
        self.commits = 0
        self.errors = DeferredErrors()   # input errors found on an accelerator, raised a step later

    # -- the pool ------------------------------------------------------------------------------
    @property
    def pool(self) -> torch.Tensor:
        """(S, 2, D) every slot's two versions."""
        return self.pool_rows[:self.slots]

    def plan(self, identities: torch.Tensor, mine: torch.Tensor, gallery: torch.Tensor) -> PoolWrites:
        """The writes of one direction's gallery rows `gallery (Bg, D)` with `identities (Bg,)`, the rows
        with `mine (Bg,)` False being another rank's (or left out): the rules of the module docstring."""
        s, bg, dev = self.slots, identities.numel(), identities.device
        position = torch.arange(bg, device=dev)
        # rows by identity (row order within one); another rank's rows sort last, as one run
        key, order = torch.sort(torch.where(mine, identities, _LAST), stable=True)
        run = torch.cumsum(run_starts(key), 0) - 1                                        # (Bg,) run of each
        first_at = _per_run(position, run, bg, "amin", bg)            # per run: its first place in `order`
        count = _per_run(torch.ones_like(position), run, bg, "sum", 0)
        ident = _per_run(key, run, bg, "amax", -1)
        exists = (count > 0) & (ident != _LAST)
        last_row = order[(first_at + count - 1).clamp(0, max(bg - 1, 0))]                # its last row
        first_row = order[first_at.clamp(max=max(bg - 1, 0))]
        # committed slots of the batch's identities
        by_identity, slot_of_sorted = torch.sort(self.slot_identity)
        at = torch.searchsorted(by_identity, ident.clamp(max=_LAST - 1)).clamp(max=s - 1)
        hit = exists & (by_identity[at] == ident)
        hit_slot = slot_of_sorted[at]
        # more identities than slots: keep the s written last
        by_recency = torch.argsort(torch.where(exists, last_row, -1), descending=True, stable=True)
        recency = torch.empty_like(by_recency).scatter_(0, by_recency, position)
        kept = exists & (recency < s)
        kept_hit, kept_miss = kept & hit, kept & ~hit
        # slots misses may take: free ones (lowest first), then those of identities this batch does not
        # write, least recently used first
        taken = torch.zeros(s + 1, dtype=torch.bool, device=dev)
        taken = taken.scatter_(0, torch.where(kept_hit, hit_slot, s), True)[:s]
        slot_index = torch.arange(s, device=dev)
        priority = torch.where(self.slot_identity < 0, slot_index - (1 << 62),
                               torch.where(taken, torch.full_like(slot_index, 1 << 62), self.last_used))
        candidates = torch.argsort(priority, stable=True)
        by_first = torch.argsort(torch.where(kept_miss, first_row, bg), stable=True)
        miss_rank = torch.empty_like(by_first).scatter_(0, by_first, position)
        slot = torch.where(kept_hit, hit_slot, candidates[miss_rank.clamp(max=s - 1)])
        slot = torch.where(kept, slot, s)                                       # s: a scratch entry
        # versions: rows write t, 1 - t, ...; the last row writes (t + k - 1) mod 2, the one before the other
        t = torch.where(kept_hit, self.toggle[hit_slot], 0)
        last_version = (t + count - 1) % 2
        before_last = torch.where(count >= 2, order[(first_at + count - 2).clamp(0, max(bg - 1, 0))], -1)
        rows = torch.stack([torch.where(last_version == 0, last_row, before_last),
                            torch.where(last_version == 1, last_row, before_last)])

        def after(values: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return torch.cat([values, values[:1]]).scatter_(0, slot, new)[:s]

        return PoolWrites(identity=after(self.slot_identity, ident),
                          toggle=after(self.toggle, (t + count) % 2),
                          last_used=after(self.last_used, self.commits * TICK_STRIDE + last_row),
                          slot=slot, rows=rows, refreshed=torch.where(kept_hit | (count >= 2), slot, s),
                          gallery=gallery)

    def views(self, writes: PoolWrites) -> tuple[torch.Tensor, torch.Tensor]:
        """(view 0, view 1), each (S, D) in the storage dtype: every slot's version 0 after the writes,
        and version 1 where refreshed (version 0 elsewhere)."""
        s = self.slots
        view0 = torch.empty_like(self.pool_rows[:, 0]).copy_(self.pool_rows[:, 0])        # (S + 1, D)
        view0.index_copy_(0, *writes.written(0, s, view0.dtype))
        view1 = view0.clone()
        dst, rows = writes.written(1, s, view1.dtype)
        version1 = torch.where((dst < s)[:, None], rows, self.pool_rows[writes.slot, 1])   # (Bg, D)
        view1.index_copy_(0, writes.refreshed, version1)
        return view0[:s], view1[:s]

    def slot_of(self, writes: PoolWrites, identities: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        """(N,) the slot of each identity after the writes, -1 where it is not in this rank's pool."""
        by_identity, slot_of_sorted = torch.sort(writes.identity)
        at = torch.searchsorted(by_identity, identities).clamp(max=self.slots - 1)
        found = mine & (by_identity[at] == identities)
        return torch.where(found, slot_of_sorted[at], -1)

    # -- the step ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor, batch: dict | None = None) -> HeadOutput:
        self.errors.raise_ready()
        labels = self.check_inputs(x, labels, check_range=False)
        n = x.shape[0]
        if n % 2:
            raise ValueError(f"the f2c head takes cat[x side, y side] embeddings: an even row count, got {n}")
        half = n // 2
        bg = half * self.world
        if self.pool_size < 1.5 * bg:
            raise ValueError(f"head.extra.pool_size: {self.pool_size} < 1.5 x {bg}, the gallery rows of one "
                             f"direction over all ranks ({self.world} ranks x {half}); F2C needs K >= 1.5 Bg")
        gallery = self.batch_tensor(batch, "gallery", n)
        if self._pending:
            # gradient accumulation: the previous micro-batch's writes become visible to this one (a
            # plan is an overlay on the committed pool, so it cannot stack on another pending plan)
            MemoryHead.step(self)
        x_global = gather_batch(x, self.group, grad_scale=float(self.state.data_world))   # (W n, D)
        labels_global = all_gather_rows(labels, self.group)                               # (W n,)
        good = ~check_labels(labels_global, self.num_classes, None, self.errors, rows_per_rank=n)
        gallery_global = F.normalize(all_gather_rows(gallery.to(self.acc_dtype).contiguous(), self.group), dim=1)
        base = torch.arange(self.world, device=x.device)[:, None] * n
        side_x = (base + torch.arange(half, device=x.device)[None, :]).flatten()          # (Bg,)
        side_y = side_x + half
        ids = labels_global.clamp(0, self.num_classes - 1)
        mine = good & (class_owner(ids, self.num_classes, self.world) == self.rank)

        total = x.new_zeros((), dtype=self.acc_dtype)
        stats = {}
        committed = None
        for name, probe, gal in (("xy", side_x, side_y), ("yx", side_y, side_x)):
            committed = self.plan(ids[gal], mine[gal], gallery_global[gal])
            loss, parts = self.direction_loss(committed, x_global[probe], ids[probe], mine[probe], good[probe])
            total = total + loss
            stats.update({f"{name}_{k}": v for k, v in parts.items()})
        self._pending.append(committed)                # x -> y was tentative: only y -> x is committed
        self.active_columns = 2 * self.slots           # two views, each over every slot
        return HeadOutput(total, stats)

    def direction_loss(self, writes: PoolWrites, probes: torch.Tensor, probe_ids: torch.Tensor,
                       probe_mine: torch.Tensor, probe_good: torch.Tensor):
        target_col = self.slot_of(writes, probe_ids, probe_mine)                          # (Np,)
        in_pool = all_reduce_((target_col >= 0).to(self.acc_dtype), self.group) > 0      # (Np,)
        outlier = probe_good & ~in_pool
        occupied = writes.identity >= 0                                                  # (S,)
        columns = all_reduce_(occupied.sum().to(self.acc_dtype), self.group)             # () over all ranks
        view0, view1 = self.views(writes)
        # free slots are columns no row sees: excluded through the softmax's label exclusion (every row
        # label 0, free columns 0, occupied 1; a row's target is never excluded)
        column_labels = occupied.long()
        row_labels = torch.zeros_like(probe_ids)
        loss = probes.new_zeros((), dtype=self.acc_dtype)
        parts = {"in_pool": in_pool.to(torch.float32).mean()}
        for v, view in enumerate((view0, view1)):
            ce = margin_softmax_loss(probes, view.to(self.acc_dtype), target_col, margin=self.margin,
                                     group=self.group, chunk_size=self.cfg.chunk_size,
                                     cache_bytes=self.cfg.logit_cache_bytes, compute_dtype=self.compute_dtype,
                                     column_labels=column_labels, row_labels=row_labels,
                                     valid=in_pool & probe_good, errors=self.errors)
            out = self.outlier_loss(probes, outlier, view, occupied, columns)
            loss = loss + ce + out
            parts[f"view{v}_softmax"] = ce.detach()
            parts[f"view{v}_outlier"] = out.detach()
        return loss, parts

    def outlier_loss(self, probes: torch.Tensor, outlier: torch.Tensor, view: torch.Tensor,
                     occupied: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Mean over the `outlier (N,)` probes of `probes (N, D)` and their h highest cosines over all
        ranks' occupied columns of max(cos, 0), h = min(hard, columns). Each rank backpropagates
        through its own winning columns only; ties go to the lower rank. Fixed shapes: h = hard
        places per probe, those beyond the occupied columns at -inf (they add 0)."""
        n, h = probes.shape[0], self.hard
        p_hat = F.normalize(probes.to(self.acc_dtype), dim=1)                              # (N, D)
        w_hat = F.normalize(view.to(self.acc_dtype), dim=1)                                # (S, D)
        k = min(h, w_hat.shape[0])
        with torch.no_grad():                  # find the winners without a (N, S) autograd graph
            cos = (p_hat @ w_hat.t()).masked_fill_(~occupied[None, :], float("-inf"))
            top, top_col = cos.topk(k, dim=1)
        # the winners' cosines again, differentiable: (N, k) dot products instead of a (N, S) backward
        cos_top = (p_hat[:, None, :] * w_hat[top_col]).sum(-1)
        padded = torch.cat([top, top.new_full((n, h - k), float("-inf"))], 1)            # (N, h)
        every = all_gather_rows(padded.t().contiguous(), self.group).t()                  # (N, W h) rank-major
        order = torch.argsort(every, dim=1, descending=True, stable=True)[:, :h]
        chosen = torch.zeros_like(every, dtype=torch.bool).scatter_(1, order, True)
        counted = chosen[:, self.rank * h:self.rank * h + k] & torch.isfinite(top) & outlier[:, None]
        h_used = torch.clamp(columns, max=h).clamp_min(1.0)
        count = (outlier.to(self.acc_dtype).sum().clamp_min(1.0)) * h_used
        local = torch.where(counted, cos_top.clamp_min(0.0), 0.0).sum() / count
        # the loss every rank holds is the sum over ranks; the gradient of each term stays local
        return local + (all_reduce_(local.detach().clone(), self.group) - local.detach())

    @torch.no_grad()
    def commit(self, writes: PoolWrites) -> None:
        for v in (0, 1):
            self.pool_rows[:, v].index_copy_(0, *writes.written(v, self.slots, self.pool_rows.dtype))
        self.slot_identity.copy_(writes.identity)
        self.toggle.copy_(writes.toggle)
        self.last_used.copy_(writes.last_used)
        self.commits += 1

    # -- checkpoint ------------------------------------------------------------------------------
    def lru_slots(self) -> torch.Tensor:
        """The occupied slots, least recently used first (a host read: for checkpoints, not the step)."""
        occupied = (self.slot_identity >= 0).nonzero().flatten()
        return occupied[torch.argsort(self.last_used[occupied])]

    def sharded_state(self) -> dict:
        slots = self.lru_slots()
        return {"kind": "f2c_pool", "pool_size": self.pool_size, "world_size": self.world, "rank": self.rank,
                "commits": self.commits, "identities": self.slot_identity[slots].cpu(),
                "features": self.pool[slots].cpu(), "toggle": self.toggle[slots].cpu(),
                "last_used": self.last_used[slots].cpu(),
                # slot layout, so a rank reloading its own state resumes with the same column order
                "slots": slots.cpu()}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        out = {"kind": "f2c_pool", "pool_size": states[0]["pool_size"], "world_size": None,
               "commits": max(int(s["commits"]) for s in states)}
        for key in ("identities", "features", "toggle", "last_used"):
            out[key] = torch.cat([s[key] for s in states])
        return out

    @torch.no_grad()
    def load_sharded_state(self, state: dict) -> None:
        """Loads slots keyed by identity (this rank's own state or `merge_states` of any world size):
        keeps the identities this rank owns, the most recently used ones if they are more than its slots."""
        if state.get("kind") != "f2c_pool":
            raise ValueError("not an F2C pool state (kind != 'f2c_pool')")
        ids = state["identities"]
        if state.get("world_size") == self.world and state.get("rank") == self.rank and "slots" in state:
            slots = state["slots"].to(device=self.pool.device, dtype=torch.long)
            keep = torch.arange(ids.numel())
        else:
            owned = class_owner(ids, self.num_classes, self.world) == self.rank
            order = torch.argsort(state["last_used"][owned])
            keep = owned.nonzero().flatten()[order][-self.slots:]                 # LRU first, newest kept
            slots = torch.arange(keep.numel(), device=self.pool.device)
        self.pool_rows.zero_()
        self.slot_identity.fill_(-1)
        self.toggle.zero_()
        self.last_used.fill_(-1)
        self.pool[slots] = state["features"][keep].to(self.pool)
        self.slot_identity[slots] = ids[keep].to(self.slot_identity)
        self.toggle[slots] = state["toggle"][keep].to(self.toggle)
        self.last_used[slots] = state["last_used"][keep].to(self.last_used)
        self.commits = int(state["commits"])
