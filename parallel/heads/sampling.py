"""Which local rows of the center bank take part in a step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.sharding import ClassShard


@dataclass
class ActiveSet:
    """rows (A,) sorted local row ids, or None for every row; target_col (Bg,) column of each row's
    target in the active set, -1 where the target lives on another rank."""

    rows: torch.Tensor | None
    target_col: torch.Tensor
    num_active: int
    num_positive: int


def local_targets(labels_global: torch.Tensor, shard: ClassShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_local (Bg,) bool, local class id (Bg,), meaningful where is_local)."""
    local = (labels_global >= shard.start) & (labels_global < shard.stop)
    return local, labels_global - shard.start


def all_rows(labels_global: torch.Tensor, shard: ClassShard) -> ActiveSet:
    local, local_id = local_targets(labels_global, shard)
    target_col = torch.where(local, local_id, torch.full_like(local_id, -1))
    return ActiveSet(None, target_col, shard.count, -1)


def sample_rows(labels_global: torch.Tensor, shard: ClassShard, num_sample: int,
                generator: torch.Generator, forced: torch.Tensor | None = None) -> ActiveSet:
    """Partial FC: the local positives, then uniform random local negatives without replacement
    until `num_sample` rows are active (positives only if they already reach it).

    `forced (K,)` optional local rows that must be active after the positives (hard negatives);
    random rows fill the rest. Uses one uniform draw per local class and top-k, so the negatives
    are a uniform sample without replacement.
    """
    local, local_id = local_targets(labels_global, shard)
    positives = torch.unique(local_id[local])
    count = shard.count
    priority = torch.rand(count, generator=generator, device=generator.device).to(labels_global.device)
    if forced is not None and forced.numel():
        priority[forced] = 2.0
    priority[positives] = 3.0
    num_positive = positives.numel()
    k = max(num_sample, num_positive)
    k = min(k, count)
    rows = torch.topk(priority, k, sorted=False).indices.sort().values
    target_col = torch.searchsorted(rows, local_id.clamp(0, max(count - 1, 0)))
    target_col = torch.where(local, target_col, torch.full_like(target_col, -1))
    return ActiveSet(rows, target_col, k, num_positive)
