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
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.sharding import ClassShard

INIT_BLOCK = 1 << 16  # classes per seeded block of initial rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def initial_rows(start: int, count: int, dim: int, std: float, seed: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of global classes [start, start + count): N(0, std^2), independent of the sharding."""
    out = torch.empty(count, dim, dtype=dtype)
    first_block, last_block = start // INIT_BLOCK, (start + count - 1) // INIT_BLOCK if count else -1
    for block in range(first_block, last_block + 1):
        lo, hi = block * INIT_BLOCK, (block + 1) * INIT_BLOCK
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (1 << 63))
        rows = torch.randn(INIT_BLOCK, dim, generator=gen, dtype=torch.float32) * std
        a, b = max(lo, start), min(hi, start + count)
        out[a - start:b - start] = rows[a - lo:b - lo].to(dtype)
    return out


class CenterBank(nn.Module):
    """This rank's rows of the class-center matrix and their momentum (buffers: the engine's
    optimizers and data-parallel wrappers never see them)."""

    def __init__(self, shard: ClassShard, dim: int, *, init_std: float = 0.01, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.shard = shard
        self.dim = dim
        self.register_buffer("weight", initial_rows(shard.start, shard.count, dim, init_std, seed, dtype).to(device))
        self.register_buffer("momentum", torch.zeros(shard.count, dim, dtype=dtype, device=device))

    @property
    def num_rows(self) -> int:
        return self.shard.count

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        """The active rows as a fresh tensor (A, D); index None means all rows."""
        return self.weight.clone() if index is None else self.weight.index_select(0, index)

    @torch.no_grad()
    def sgd_step(self, index: torch.Tensor | None, grad: torch.Tensor, *, lr: float, momentum: float,
                 weight_decay: float, update: str = "sparse") -> None:
        """One SGD step. `index (A,)` unique local rows (None: all rows), `grad (A, D)` their gradient."""
        w, m = self.weight, self.momentum
        if update == "dense":
            m.mul_(momentum).add_(w, alpha=weight_decay)
            if index is None:
                m.add_(grad.to(m.dtype))
            else:
                m.index_add_(0, index, grad.to(m.dtype))
            w.add_(m, alpha=-lr)
            return
        if update != "sparse":
            raise ValueError(f"update must be 'sparse' or 'dense', got {update!r}")
        if index is None:
            d_p = grad.to(w.dtype) + weight_decay * w
            m.mul_(momentum).add_(d_p)
            w.add_(m, alpha=-lr)
            return
        w_rows = w.index_select(0, index)
        d_p = grad.to(w.dtype).add(w_rows, alpha=weight_decay)
        m_rows = m.index_select(0, index).mul_(momentum).add_(d_p)
        m.index_copy_(0, index, m_rows)
        w.index_copy_(0, index, w_rows.sub_(m_rows, alpha=lr))
