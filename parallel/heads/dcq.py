"""DCQ, the dynamic class queue (Li et al., CVPR 2021): no class weights at all.

Each sample comes with a second image of its identity. The engine computes, per rank,

    x (B, D)             = f(a)   the trained backbone (query), with gradient
    batch["keys"] (B, D) = g(a')  the EMA network (weight generator) on the second image, no gradient

and the head computes, over the global batch (Bg = W * B rows),

    positive   s * (cos(q_i, k_i) - m)                      (CosFace; the sample's own key)
    negatives  s * cos(q_i, Q_j) over the K queued keys     (earlier steps' keys)
    masked     queue keys with the row's identity (-inf), so an identity is never its own negative

CE with the positive as target, mean over the Bg rows. After the step (`step()`), the step's keys
and int64 labels are enqueued FIFO; the oldest Bg leave.

Layouts (`head.extra.layout`):
- `sharded`: each rank keeps a ring of its own last K/W keys. Every step each rank enqueues its B
  keys, so the union of the rings is exactly the global FIFO of the last K keys, and no key ever
  crosses the network. The positive key of a row sits on the row's home rank (the `row_centers`
  column of the margin softmax); queue slots are ordinary softmax columns of the rank that holds them.
- `replicated`: every rank keeps all K keys (the keys are all-gathered and enqueued everywhere, as
  the official code does); rank r uses the slots of its 1/W slice as its columns, so the math is the
  same and only memory and traffic differ.

The ring fills from slot 0, so the filled slots are always the first `filled` (a count kept on the
host): a step reads nothing from the device to find its columns (parallel/host_sync.py), and a label
out of range found on an accelerator is reported at the next step, its row left out of the loss.

K must be a multiple of Bg (checked at the first step). Memory: K/W (or K) keys of D plus int64
label and FIFO position per slot; nothing depends on the number of classes C.

Checkpoint state (`sharded_state`): the filled slots as a table `positions (n,)` (global FIFO
position: the i-th key ever enqueued over all ranks, in rank order within a step), `keys (n, D)`,
`labels (n,)`, plus `next_position`. A rank reloads its own state at an unchanged world size; the
tables of all ranks concatenated (`merge_states`) hold each queued key once, and
`load_sharded_state` of that union at any world size keeps the newest K and deals them round-robin
in FIFO order (each rank's oldest k keys are then the globally oldest W*k, so the union of the rings
stays the global FIFO; with a sharded layout the oldest (n mod W) keys are dropped).
"""
from __future__ import annotations

import torch

from parallel.collectives import all_gather_rows, all_reduce_, gather_batch_async
from parallel.groups import ParallelState
from parallel.heads.base import HeadOutput, check_labels
from parallel.heads.config import DcqConfig, HeadConfig
from parallel.heads.memory import MemoryHead
from parallel.host_sync import DeferredErrors
from parallel.sharding import ClassShard
from parallel.softmax import margin_softmax_loss


class DcqHead(MemoryHead):
    name = "dcq"
    needs = ("keys",)
    sampling = "pairs"

    def __init__(self, cfg: HeadConfig, state: ParallelState, num_classes: int, embedding_size: int):
        options = DcqConfig.from_extra(cfg.extra)
        super().__init__(cfg, state, num_classes, embedding_size, options)
        self.queue_size = options.queue_size
        self.layout = options.layout
        if self.layout == "sharded" and self.queue_size % self.world:
            raise ValueError(f"head.extra.queue_size: {self.queue_size} is not a multiple of the {self.world} "
                             "ranks of the head group")
        slots = self.queue_size // self.world if self.layout == "sharded" else self.queue_size
        self.slots = slots
        self.register_buffer("keys", torch.zeros(slots, embedding_size, dtype=self.storage_dtype, device=self.device))
        self.register_buffer("labels", torch.full((slots,), -1, dtype=torch.long, device=self.device))
        self.register_buffer("positions", torch.full((slots,), -1, dtype=torch.long, device=self.device))
        self.pointer = 0            # next slot to write in this rank's ring
        self.filled = 0             # slots [0, filled) hold keys (the ring fills from slot 0)
        self.next_position = 0      # global FIFO position of the next key enqueued (same on every rank)
        self.errors = DeferredErrors()   # input errors found on an accelerator, raised a step later

    # -- columns -----------------------------------------------------------------------------
    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's softmax columns: queued keys (A, D) and their labels (A,), empty slots left out
        (views of the ring, sized from the host's count)."""
        lo, hi = 0, self.filled
        if self.layout == "replicated":
            lo, count = ClassShard(self.slots, self.world, self.rank).span
            hi = max(lo, min(lo + count, self.filled))
        return self.keys[lo:hi], self.labels[lo:hi]

    # -- the step ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor, batch: dict | None = None):
        self.errors.raise_ready()
        labels = self.check_inputs(x, labels, check_range=False)
        b = x.shape[0]
        bg = b * self.world
        if self.queue_size % bg:
            raise ValueError(f"head.extra.queue_size: {self.queue_size} must be a multiple of the global batch "
                             f"{bg} ({self.world} ranks x {b})")
        keys = self.batch_tensor(batch, "keys", b)                                       # (B, D)
        # the embeddings' all-gather overlaps the labels' check and the columns; the softmax
        # reduce-scatters the embeddings' gradient to x itself
        pending = gather_batch_async(x, self.group, grad_scale=float(self.state.data_world))   # (Bg, D)
        labels_global = all_gather_rows(labels, self.group)                               # (Bg,)
        # rows whose label is out of range are left out of the loss (reported at the next step where
        # the check is deferred)
        valid = (~check_labels(labels_global, self.num_classes, None, self.errors, rows_per_rank=b)).to(self.acc_dtype)
        home = torch.zeros(bg, dtype=torch.bool, device=x.device)
        home[self.rank * b:(self.rank + 1) * b] = True
        row_keys = torch.zeros(bg, self.embedding_size, dtype=self.acc_dtype, device=x.device)  # (Bg, D)
        row_keys[self.rank * b:(self.rank + 1) * b] = keys.to(self.acc_dtype)
        centers, column_labels = self.columns()
        loss = margin_softmax_loss(pending.rows(), centers.to(self.acc_dtype), torch.full_like(labels_global, -1),
                                   margin=self.margin, group=self.group, chunk_size=self.cfg.chunk_size,
                                   cache_bytes=self.cfg.logit_cache_bytes,
                                   compute_dtype=self.compute_dtype, row_centers=row_keys, row_center_mask=home,
                                   column_labels=column_labels, row_labels=labels_global, valid=valid,
                                   errors=self.errors)
        self._pending.append((keys, labels))
        self.active_columns = centers.shape[0] + 1
        filled = all_reduce_(torch.tensor([float(column_labels.numel())], device=x.device), self.group)
        return HeadOutput(loss, {"queue_fill": filled[0] / self.queue_size})

    @torch.no_grad()
    def commit(self, item) -> None:
        keys, labels = item                                                  # this rank's (B, D), (B,)
        b = keys.shape[0]
        bg = b * self.world
        keys = torch.nn.functional.normalize(keys.to(self.acc_dtype), dim=1)
        if self.layout == "replicated":
            keys = all_gather_rows(keys.contiguous(), self.group)            # (Bg, D) in rank order
            labels = all_gather_rows(labels, self.group)
            first = self.next_position
        else:
            first = self.next_position + self.rank * b
        n = keys.shape[0]
        slots = (self.pointer + torch.arange(n, device=self.keys.device)) % self.slots
        self.keys[slots] = keys.to(self.storage_dtype)
        self.labels[slots] = labels.to(self.labels.device)
        self.positions[slots] = first + torch.arange(n, device=self.keys.device)
        self.pointer = (self.pointer + n) % self.slots
        self.filled = min(self.filled + n, self.slots)
        self.next_position += bg

    # -- checkpoint ------------------------------------------------------------------------------
    def sharded_state(self) -> dict:
        filled = self.positions >= 0
        if self.layout == "replicated":      # every rank reports a disjoint share: the union has each key once
            filled &= (self.positions % self.world) == self.rank
        order = torch.argsort(self.positions[filled])
        return {"kind": "dcq_queue", "queue_size": self.queue_size, "next_position": self.next_position,
                "layout": self.layout, "world_size": self.world, "rank": self.rank,
                "positions": self.positions[filled][order].cpu(), "keys": self.keys[filled][order].cpu(),
                "labels": self.labels[filled][order].cpu(),
                # ring layout, so a rank reloading its own state resumes with the same column order
                "slots": filled.nonzero().flatten()[order].cpu(), "pointer": self.pointer}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """The union of every rank's `sharded_state` (any world size), one entry per queued key."""
        out = {"kind": "dcq_queue", "queue_size": states[0]["queue_size"], "world_size": None,
               "next_position": max(int(s["next_position"]) for s in states)}
        for key in ("positions", "keys", "labels"):
            out[key] = torch.cat([s[key] for s in states])
        return out

    @torch.no_grad()
    def load_sharded_state(self, state: dict) -> None:
        """Loads this rank's own `sharded_state` (same world size and layout), or the union of all
        ranks' states (`merge_states`, any world size), of which it keeps this rank's share."""
        if state.get("kind") != "dcq_queue":
            raise ValueError("not a DCQ queue state (kind != 'dcq_queue')")
        order = torch.argsort(state["positions"])
        positions, keys, labels = (state[k][order] for k in ("positions", "keys", "labels"))
        own = (state.get("world_size") == self.world and state.get("rank") == self.rank
               and state.get("layout") == self.layout)
        n = positions.numel()
        if (own and "slots" in state and (self.layout == "sharded" or self.world == 1)
                and (n == self.slots or torch.equal(state["slots"].sort().values, torch.arange(n)))):
            # the ring as it was (same column order); otherwise the keys are refilled from slot 0
            slots = state["slots"][order].to(device=self.keys.device, dtype=torch.long)
            self.keys.zero_()
            self.labels.fill_(-1)
            self.positions.fill_(-1)
            self.keys[slots] = keys.to(self.keys)
            self.labels[slots] = labels.to(self.labels)
            self.positions[slots] = positions.to(self.positions)
            self.pointer = int(state["pointer"])
            self.filled = n
            self.next_position = int(state["next_position"])
            return
        if own:
            take = torch.arange(positions.numel())
        else:
            if self.layout == "replicated" and state.get("world_size") is not None and state.get("world_size") > 1:
                raise ValueError("a replicated queue loads the union of all ranks' states (merge_states)")
            newest = min(positions.numel(), self.queue_size)
            if self.layout == "sharded":
                newest -= newest % self.world          # equal shares keep the rings a FIFO: drop the oldest few
            start = positions.numel() - newest
            positions, keys, labels = positions[start:], keys[start:], labels[start:]
            step = self.world if self.layout == "sharded" else 1
            take = torch.arange(self.rank if step > 1 else 0, newest, step)
        n = take.numel()
        if n > self.slots:
            raise ValueError(f"the queue state holds {n} keys for this rank but it has {self.slots} slots")
        self.keys.zero_()
        self.labels.fill_(-1)
        self.positions.fill_(-1)
        self.keys[:n] = keys[take].to(self.keys)
        self.labels[:n] = labels[take].to(self.labels)
        self.positions[:n] = positions[take].to(self.positions)
        self.pointer = n % self.slots
        self.filled = n
        self.next_position = int(state["next_position"])
