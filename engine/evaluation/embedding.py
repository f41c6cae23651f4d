"""Flip-fused face embeddings of many images, batched, optionally split over ranks."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from parallel.groups import group_rank, group_size


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 in [-1, 1], the backbone's input convention."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _model_device_dtype(backbone: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in backbone.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class _Progress:
    """Periodic progress lines (images/s and ETA) for long embedding runs."""

    def __init__(self, total: int, label: str, every_s: float = 10.0, printer=print):
        self.total, self.label, self.every_s, self.printer = total, label, every_s, printer
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        self.printer(f"{self.label}: {done}/{self.total} images, {rate:.0f} img/s, ETA {eta:.0f} s")


@torch.no_grad()
def embed_images(
    backbone: torch.nn.Module,
    images: Sequence,
    batch_size: int = 128,
    flip: bool = True,
    group=None,
    device: torch.device | None = None,
    channels_last: bool = False,
    num_workers: int = 0,
    progress: str | None = None,
) -> np.ndarray:
    """Embeddings `(N, D) float32` of `images`, each the sum of the image's and (if `flip`) its
    horizontal mirror's embedding, not normalized.

    `images` is anything indexable giving (H, W, 3) uint8 RGB arrays: a (N, H, W, 3) array or a
    Dataset that decodes on demand (`num_workers` DataLoader workers). With a process `group` of W
    ranks each rank embeds one contiguous slice and the slices are all-gathered, so every rank returns
    all N rows. Every rank runs the same number of equally shaped forward passes (the last batch is
    padded), which ZeRO-3 needs because its forward gathers parameters collectively, and uses the
    first rank's buffers (BatchNorm statistics; restored afterwards), so results match a single
    process running the checkpointed model.
    The backbone is put in eval mode and its previous mode restored afterwards.
    """
    n = len(images)
    world, rank = group_size(group), group_rank(group)
    per_rank = math.ceil(n / world)
    start, stop = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
    num_batches = max(1, math.ceil(per_rank / batch_size))
    param_device, dtype = _model_device_dtype(backbone)
    device = device or param_device

    indices = range(start, stop)
    loader = None
    if num_workers > 0 and len(indices) > 0:
        loader = iter(torch.utils.data.DataLoader(
            torch.utils.data.Subset(images, list(indices)), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_stack))
    tracker = _Progress(stop - start, progress) if progress else None

    was_training = backbone.training
    backbone.eval()
    out: torch.Tensor | None = None
    restore_buffers = _use_first_rank_buffers(backbone, group) if world > 1 else []
    try:
        for b in range(num_batches):
            lo, hi = start + b * batch_size, min(start + (b + 1) * batch_size, stop)
            count = max(hi - lo, 0)
            if count and loader is not None:
                batch = next(loader)
            elif count:
                batch = np.stack([np.asarray(images[i]) for i in range(lo, hi)]) if not isinstance(
                    images, np.ndarray) else images[lo:hi]
            else:
                batch = None
            x = to_input(batch) if batch is not None else None
            if x is None or (count < batch_size and world > 1):   # every rank runs identical shapes
                shape = (batch_size, 3) + (tuple(x.shape[2:]) if x is not None else _image_hw(images))
                padded = torch.zeros(shape)
                if x is not None:
                    padded[:count] = x
                x = padded
            x = x.to(device=device, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            emb = backbone(x).float()
            if flip:
                emb = emb + backbone(torch.flip(x, dims=[3])).float()
            if out is None:
                out = torch.zeros(num_batches * batch_size, emb.shape[1], device=device)
            out[b * batch_size:b * batch_size + emb.shape[0]] = emb
            if tracker:
                tracker.update(hi - start if count else stop - start)
    finally:
        backbone.train(was_training)
        with torch.no_grad():
            for buf, local in restore_buffers:
                buf.copy_(local)

    local = out[: stop - start]
    if world == 1:
        return local.cpu().numpy()
    # all ranks hold per_rank rows (padded), gather and trim to N
    padded = torch.zeros(per_rank, local.shape[1], device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    rows = [g[: max(0, min(per_rank, n - r * per_rank))] for r, g in enumerate(gathered)]
    return torch.cat(rows).cpu().numpy()


def _use_first_rank_buffers(backbone: torch.nn.Module, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Makes every rank embed with the first rank's buffers (BatchNorm running statistics).

    Data-parallel ranks see different batches, so their running statistics drift apart unless the
    engine synchronises them (DDP broadcasts them every forward; DeepSpeed does not), and checkpoints
    keep the first rank's. Returns (buffer, local value) pairs to put back afterwards.
    """
    src = dist.get_global_rank(group, 0)
    saved = []
    with torch.no_grad():
        for buf in backbone.buffers():
            saved.append((buf, buf.detach().clone()))
            dist.broadcast(buf, src=src, group=group)
    return saved


def _stack(items) -> np.ndarray:
    return np.stack(items)


def _image_hw(images) -> tuple[int, int]:
    first = np.asarray(images[0])
    return tuple(first.shape[:2])


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, eps)
