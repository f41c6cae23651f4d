"""Contiguous class ranges: C classes over W ranks, the first C mod W ranks one class larger."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassShard:
    """Rank `rank` of `world_size` owns global classes [start, start + count)."""

    num_classes: int
    world_size: int
    rank: int

    @property
    def start(self) -> int:
        base, extra = divmod(self.num_classes, self.world_size)
        return self.rank * base + min(self.rank, extra)

    @property
    def count(self) -> int:
        base, extra = divmod(self.num_classes, self.world_size)
        return base + (1 if self.rank < extra else 0)

    @property
    def stop(self) -> int:
        return self.start + self.count

    def ranges(self) -> list[tuple[int, int]]:
        """(start, count) of every rank."""
        return [ClassShard(self.num_classes, self.world_size, r).span for r in range(self.world_size)]

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.count


def class_owner(labels: torch.Tensor, num_classes: int, world_size: int) -> torch.Tensor:
    """Rank that owns each global class id (same shape as `labels`)."""
    base, extra = divmod(num_classes, world_size)
    boundary = extra * (base + 1)  # classes below this sit on the first `extra` (larger) ranks
    big = torch.div(labels, base + 1, rounding_mode="floor")
    if base == 0:
        return big
    small = extra + torch.div(labels - boundary, base, rounding_mode="floor")
    return torch.where(labels < boundary, big, small)
