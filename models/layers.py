"""Pieces every backbone family shares: mixed-precision body, gradient checkpointing, stochastic depth."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def half_dtype_for(device: torch.device) -> torch.dtype:
    """The reduced precision a device computes fast: float16 on CUDA, bfloat16 elsewhere (CPU AMX/AVX-512)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def body_autocast(x: torch.Tensor, enabled: bool):
    """Autocast on the input's device, the device-agnostic form of arcface_torch's `fp16` flag.

    arcface_torch runs the convolutional body under `torch.cuda.amp.autocast(fp16)` and the embedding
    layers in float32; this does the same on any device, in the half type that device runs fast.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=half_dtype_for(x.device))


class _KeepNormStatistics:
    """Context for the recomputation pass of a checkpointed segment: the segment's BatchNorm running
    statistics are restored after it, so each training step updates them exactly once, as it does
    without checkpointing."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self.saved = [
            (buf, buf.detach().clone())
            for m in self.module.modules() if isinstance(m, _NORM_TYPES) and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None
        ]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []
        return False


def run_segment(module: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """`module(x)`, or the same through non-reentrant activation checkpointing when `checkpointed` and
    gradients are wanted. Outputs, gradients, RNG draws (dropout, drop-path) and BatchNorm statistics
    are identical either way."""
    if not (checkpointed and torch.is_grad_enabled() and module.training):
        return module(x)
    return checkpoint(
        module, x, use_reentrant=False, preserve_rng_state=True,
        context_fn=lambda: (contextlib.nullcontext(), _KeepNormStatistics(module)),
    )


class DropPath(nn.Module):
    """Stochastic depth: zeroes a sample's residual branch with probability `p` in training and
    rescales the kept ones by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
