"""What a head needs from the engine beyond (embeddings, labels), asked from the head itself.

A head may declare (parallel/heads/memory.py):

    head.sampling            "instance" (default) | "pairs" | "dual"
    head.needs               batch keys it reads: "keys" (DCQ) | "gallery" (F2C)
    head.ema_momentum        a momentum encoder (engine/ema.py) must follow the backbone
    head.evaluate_with_ema   evaluate the momentum encoder instead of the backbone

and the trainer, per micro-batch, calls `x, labels, batch, samples = inputs.forward(item, first)`
then `head(x, labels, batch)`. Per sampling mode, with B = data.batch_size:

- instance: item = (images (B,...), labels (B,));          x = backbone(images), batch = None
- pairs:    item = (images_a, images_b, labels) from the loader's "pairs" mode (b: another image of a's
            identity); x = backbone(images_a), batch["keys"] = ema(images_b)
- dual:     item = ((ia, ib, lid) from the "identity" loader, (ii, li) from an "instance" loader),
            both of B; x side = [ia, ii[:B/2]], y side = [ib, ii[B/2:]];
            x = backbone(cat[x side, y side]) (3B rows), labels alike, batch["gallery"] = ema(same images)

The momentum encoder is updated once per optimizer step, at its first micro-batch, before its forward.
"""
from __future__ import annotations

import contextlib

import torch

from engine.ema import EmaEncoder

SAMPLINGS = ("instance", "pairs", "dual")


class DualLoader:
    """Zips the identity loader (pairs of one identity) with an instance loader, batch for batch."""

    def __init__(self, identity_loader, instance_loader):
        self.identity = identity_loader
        self.instance = instance_loader

    def set_epoch(self, epoch: int) -> None:
        self.identity.set_epoch(epoch)
        self.instance.set_epoch(epoch)

    def decode_errors(self) -> int:
        return self.identity.decode_errors() + self.instance.decode_errors()

    def __iter__(self):
        return zip(iter(self.identity), iter(self.instance))


class HeadInputs:
    def __init__(self, head, backbone, *, template_factory=None):
        """`template_factory()`: a fresh, unwrapped backbone (the EMA copy's container under ZeRO-3)."""
        self.head = head
        self.backbone = backbone
        self.sampling = getattr(head, "sampling", "instance")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"head {head.name!r} asks for sampling {self.sampling!r}; known: {', '.join(SAMPLINGS)}")
        self.ema = None
        momentum = getattr(head, "ema_momentum", None)
        if momentum is not None:
            zero3 = backbone.kind == "deepspeed" and backbone.engine.zero_optimization_stage() == 3
            self.ema = EmaEncoder(backbone.module, momentum, gathered=backbone.gathered if zero3 else None,
                                  template=template_factory() if zero3 and template_factory else None)
            self.ema.to(backbone.state.device)
            self._gathered = backbone.gathered if zero3 else None

    def build_loader(self, make_loader, data_mode: str):
        """`make_loader(mode)` -> a loader of B items per batch; returns what the trainer iterates."""
        if self.sampling == "instance":
            return make_loader(data_mode)
        if data_mode != "instance":
            raise ValueError(f"data.mode: {data_mode!r}; the {self.head.name} head chooses its own sampling "
                             f"({self.sampling}), leave data.mode at 'instance'")
        if self.sampling == "pairs":
            return make_loader("pairs")
        return DualLoader(make_loader("identity"), make_loader("instance"))

    def forward(self, item, first: bool):
        """-> (x (N, D) with grad, labels (N,) on the device, batch dict or None, images in this micro-batch)."""
        device = self.backbone.state.device
        if self.sampling == "instance":
            images, labels = item[:2]
            return self.backbone.forward(images), labels.to(device, non_blocking=True), None, images.shape[0]
        if first:
            self.ema.update(self.backbone.module, gathered=self._gathered)
        if self.sampling == "pairs":
            images_a, images_b, labels = item[:3]
            x = self.backbone.forward(images_a)
            keys = self.ema(self.backbone.prepare_images(images_b))
            return x, labels.to(device, non_blocking=True), {"keys": keys}, 2 * images_a.shape[0]
        (ia, ib, lid), (ii, li) = item[0][:3], item[1][:2]
        half = ii.shape[0] // 2
        images = torch.cat([ia, ii[:half], ib, ii[half:2 * half]])
        labels = torch.cat([lid, li[:half], lid, li[half:2 * half]])
        x = self.backbone.forward(images)
        gallery = self.ema(self.backbone.prepare_images(images))
        return x, labels.to(device, non_blocking=True), {"gallery": gallery}, images.shape[0]

    @contextlib.contextmanager
    def eval_module(self):
        """The network evaluation should run: the EMA copy if the head says so, else the backbone."""
        if self.ema is not None and getattr(self.head, "evaluate_with_ema", False):
            yield self.ema.module
        else:
            with self.backbone.gathered() as module:
                yield module

    def state_dict(self) -> dict:
        return {} if self.ema is None else {"ema": self.ema.state_dict_for_checkpoint()}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_checkpoint_state(state["ema"])
