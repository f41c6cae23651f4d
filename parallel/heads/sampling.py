"""Which local rows of the center bank take part in a step."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from parallel.host_sync import host_reads_are_cheap
from parallel.kernels import select_rows_
from parallel.sharding import ClassShard


@dataclass
class ActiveSet:
    """rows (A,) sorted local row ids, or None for every row; target_col (Bg,) column of each row's
    target in the active set, -1 where the target lives on another rank; num_positive: distinct
    local positives (a 0-d tensor: counting them needs no host read), -1 for every row."""

    rows: torch.Tensor | None
    target_col: torch.Tensor
    num_active: int
    num_positive: torch.Tensor | int


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
    random rows fill the rest. Uses one uniform draw per local class, then either one ascending pass
    that takes each unmarked row with probability (still needed) / (still unseen) (the CPU kernel)
    or top-k of the draws; either way the negatives are a uniform sample without replacement (the
    two paths pick different ones from the same seed, each reproducibly). No host read when
    `num_sample` covers the most positives a batch can hold (min(Bg, C_r): the usual case, e.g.
    50,000 sampled rows for a global batch of 256); otherwise the number of positives decides the
    size and is read.
    """
    local, local_id = local_targets(labels_global, shard)
    count = shard.count
    priority = torch.rand(count, generator=generator, device=generator.device).to(labels_global.device)
    # one spare slot at the end takes the rows whose target lives elsewhere: no boolean indexing
    priority = torch.cat([priority, priority.new_zeros(1)])
    if forced is not None and forced.numel():
        priority.index_fill_(0, forced, 2.0)
    priority.index_fill_(0, torch.where(local, local_id, torch.full_like(local_id, count)), 3.0)
    priority = priority[:count]
    positive = priority == 3.0
    num_positive = positive.sum()
    if num_sample >= min(labels_global.numel(), count):
        k = min(num_sample, count)
    else:
        if not host_reads_are_cheap(labels_global.device):
            warn_sampling_reads(num_sample, labels_global.numel())
        k = min(max(num_sample, int(num_positive)), count)
    rows = select_rows_(priority, k)
    if rows is None:
        rows = torch.topk(priority, k, sorted=False).indices.sort().values
    target_col = torch.searchsorted(rows, local_id.clamp(0, max(count - 1, 0)))
    target_col = torch.where(local, target_col, torch.full_like(target_col, -1))
    return ActiveSet(rows, target_col, k, num_positive)


@functools.lru_cache(maxsize=None)
def warn_sampling_reads(num_sample: int, batch: int) -> None:
    warnings.warn(f"Partial FC samples {num_sample} rows per rank, fewer than the global batch ({batch}): the "
                  "number of positives decides how many rows are active and is read on the host every step "
                  "(raise head.sample_rate to avoid the stall)", stacklevel=3)
