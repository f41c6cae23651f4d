"""Heads over the parametric center bank: `full` (every local row) and `partial` (Partial FC)."""
from __future__ import annotations

import math

import torch

from parallel.bank import DTYPES, CenterBank
from parallel.collectives import PendingGather, all_gather_rows, gather_batch_async
from parallel.groups import ParallelState
from parallel.heads.base import Head, HeadOutput, check_labels
from parallel.heads.config import HeadConfig
from parallel.heads.sampling import ActiveSet, all_rows, sample_rows
from parallel.host_sync import DeferredErrors
from parallel.kernels import gather_rows_
from parallel.margins import Margin
from parallel.sharding import ClassShard
from parallel.softmax import margin_softmax_loss


class ParametricHead(Head):
    """Rows of a CenterBank sharded by class; a subclass decides which rows are active."""

    def __init__(self, cfg: HeadConfig, state: ParallelState, num_classes: int, embedding_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.state = state
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.group = state.head_group
        self.shard = ClassShard(num_classes, state.head_world, state.head_rank)
        if self.shard.count == 0:
            raise ValueError(f"{num_classes} classes cannot be split over {state.head_world} ranks: "
                             f"rank {state.head_rank} would own none")
        self.bank = CenterBank(self.shard, embedding_size, init_std=cfg.init_std, seed=cfg.seed,
                               dtype=DTYPES[cfg.storage_dtype], device=state.device,
                               momentum_dtype=(DTYPES[cfg.optimizer.momentum_dtype]
                                               if cfg.storage_dtype != "float64" else torch.float64),
                               rounding=cfg.optimizer.rounding)
        self.margin = Margin.from_config(cfg.margin)
        self.compute_dtype = DTYPES[cfg.compute_dtype]
        # per-rank stream: negatives differ across ranks and are reproducible from the seed
        self.generator = torch.Generator(device=state.device).manual_seed(
            (cfg.seed * 1_000_003 + 7919 * (state.head_rank + 1)) % (1 << 63))
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        self.errors = DeferredErrors()   # input errors found on an accelerator, raised a step later
        # the last step's (A, D) center gradient: the next forward's rows (or, when the leaf is the bank's
        # own tensor, its gradient) are written into it instead of a fresh shard-sized allocation
        self._spare_rows: torch.Tensor | None = None

    # -- the strategy ------------------------------------------------------------------------
    def select(self, labels_global: torch.Tensor) -> ActiveSet:
        raise NotImplementedError

    # -- the step ------------------------------------------------------------------------------
    def gather_inputs(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checks this rank's batch; returns x_global (Bg, D) (gradient flows back to x) and labels_global (Bg,)."""
        pending, labels_global = self.start_gather(x, labels)
        return pending.wait(), labels_global

    def start_gather(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[PendingGather, torch.Tensor]:
        """Checks this rank's batch, gathers the labels and starts gathering the embeddings: returns
        (pending x_global (Bg, D), labels_global (Bg,))."""
        if x.dim() != 2 or x.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (B, {self.embedding_size}), got {tuple(x.shape)}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(labels.shape)}")
        self.errors.raise_ready()
        labels = labels.to(device=x.device, dtype=torch.long)
        check_labels(labels, self.num_classes, self.state.rank, self.errors)
        labels_global = all_gather_rows(labels, self.group)                                 # (Bg,)
        pending = gather_batch_async(x, self.group, grad_scale=float(self.state.data_world))
        return pending, labels_global

    def active_centers(self, rows: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The rows as a leaf tensor (A, D), requiring grad (see `gather_active_centers`)."""
        return self.gather_active_centers(rows, out)[0]

    def gather_active_centers(self, rows: torch.Tensor | None,
                              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(leaf (A, D) requiring grad, its rows' L2 norms (A,) or None). The leaf is in the softmax's
        accumulation dtype, or in bfloat16 when the storage is bfloat16 (the lean mode: leaf and
        gradient at half size; the softmax converts one chunk at a time to its GEMM dtype). With every
        row active and the storage already in that dtype, the leaf is the bank's own tensor (no copy of
        the shard: the step updates it in place after backward, and nothing reads the leaf's values
        after the forward). `out`, optional: a buffer the rows are gathered into when its shape and
        dtype fit. The norms come from the gathering pass where the CPU kernel does it."""
        acc = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        weight = self.bank.weight
        if rows is None and weight.dtype in (acc, torch.bfloat16):
            return weight.detach().requires_grad_(True), None
        dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else acc
        if rows is not None and weight.dtype == dtype:
            fits = (out is not None and out.dtype == dtype and out.device == weight.device
                    and out.shape == (rows.numel(), self.embedding_size) and out.is_contiguous())
            leaf = out.detach() if fits else weight.new_empty(rows.numel(), self.embedding_size)
            norms = gather_rows_(weight, rows, leaf)
            if norms is None:
                torch.index_select(weight, 0, rows, out=leaf)
            return leaf.requires_grad_(True), norms
        return self.bank.rows(rows).to(acc).requires_grad_(True), None

    def leaf_is_a_copy(self, centers: torch.Tensor) -> bool:
        """True when the leaf holds copies of the rows (not the bank's own tensor)."""
        return centers.data_ptr() != self.bank.weight.data_ptr()

    def forward(self, x: torch.Tensor, labels: torch.Tensor, batch: dict | None = None) -> HeadOutput:
        pending, labels_global = self.start_gather(x, labels)
        active = self.select(labels_global)            # overlaps the embeddings' all-gather
        centers, norms = self.gather_active_centers(active.rows, out=self._spare_rows)     # (A, D), (A,)
        # a copy of the rows becomes its own gradient (one (A, D) tensor, not two); the bank's own
        # tensor gets the recycled buffer
        grad_buffer = centers.detach() if self.leaf_is_a_copy(centers) else self._spare_rows
        x_global = pending.rows()          # (Bg, D); the softmax reduce-scatters its gradient to x itself
        stats: dict = {}
        loss = margin_softmax_loss(x_global, centers, active.target_col, margin=self.margin, group=self.group,
                                   chunk_size=self.cfg.chunk_size,
                                   cache_bytes=self.cfg.logit_cache_bytes, compute_dtype=self.compute_dtype,
                                   stats=stats, errors=self.errors, center_grad_buffer=grad_buffer,
                                   center_norms=norms)
        self._spare_rows = None
        self._pending.append((active.rows, centers))
        self.last_active = active
        return HeadOutput(loss, {"active_classes": torch.tensor(float(active.num_active))})

    def pending_grads(self) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """(rows, grad) of every forward since the last step (for clipping and accumulation)."""
        out = []
        for rows, centers in self._pending:
            if centers.grad is None:
                raise RuntimeError("head.step() before backward: the active centers have no gradient")
            out.append((rows, centers.grad))
        return out

    def grad_sq_norm(self) -> torch.Tensor:
        """This rank's squared L2 norm of the accumulated head gradient (sum over ranks for the global)."""
        rows, grad = self._merged()
        return grad.float().pow(2).sum() if grad is not None else torch.zeros(())

    def _merged(self):
        grads = self.pending_grads()
        if not grads:
            return None, None
        if len(grads) == 1:
            return grads[0]
        if all(r is None for r, _ in grads):
            return None, torch.stack([g for _, g in grads]).sum(0)
        full = torch.arange(self.shard.count, device=self.bank.weight.device)
        rows = torch.cat([full if r is None else r for r, _ in grads])
        unique_rows, inverse = torch.unique(rows, return_inverse=True)
        merged = torch.zeros(unique_rows.numel(), self.embedding_size, dtype=grads[0][1].dtype,
                             device=rows.device)
        merged.index_add_(0, inverse, torch.cat([g for _, g in grads]))
        return unique_rows, merged

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        rows, grad = self._merged()
        # one forward since the last step: its leaf holds the active rows as stored (nothing wrote them
        # since), unless the softmax wrote their gradient over them
        values = None
        if len(self._pending) == 1 and rows is not None:
            leaf = self._pending[0][1]
            if leaf.grad.data_ptr() != leaf.data_ptr():
                values = leaf.detach()
        self._pending.clear()
        if grad is None:
            return
        if grad_scale != 1.0:
            grad = grad * grad_scale
        opt = self.cfg.optimizer
        self.bank.sgd_step(rows, grad, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                           update=opt.update, values=values)
        # consumed: the next forward writes its rows or its center gradient here instead of allocating
        self._spare_rows = grad

    def skip_step(self) -> None:
        self._pending.clear()

    def sharded_state(self) -> dict:
        """Per-class tensors (first dimension class_count: re-sliced by class id at another world size)
        plus this rank's random streams (`generator`, `rounding_generator`: restored at the same size)."""
        state = {"class_start": self.shard.start, "class_count": self.shard.count,
                 "weight": self.bank.weight, "momentum": self.bank.momentum,
                 "generator": self.generator.get_state()}
        if self.bank.momentum_scale is not None:
            state["momentum_scale"] = self.bank.momentum_scale
        if self.bank.rounding_generator is not None:
            state["rounding_generator"] = self.bank.rounding_generator.get_state()
        return state

    def load_sharded_state(self, state: dict) -> None:
        if (state["class_start"], state["class_count"]) != (self.shard.start, self.shard.count):
            raise ValueError(f"head state holds classes [{state['class_start']}, "
                             f"{state['class_start'] + state['class_count']}) but this rank owns "
                             f"[{self.shard.start}, {self.shard.stop})")
        self.bank.weight.copy_(state["weight"])
        self.bank.momentum.copy_(state["momentum"])
        if self.bank.momentum_scale is not None:
            if "momentum_scale" not in state:
                raise ValueError("head state has no 'momentum_scale' (int8 momentum needs its per-row scales)")
            self.bank.momentum_scale.copy_(state["momentum_scale"])
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if "rounding_generator" in state and self.bank.rounding_generator is not None:
            self.bank.rounding_generator.set_state(state["rounding_generator"])


class FullHead(ParametricHead):
    """Model-parallel full FC: every local row is active each step."""

    name = "full"

    def select(self, labels_global):
        return all_rows(labels_global, self.shard)


class PartialHead(ParametricHead):
    """Partial FC: positives plus uniform random negatives up to floor(rho * C_r)."""

    name = "partial"

    @property
    def num_sample(self) -> int:
        return int(math.floor(self.cfg.sample_rate * self.shard.count))

    def select(self, labels_global):
        if self.num_sample >= self.shard.count:  # rho = 1: every row, as the full head (no gather, no copy)
            return all_rows(labels_global, self.shard)
        return sample_rows(labels_global, self.shard, self.num_sample, self.generator)
