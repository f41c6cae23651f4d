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
