"""The head interface every class-center strategy implements.

A head turns this rank's embeddings `x (B, D)` and labels `(B,)` into the global-batch loss:

    gather -> plan (active rows/slots, target column per row) -> centers -> margin softmax
           -> aux loss -> (after backward) step/commit

The engine calls, per step:

    out = head(x, labels, batch)      # HeadOutput; out.loss is identical on every rank
    backbone.backward(out.loss)       # grads reach x (reduce-scattered) and the head's active rows
    head.step(lr)                     # optimizer update of the rows used by the last forward,
                                      # plus commits (queues, pools, hard queues, ...)

`batch` carries what some strategies need beyond (x, labels): e.g. DCQ's key embeddings of a second
image. Heads never see images; the engine computes embeddings and puts them in `batch`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from parallel.host_sync import DeferredErrors, first_true, host_reads_are_cheap


def check_labels(labels: torch.Tensor, num_classes: int, rank: int | None, errors: DeferredErrors | None = None,
                 rows_per_rank: int | None = None) -> torch.Tensor:
    """Raises ValueError naming the first label outside [0, num_classes) and its position: at once, or
    through `errors` where host reads are not cheap (parallel/host_sync.py; the head leaves such a
    row out of the loss). `labels` is rank `rank`'s batch, or with `rows_per_rank` the global batch
    (every rank's batch in rank order; then every rank raises the same error at the same step).
    Returns the mask of labels out of range (all False unless the error is deferred)."""
    bad = (labels < 0) | (labels >= num_classes)

    def describe(details):
        pos, label = int(details[0]), int(details[1])
        where = (f"position {pos} of rank {rank}'s batch" if rows_per_rank is None
                 else f"position {pos % rows_per_rank} of rank {pos // rows_per_rank}'s batch")
        return ValueError(f"label {label} at {where} is outside [0, {num_classes})")

    if errors is None or host_reads_are_cheap(labels.device):
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise describe([pos, int(labels[pos])])
        return bad
    found, pos = first_true(bad)
    errors.report(found, torch.cat([pos.view(1), labels.index_select(0, pos.view(1)) if labels.numel() else pos.view(1)]),
                  describe)
    return bad


@dataclass
class HeadOutput:
    loss: torch.Tensor                                   # scalar, same value on every rank of the head group
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # cheap per-step figures for metrics


class Head(nn.Module):
    """Base class. Subclasses set `name` and implement `forward` and `step`."""

    name: str = "head"

    def forward(self, x: torch.Tensor, labels: torch.Tensor, batch: dict | None = None) -> HeadOutput:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Applies the head's own optimizer to what the last forward used, then commits state."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """Drops what the last forward prepared without updating anything (non-finite loss, fp16 overflow)."""

    # Checkpoint state by class range (see parallel/bank.py for the layout of each entry).
    def sharded_state(self) -> dict:
        raise NotImplementedError

    def load_sharded_state(self, state: dict) -> None:
        raise NotImplementedError
