"""F2C, fast face classification (Wang et al., CVPR 2022): a dynamic class pool instead of class weights.

Probe net P (the trained backbone, used for evaluation) and gallery net G (its EMA, alpha = 0.99).
Per rank, the dual loaders give two aligned image sets x and y, each [identity-loader image (B),
instance half (B/2)]: identity pairs put two images of one identity at the same position of x and
y, the instance halves are ordinary samples. The engine concatenates them and passes

    x (n, D)              = P(cat[x_images, y_images])   n = 2 * (B + B/2), with gradient
    labels (n,)           = cat[x_labels, y_labels]
    batch["gallery"] (n, D) = G(cat[x_images, y_images])  no gradient

Dynamic class pool: K slots x 2 versions x D over all ranks; identity i lives only on the rank that
owns class i (`class_owner`, the same ranges as the parametric bank), which keeps about K/W slots
and its own LRU map identity -> slot. Writing the gallery features of a direction, one gallery row
at a time in global batch order (rank order, then row), on the owner of the row's identity:
- miss (identity not in the pool): take a free slot, or evict the least recently used identity;
  write version 0, the slot's toggle becomes 1;
- hit: write version `toggle`, flip the toggle, the slot is "refreshed";
every write makes the identity the most recently used.

One direction (probes p, gallery g): write g into the pool, then over two views of the pool,
view 0 = every occupied slot's version 0 and view 1 = version 1 for the slots refreshed in this
direction, version 0 elsewhere:
- probes whose identity is in the pool: margin softmax over the occupied slots (s = 32, ArcFace
  m = 0.5 by default), target = the identity's slot; mean over those probes;
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

Checkpoint state (`sharded_state`): the occupied slots keyed by identity, `identities (n,)`,
`features (n, 2, D)`, `toggle (n,)`, `last_used (n,)` (a global recency tick); the tables of all
ranks concatenated (`merge_states`) load at any world size: each rank keeps the identities it owns,
the most recently used ones if there are more than its slots, in LRU order.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from parallel.collectives import all_gather_rows, all_reduce_, gather_batch
from parallel.groups import ParallelState
from parallel.heads.base import HeadOutput
from parallel.heads.config import F2cConfig, HeadConfig
from parallel.heads.memory import MemoryHead
from parallel.sharding import ClassShard, class_owner
from parallel.softmax import margin_softmax_loss

TICK_STRIDE = 1 << 24   # recency tick = commit count * TICK_STRIDE + order within the commit


@dataclass
class PoolPlan:
    """The writes of one direction as an overlay on the committed pool (nothing is mutated)."""

    writes: list = field(default_factory=list)        # (gallery row, slot, version) in order
    touched: OrderedDict = field(default_factory=OrderedDict)   # identity -> slot, by last write
    evicted: set = field(default_factory=set)          # committed identities pushed out
    slot_identity: dict = field(default_factory=dict)  # slot -> identity, for (re)assigned slots
    toggle: dict = field(default_factory=dict)         # slot -> next version to write
    refreshed: set = field(default_factory=set)        # slots hit in this direction
    free_used: int = 0                                 # free slots consumed (from the front)


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
        self.register_buffer("pool", torch.zeros(self.slots, 2, d, dtype=self.storage_dtype, device=self.device))
        self.register_buffer("slot_identity", torch.full((self.slots,), -1, dtype=torch.long, device=self.device))
        self.register_buffer("toggle", torch.zeros(self.slots, dtype=torch.long, device=self.device))
        self.register_buffer("last_used", torch.full((self.slots,), -1, dtype=torch.long, device=self.device))
        self.lru: OrderedDict[int, int] = OrderedDict()   # identity -> slot, least recently used first
        self.free: list[int] = list(range(self.slots))     # free slots, ascending
        self.commits = 0

    # -- the pool ------------------------------------------------------------------------------
    def plan(self, identities: list[int]) -> PoolPlan:
        """Writes of gallery rows with these identities (this rank's, in global order; None for a
        row owned elsewhere), as an overlay on the committed pool."""
        p = PoolPlan()
        toggles = self.toggle.tolist()
        victims = iter(list(self.lru.items()))
        for row, ident in enumerate(identities):
            if ident is None:
                continue
            if ident in p.touched:
                slot, hit = p.touched.pop(ident), True
            elif ident in self.lru and ident not in p.evicted:
                slot, hit = self.lru[ident], True
            else:
                hit = False
                if p.free_used < len(self.free):
                    slot = self.free[p.free_used]
                    p.free_used += 1
                else:
                    slot = None
                    for old, old_slot in victims:          # least recently used committed identity
                        if old not in p.touched:
                            p.evicted.add(old)
                            slot = old_slot
                            break
                    if slot is None:                        # every slot written in this direction already
                        old, slot = next(iter(p.touched.items()))
                        del p.touched[old]
                        if old in self.lru:
                            p.evicted.add(old)
                p.refreshed.discard(slot)
                p.slot_identity[slot] = ident
            version = p.toggle.get(slot, toggles[slot]) if hit else 0
            p.toggle[slot] = 1 - version
            if hit:
                p.refreshed.add(slot)
            p.touched[ident] = slot
            p.writes.append((row, slot, version))
        return p

    def lookup(self, plan: PoolPlan, ident: int) -> int | None:
        if ident in plan.touched:
            return plan.touched[ident]
        if ident in self.lru and ident not in plan.evicted:
            return self.lru[ident]
        return None

    def views(self, plan: PoolPlan, gallery: torch.Tensor):
        """(occupied slots (A,), view 0 (A, D), view 1 (A, D)) after the plan's writes; copies only
        the occupied slots' rows, never the whole pool."""
        occupied = self.slot_identity >= 0
        if plan.slot_identity:
            occupied[list(plan.slot_identity)] = True
        slots = occupied.nonzero().flatten()                                 # ascending
        last = {}
        for row, slot, version in plan.writes:
            last[(slot, version)] = row
        view0 = self.pool[slots, 0]                                          # (A, D) copy
        written0 = [(slot, row) for (slot, version), row in last.items() if version == 0]
        if written0:
            pos = torch.searchsorted(slots, torch.tensor([w[0] for w in written0], device=slots.device))
            view0[pos] = gallery[[w[1] for w in written0]].to(view0.dtype)
        view1 = view0.clone()
        if plan.refreshed:
            refreshed = sorted(plan.refreshed)
            pos = torch.searchsorted(slots, torch.tensor(refreshed, device=slots.device))
            view1[pos] = self.pool[refreshed, 1]
            written1 = [(slot, row) for (slot, version), row in last.items()
                        if version == 1 and slot in plan.refreshed]
            if written1:
                pos = torch.searchsorted(slots, torch.tensor([w[0] for w in written1], device=slots.device))
                view1[pos] = gallery[[w[1] for w in written1]].to(view1.dtype)
        return slots, view0, view1

    # -- the step ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor, batch: dict | None = None) -> HeadOutput:
        labels = self.check_inputs(x, labels)
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
        gallery_global = F.normalize(all_gather_rows(gallery.to(self.acc_dtype).contiguous(), self.group), dim=1)
        base = torch.arange(self.world, device=x.device)[:, None] * n
        side_x = (base + torch.arange(half, device=x.device)[None, :]).flatten()          # (Bg,)
        side_y = side_x + half
        owner = class_owner(labels_global, self.num_classes, self.world)
        mine = (owner == self.rank).tolist()
        ids = labels_global.tolist()

        total = x.new_zeros((), dtype=self.acc_dtype)
        stats = {}
        plans = []
        for name, probe, gal in (("xy", side_x, side_y), ("yx", side_y, side_x)):
            g_rows = gal.tolist()
            plan = self.plan([ids[r] if mine[r] else None for r in g_rows])
            plans.append((plan, gallery_global[gal]))
            loss, parts = self.direction_loss(plan, x_global[probe], labels_global[probe],
                                              [ids[r] for r in probe.tolist()], [mine[r] for r in probe.tolist()],
                                              gallery_global[gal])
            total = total + loss
            stats.update({f"{name}_{k}": v for k, v in parts.items()})
        self._pending.append(plans[1])                 # x -> y was tentative: only y -> x is committed
        return HeadOutput(total, stats)

    def direction_loss(self, plan: PoolPlan, probes: torch.Tensor, probe_labels: torch.Tensor,
                       probe_ids: list[int], probe_mine: list[bool], gallery: torch.Tensor):
        slots, view0, view1 = self.views(plan, gallery)
        self.active_columns = 2 * slots.numel()       # two views, each over the occupied slots
        column_of = {int(s): c for c, s in enumerate(slots.tolist())}
        target = []
        for ident, own in zip(probe_ids, probe_mine):
            slot = self.lookup(plan, ident) if own else None
            target.append(-1 if slot is None else column_of[slot])
        target_col = torch.tensor(target, dtype=torch.long, device=probes.device)
        in_pool = all_reduce_((target_col >= 0).to(self.acc_dtype), self.group) > 0       # (Np,)
        columns = all_reduce_(torch.tensor([float(slots.numel())], device=probes.device), self.group)
        h = min(self.hard, int(columns.item()))
        loss = probes.new_zeros((), dtype=self.acc_dtype)
        parts = {"in_pool": in_pool.to(torch.float32).mean()}
        for v, view in enumerate((view0, view1)):
            ce = margin_softmax_loss(probes, view.to(self.acc_dtype), target_col, margin=self.margin,
                                     group=self.group, chunk_size=self.cfg.chunk_size,
                                     cache_bytes=self.cfg.logit_cache_bytes,
                                     compute_dtype=self.compute_dtype, valid=in_pool)
            out = self.outlier_loss(probes[~in_pool], view, h)
            loss = loss + ce + out
            parts[f"view{v}_softmax"] = ce.detach()
            parts[f"view{v}_outlier"] = out.detach()
        return loss, parts

    def outlier_loss(self, probes: torch.Tensor, view: torch.Tensor, h: int) -> torch.Tensor:
        """Mean over probes (N, D) and their h highest cosines over all ranks' columns of max(cos, 0).
        Each rank backpropagates through its own winning columns only; ties go to the lower rank."""
        n = probes.shape[0]
        if n == 0 or h == 0:
            return probes.new_zeros((), dtype=self.acc_dtype).sum()
        p_hat = F.normalize(probes.to(self.acc_dtype), dim=1)                              # (N, D)
        w_hat = F.normalize(view.to(self.acc_dtype), dim=1)                                # (A, D)
        k = min(h, w_hat.shape[0])
        with torch.no_grad():                  # find the winners without a (N, A) autograd graph
            top, top_col = (p_hat @ w_hat.t()).topk(k, dim=1) if k else (p_hat.new_zeros(n, 0),) * 2
        # the winners' cosines again, differentiable: (N, k) dot products instead of a (N, A) backward
        top = (p_hat[:, None, :] * w_hat[top_col.long()]).sum(-1) if k else top
        padded = torch.cat([top.detach(), top.new_full((n, h - k), float("-inf"))], 1)     # (N, h)
        every = all_gather_rows(padded.t().contiguous(), self.group)                       # (W h, N)
        every = every.t()                                                                   # (N, W h) rank-major
        order = torch.argsort(every, dim=1, descending=True, stable=True)[:, :h]
        chosen = torch.zeros_like(every, dtype=torch.bool).scatter_(1, order, True)
        mine = chosen[:, self.rank * h:self.rank * h + k]                                   # (N, k)
        local = (top.clamp_min(0.0) * mine).sum() / (n * h)
        # the loss every rank holds is the sum over ranks; the gradient of each term stays local
        return local + (all_reduce_(local.detach().clone(), self.group) - local.detach())

    @torch.no_grad()
    def commit(self, item) -> None:
        plan, gallery = item
        for old in plan.evicted:
            slot = self.lru.pop(old)
            self.slot_identity[slot] = -1
        self.free = self.free[plan.free_used:]
        last = {}
        for row, slot, version in plan.writes:
            last[(slot, version)] = row
        if last:
            idx = torch.tensor(list(last.keys()), dtype=torch.long, device=self.pool.device)
            rows = torch.tensor(list(last.values()), dtype=torch.long, device=self.pool.device)
            self.pool[idx[:, 0], idx[:, 1]] = gallery[rows].to(self.pool.dtype)
        for slot, ident in plan.slot_identity.items():
            self.slot_identity[slot] = ident
        for slot, version in plan.toggle.items():
            self.toggle[slot] = version
        for order, (ident, slot) in enumerate(plan.touched.items()):
            self.lru.pop(ident, None)
            self.lru[ident] = slot
            self.last_used[slot] = self.commits * TICK_STRIDE + order
        self.commits += 1

    # -- checkpoint ------------------------------------------------------------------------------
    def sharded_state(self) -> dict:
        slots = torch.tensor(list(self.lru.values()), dtype=torch.long, device=self.pool.device)  # LRU order
        return {"kind": "f2c_pool", "pool_size": self.pool_size, "world_size": self.world, "rank": self.rank,
                "commits": self.commits, "identities": torch.tensor(list(self.lru.keys()), dtype=torch.long),
                "features": self.pool[slots].cpu(), "toggle": self.toggle[slots].cpu(),
                "last_used": self.last_used[slots].cpu(),
                # slot layout, so a rank reloading its own state resumes with the same column order
                "slots": slots.cpu(), "free": torch.tensor(self.free, dtype=torch.long)}

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
        keeps the identities this rank owns, the most recently used ones first, in LRU order."""
        if state.get("kind") != "f2c_pool":
            raise ValueError("not an F2C pool state (kind != 'f2c_pool')")
        ids = state["identities"]
        if state.get("world_size") == self.world and state.get("rank") == self.rank and "slots" in state:
            slots = state["slots"].to(device=self.pool.device, dtype=torch.long)      # LRU order
            self.pool.zero_()
            self.slot_identity.fill_(-1)
            self.toggle.zero_()
            self.last_used.fill_(-1)
            self.pool[slots] = state["features"].to(self.pool)
            self.slot_identity[slots] = ids.to(self.slot_identity)
            self.toggle[slots] = state["toggle"].to(self.toggle)
            self.last_used[slots] = state["last_used"].to(self.last_used)
            self.lru = OrderedDict(zip(ids.tolist(), slots.tolist()))
            self.free = state["free"].tolist()
            self.commits = int(state["commits"])
            return
        owned = class_owner(ids, self.num_classes, self.world) == self.rank
        order = torch.argsort(state["last_used"][owned])
        keep = owned.nonzero().flatten()[order][-self.slots:]                 # LRU first, newest kept
        m = keep.numel()
        self.pool.zero_()
        self.slot_identity.fill_(-1)
        self.toggle.zero_()
        self.last_used.fill_(-1)
        self.pool[:m] = state["features"][keep].to(self.pool)
        self.slot_identity[:m] = ids[keep].to(self.slot_identity)
        self.toggle[:m] = state["toggle"][keep].to(self.toggle)
        self.last_used[:m] = state["last_used"][keep].to(self.last_used)
        self.lru = OrderedDict((int(i), s) for s, i in enumerate(ids[keep].tolist()))
        self.free = list(range(m, self.slots))
        self.commits = int(state["commits"])

    def host_state_bytes(self) -> int:
        """Upper bound of the LRU map and free list: a fixed cost per slot, whatever the classes."""
        return 96 * self.slots
