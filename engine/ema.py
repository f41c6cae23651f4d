"""The momentum (EMA) encoder: a copy of the backbone that follows it, `ema <- mu * ema + (1 - mu) * f`.

DCQ's weight generator g and F2C's gallery net G are this. The copy has no optimizer state and no
gradients; it is updated once per optimizer step, before the keys / gallery features of that step
are computed:

    ema = EmaEncoder(backbone.module, momentum=0.999)       # starts as an exact copy (ZeRO-3: see below)
    ...
    ema.update(backbone.module, gathered=backbone.gathered)  # every step, before ema(images)
    keys = ema(pair_images)                                  # (B, D) float32, no grad

What is averaged: every floating-point parameter and buffer (BatchNorm running statistics
included); integer buffers (`num_batches_tracked`) are copied. The EMA network runs in eval mode, so
its BatchNorm layers use the averaged running statistics and its forward changes nothing. The copy
is kept in float32 whatever the training precision (bf16/fp16 weights are averaged into float32).
Parameters are identical on every data-parallel rank, so their EMA is too; BatchNorm statistics are
per rank (DeepSpeed does not synchronise buffers), and so are their averages.

DeepSpeed ZeRO: stages 0-2 keep full parameters on every rank, so `update` reads them directly.
Under ZeRO-3 each rank holds only a partition of every parameter; pass the backbone's `gathered`
context (DistributedBackbone.gathered, i.e. `deepspeed.zero.GatheredParameters(params,
modifier_rank=None)`) to the constructor and to `update`, which read the full weights inside it,
and a fresh backbone as `template` (a ZeRO-3 module is never deep-copied). Each rank then keeps a full
float32 EMA copy (one backbone's parameters of memory per rank) and each update costs one
all-gather of the parameters, the volume of one ZeRO-3 forward. Keeping only the rank's partition
of the EMA would save that memory but needs the same all-gather at every EMA forward instead.
Parameters whose `.data` is an empty ZeRO-3 placeholder outside the context are refused with an
error rather than averaged silently.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


class EmaEncoder(nn.Module):
    """A float32, gradient-free, eval-mode copy of `module` that follows it by momentum."""

    def __init__(self, module: nn.Module, momentum: float, *, gathered=None, template: nn.Module | None = None):
        """`template`: a fresh, unwrapped module of the same architecture to hold the copy (needed
        under ZeRO-3, whose partitioned parameters and hooks must not be deep-copied); without it
        `module` is deep-copied. Either way the copy starts equal to `module`."""
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be within [0, 1), got {momentum}")
        self.momentum = float(momentum)
        if template is None:
            _check_full(module, "pass template= (a fresh backbone) to copy a ZeRO-3 module")
            template = copy.deepcopy(module)
            for sub in template.modules():       # hooks of wrappers (DeepSpeed, DDP) stay with the original
                sub._forward_hooks.clear()
                sub._forward_pre_hooks.clear()
                sub._backward_hooks.clear()
        self.module = template.float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._blend(module, gathered, weight=1.0)
        self.num_updates = 0

    def train(self, mode: bool = True):
        """The EMA network always runs in eval mode (its statistics are averaged, never re-estimated)."""
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, module: nn.Module, gathered=None) -> None:
        """ema <- mu * ema + (1 - mu) * module, parameters and floating buffers; integer buffers copied.

        `gathered`: a context manager factory that makes `module` hold full weights (ZeRO-3)."""
        self._blend(module, gathered, weight=1.0 - self.momentum)
        self.num_updates += 1

    @torch.no_grad()
    def _blend(self, module: nn.Module, gathered, weight: float) -> None:
        with (gathered() if gathered is not None else contextlib.nullcontext()):
            _check_full(module, "pass gathered=backbone.gathered")
            source = dict(module.named_parameters())
            source.update(module.named_buffers())
            for name, mine in self._tensors():
                theirs = source.get(name)
                if theirs is None or theirs.shape != mine.shape:
                    raise ValueError(f"EMA update: the backbone has no tensor {name!r} of shape "
                                     f"{tuple(mine.shape)} (got {None if theirs is None else tuple(theirs.shape)})")
                if mine.is_floating_point() and weight != 1.0:
                    mine.lerp_(theirs.detach().to(mine.dtype), weight)
                else:
                    mine.copy_(theirs.detach())

    def _tensors(self):
        yield from self.module.named_parameters()
        yield from self.module.named_buffers()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in any dtype -> embeddings (B, D) float32, without gradient."""
        dtype = next(self.module.parameters()).dtype
        return self.module(images.to(dtype)).float()

    def state_dict_for_checkpoint(self) -> dict:
        return {"momentum": self.momentum, "num_updates": self.num_updates,
                "weights": {k: v.detach().clone() for k, v in self.module.state_dict().items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.num_updates = int(state.get("num_updates", 0))


def _check_full(module: nn.Module, hint: str) -> None:
    for name, p in module.named_parameters():
        if hasattr(p, "ds_shape") and tuple(p.shape) != tuple(p.ds_shape):
            raise ValueError(f"EMA: parameter {name!r} is a ZeRO-3 partition ({tuple(p.shape)} of "
                             f"{tuple(p.ds_shape)}); {hint}")
