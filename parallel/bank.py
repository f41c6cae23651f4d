"""The row-sharded class-center bank and the head's SGD.

Rank r holds the centers of global classes [start, start + count) as `weight (count, D)` with the
momentum beside it. Initial rows are drawn per block of classes from a generator seeded by
(seed, block), so every class gets its own values whatever the world size: shards never start
identical, and a bank re-sliced to another world size starts from the same rows.

The update is SGD with momentum and weight decay (torch.optim.SGD's formula) in two modes:
- `sparse`: only the rows active this step and their momentum change; every other row stays
  bit-for-bit as it was. No dense (count, D) gradient is ever allocated.
- `dense`: momentum and weight decay apply to every row, the gradient being zero off the active
  rows (arcface_torch v2, whose full-size gradient feeds torch.optim.SGD).

Storage can be leaner than float32 (for tens of millions of classes):
- rows in bfloat16: the update is computed in float32 and written back with stochastic rounding
  (unbiased: E[round(w)] = w, so small updates are not lost) or round-to-nearest;
- momentum in bfloat16, or int8 with one float32 absmax scale per row.
Rows are read and written in blocks of about `UPDATE_BLOCK_BYTES` (sized to stay in a core's L2
cache: every temporary of a block is still cached when the next operation reads it), through
workspaces reused from block to block, so no transient copy of the shard exists.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.kernels import sgd_rows_
from parallel.sharding import ClassShard

INIT_BLOCK = 1 << 16    # classes per seeded block of initial rows
INIT_PIECE_BYTES = 8 << 20  # float32 bytes of the rows drawn at a time within a block
UPDATE_BLOCK_BYTES = 1 << 20  # float32 bytes of one block's temporary (rows x D) in an optimizer step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int8": torch.int8}


def initial_rows(start: int, count: int, dim: int, std: float, seed: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of global classes [start, start + count): N(0, std^2), independent of the sharding.

    Each block of INIT_BLOCK classes has its own seeded stream, drawn in pieces of a few MB (the same
    numbers as one draw of the block: CPU normal sampling transforms 16 values at a time and every
    piece is a multiple of 16 values), up to the last row this shard needs: no block-sized float32
    buffer, which the training ranks' allocator settings keep resident (docs/PERFORMANCE.md)."""
    out = torch.empty(count, dim, dtype=dtype)
    first_block, last_block = start // INIT_BLOCK, (start + count - 1) // INIT_BLOCK if count else -1
    piece = min(INIT_BLOCK, 16 * max(1, INIT_PIECE_BYTES // (16 * 4 * max(dim, 1))))       # rows
    rows = torch.empty(piece, dim, dtype=torch.float32) if count else None   # one buffer for every piece
    for block in range(first_block, last_block + 1):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (1 << 63))
        block_lo = block * INIT_BLOCK
        for lo in range(block_lo, min(block_lo + INIT_BLOCK, start + count), piece):
            hi = min(lo + piece, block_lo + INIT_BLOCK)
            drawn = torch.randn(hi - lo, dim, generator=gen, out=rows[:hi - lo]).mul_(std)
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                out[a - start:b - start] = drawn[a - lo:b - lo].to(dtype)
    return out


def update_block_rows(dim: int) -> int:
    """Rows per block of an optimizer step for D = dim."""
    return max(1, UPDATE_BLOCK_BYTES // (4 * max(dim, 1)))


def update_workspace_bytes(active_rows: int, dim: int, storage_dtype: torch.dtype,
                           momentum_dtype: torch.dtype) -> int:
    """Largest transient memory of one `sgd_step` (a block's float32 temporaries): gradient, rows,
    d_p and momentum, plus the decode/encode buffers of bfloat16 rows (stochastic-rounding noise and
    bits) and of int8 momentum (absmax-scaled copy and its rounding)."""
    temporaries = 4
    if storage_dtype == torch.bfloat16:
        temporaries += 3
    if momentum_dtype == torch.int8:
        temporaries += 2
    return temporaries * min(update_block_rows(dim), active_rows) * dim * 4


def round_to_bfloat16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 -> bfloat16, stochastically rounded when a generator is given (unbiased), else nearest."""
    if generator is None:
        return x.to(torch.bfloat16)
    x = x.contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise) & -65536   # add below the bf16 mantissa, then truncate
    return bits.view(torch.float32).to(torch.bfloat16)


class RowStore:
    """A view of (count, D) stored rows (float32, float64, bfloat16, or int8 with a per-row float32
    absmax scale), read and written as float32/float64 blocks."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None, math_dtype: torch.dtype):
        self.data, self.scale, self.math_dtype = data, scale, math_dtype

    def read(self, index: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """A fresh tensor of the rows (all rows if index is None); `out`, optional, a math-dtype
        workspace of the right shape the rows are gathered into when the storage dtype allows."""
        if out is not None and index is not None and self.scale is None and self.data.dtype == self.math_dtype:
            return torch.index_select(self.data, 0, index, out=out)
        data = self.data if index is None else self.data.index_select(0, index)
        if self.scale is None:
            if data.dtype != self.math_dtype:
                return data.to(self.math_dtype)
            return data.clone() if index is None else data
        scale = self.scale if index is None else self.scale.index_select(0, index)
        return data.to(self.math_dtype) * (scale / 127.0)[:, None]

    def write(self, index: torch.Tensor | None, values: torch.Tensor, generator: torch.Generator | None) -> None:
        scale = None
        if self.scale is not None:
            scale = values.abs().amax(dim=1).clamp_min(1e-30).float()
            data = torch.round(values * (127.0 / scale)[:, None]).to(torch.int8)
        elif self.data.dtype == torch.bfloat16 and values.dtype == torch.float32:
            data = round_to_bfloat16(values, generator)
        else:
            data = values.to(self.data.dtype)
        if index is None:
            self.data.copy_(data)
            if scale is not None:
                self.scale.copy_(scale)
        else:
            self.data.index_copy_(0, index, data)
            if scale is not None:
                self.scale.index_copy_(0, index, scale)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (0 if self.scale is None else self.scale.numel() * 4)


class CenterBank(nn.Module):
    """This rank's rows of the class-center matrix and their momentum (buffers: the engine's
    optimizers and data-parallel wrappers never see them)."""

    def __init__(self, shard: ClassShard, dim: int, *, init_std: float = 0.01, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 momentum_dtype: torch.dtype | None = None, rounding: str = "stochastic"):
        super().__init__()
        self.shard = shard
        self.dim = dim
        self.math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("weight", initial_rows(shard.start, shard.count, dim, init_std, seed, dtype).to(device))
        momentum_dtype = momentum_dtype or dtype
        self.register_buffer("momentum", torch.zeros(shard.count, dim, dtype=momentum_dtype, device=device))
        self.register_buffer("momentum_scale", torch.zeros(shard.count, dtype=torch.float32, device=device)
                             if momentum_dtype == torch.int8 else None)
        self.rounding_generator = (torch.Generator(device=device).manual_seed(seed * 7 + 1 + shard.rank)
                                   if rounding == "stochastic" else None)

    @property
    def weights(self) -> RowStore:
        return RowStore(self.weight, None, self.math_dtype)

    @property
    def momenta(self) -> RowStore:
        return RowStore(self.momentum, self.momentum_scale, self.math_dtype)

    @property
    def num_rows(self) -> int:
        return self.shard.count

    @property
    def state_bytes(self) -> int:
        """Bytes of rows plus optimizer state on this rank."""
        return self.weights.nbytes + self.momenta.nbytes

    def rows(self, index: torch.Tensor | None, raw: bool = False) -> torch.Tensor:
        """The active rows as a fresh float32 (float64) tensor (A, D), or in the storage dtype if `raw`;
        index None means all rows."""
        if raw:
            return self.weight.clone() if index is None else self.weight.index_select(0, index)
        return self.weights.read(index)

    def momentum_rows(self, index: torch.Tensor | None) -> torch.Tensor:
        return self.momenta.read(index)

    @torch.no_grad()
    def sgd_step(self, index: torch.Tensor | None, grad: torch.Tensor, *, lr: float, momentum: float,
                 weight_decay: float, update: str = "sparse", values: torch.Tensor | None = None) -> None:
        """One SGD step. `index (A,)` unique local rows (None: all rows), `grad (A, D)` their gradient;
        `values (A, D)`, optional: the rows' current values as the caller already holds them (read from
        this bank, in its storage or math dtype, unchanged since), so the sparse step does not gather
        them again; never written to.

        torch.optim.SGD's formula per row: m = momentum * m + (g + weight_decay * w); w = w - lr * m.
        """
        if update not in ("sparse", "dense"):
            raise ValueError(f"update must be 'sparse' or 'dense', got {update!r}")
        if update == "dense" and index is not None:
            # every row decays; active rows also get their gradient, found through the position of
            # each row in `index` (-1: inactive), so no block asks the host where its rows are
            device = self.weight.device
            position = torch.full((self.num_rows,), -1, dtype=torch.long, device=device)
            position.index_copy_(0, index, torch.arange(index.numel(), device=device))
            block = update_block_rows(self.dim)
            for lo in range(0, self.num_rows, block):
                hi = min(self.num_rows, lo + block)
                rows = torch.arange(lo, hi, device=device)
                at = position[lo:hi]
                if index.numel():
                    g = grad.index_select(0, at.clamp_min(0)).to(self.math_dtype)
                    g.masked_fill_((at < 0)[:, None], 0.0)
                else:
                    g = torch.zeros(hi - lo, self.dim, dtype=self.math_dtype, device=device)
                self._update_rows(rows, g, lr, momentum, weight_decay)
            return
        if index is None and self.weight.dtype == self.math_dtype and self.momentum.dtype == self.math_dtype:
            # every row, full-precision storage: in place, no copies; one pass with the fused kernel
            if sgd_rows_(self.weight, self.momentum, torch.arange(self.num_rows, device=self.weight.device),
                         grad.to(self.math_dtype), None, lr, momentum, weight_decay):
                return
            w, m = self.weight, self.momentum
            m.mul_(momentum).add_(grad.to(self.math_dtype)).add_(w, alpha=weight_decay)
            w.sub_(m, alpha=lr)
            return
        if index is None:
            index = torch.arange(self.num_rows, device=self.weight.device)
        if values is not None and values.shape != grad.shape:
            raise ValueError(f"values {tuple(values.shape)} do not match the gradient {tuple(grad.shape)}")
        # the fused kernel (one pass over every row) where rows, momentum, gradient and values share the
        # math dtype; else blocks through PyTorch, each converting its own slice of a low-precision
        # gradient (a whole-gradient conversion would be a transient (A, D) float32 copy: at rho = 1, the
        # size of the shard)
        if (self.weight.dtype == self.momentum.dtype == self.math_dtype
                and sgd_rows_(self.weight, self.momentum, index, grad.to(self.math_dtype), values, lr, momentum,
                              weight_decay)):
            return
        block = update_block_rows(self.dim)
        # two (block, D) workspaces for every block: d_p then the new rows, and the momentum
        workspace = (torch.empty(min(block, index.numel()), self.dim, dtype=self.math_dtype, device=self.weight.device),
                     torch.empty(min(block, index.numel()), self.dim, dtype=self.math_dtype, device=self.weight.device))
        for lo in range(0, index.numel(), block):
            n = min(block, index.numel() - lo)
            self._update_rows(index[lo:lo + n], grad[lo:lo + n], lr, momentum, weight_decay,
                              None if values is None else values[lo:lo + n], (workspace[0][:n], workspace[1][:n]))

    def _update_rows(self, rows, grad, lr, momentum, weight_decay, values=None, workspace=None):
        """torch.optim.SGD's arithmetic, in its order, on one block of rows (bit-for-bit the same)."""
        weights, momenta = self.weights, self.momenta
        if workspace is None:
            workspace = (torch.empty_like(grad), torch.empty_like(grad))
        w = weights.read(rows) if values is None else values.to(self.math_dtype)
        d_p = torch.add(grad, w, alpha=weight_decay, out=workspace[0])
        m = momenta.read(rows, out=workspace[1]).mul_(momentum).add_(d_p)
        momenta.write(rows, m, None)
        new_w = torch.sub(w, m, alpha=lr, out=d_p)  # the caller's values stay untouched
        weights.write(rows, new_w, self.rounding_generator)
