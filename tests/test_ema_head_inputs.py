"""The engine side of DCQ / F2C: which loader, what goes into `batch`, when the EMA moves, which
network is evaluated (engine/head_inputs.py), with a stand-in backbone."""
import contextlib

import pytest
import torch
from torch import nn

from engine.head_inputs import DualLoader, HeadInputs
from parallel.groups import ParallelState
from parallel.heads import HeadConfig, build_head


class Backbone:
    kind = "ddp"

    def __init__(self):
        torch.manual_seed(0)
        self.module = nn.Linear(6, 4)
        self.state = ParallelState.single("cpu")

    def forward(self, images):
        return self.module(images).float()

    def prepare_images(self, images):
        return images

    @contextlib.contextmanager
    def gathered(self):
        yield self.module


def heads():
    state = ParallelState.single("cpu")
    dcq = build_head(HeadConfig(type="dcq", extra=dict(queue_size=8, momentum=0.5)), state, 50, 4)
    f2c = build_head(HeadConfig(type="f2c", extra=dict(pool_size=32, momentum=0.5)), state, 50, 4)
    return dcq, f2c


def test_pairs_put_ema_keys_of_the_second_image_in_the_batch_and_update_once_per_step():
    dcq, _ = heads()
    backbone = Backbone()
    inputs = HeadInputs(dcq, backbone)
    ia, ib, labels = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([1, 2, 3, 4])
    start = inputs.ema.module.weight.clone()
    with torch.no_grad():
        backbone.module.weight.add_(1.0)
    x, y, batch, n = inputs.forward((ia, ib, labels), first=False)      # not the first micro-batch: no update
    assert torch.equal(inputs.ema.module.weight, start)
    x, y, batch, n = inputs.forward((ia, ib, labels), first=True)
    torch.testing.assert_close(inputs.ema.module.weight, 0.5 * start + 0.5 * backbone.module.weight)
    torch.testing.assert_close(x, backbone.module(ia))
    with torch.no_grad():
        torch.testing.assert_close(batch["keys"], inputs.ema.module(ib))
    assert n == 8 and torch.equal(y, labels) and not batch["keys"].requires_grad and x.requires_grad
    dcq(x, y, batch).loss.backward()                                       # what the trainer does next
    with inputs.eval_module() as module:
        assert module is inputs.ema.module                                 # DCQ evaluates the EMA network


def test_dual_loaders_build_x_and_y_sides_and_the_gallery_from_the_same_images():
    _, f2c = heads()
    backbone = Backbone()
    inputs = HeadInputs(f2c, backbone)
    ia, ib, lid = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([1, 2, 3, 4])
    ii, li = torch.randn(4, 6), torch.tensor([5, 6, 7, 8])
    x, y, batch, n = inputs.forward(((ia, ib, lid), (ii, li)), first=True)
    images = torch.cat([ia, ii[:2], ib, ii[2:]])
    assert torch.equal(y, torch.tensor([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 7, 8])) and n == 12
    torch.testing.assert_close(x, backbone.module(images))
    with torch.no_grad():
        torch.testing.assert_close(batch["gallery"], inputs.ema.module(images))
    f2c(x, y, batch).loss.backward()
    with inputs.eval_module() as module:
        assert module is backbone.module                                   # F2C evaluates the probe net


def test_loaders_follow_the_head_sampling():
    dcq, f2c = heads()
    made = []

    class Loader:
        def __init__(self, mode):
            made.append(mode)
            self.mode = mode

        def set_epoch(self, e):
            pass

        def decode_errors(self):
            return 1

        def __iter__(self):
            return iter([self.mode])

    assert HeadInputs(dcq, Backbone()).build_loader(Loader, "instance").mode == "pairs"
    dual = HeadInputs(f2c, Backbone()).build_loader(Loader, "instance")
    assert isinstance(dual, DualLoader) and list(dual) == [("identity", "instance")] and dual.decode_errors() == 2
    with pytest.raises(ValueError, match="data.mode: 'pairs'; the dcq head chooses its own sampling"):
        HeadInputs(dcq, Backbone()).build_loader(Loader, "pairs")
    full = build_head(HeadConfig(type="full"), ParallelState.single("cpu"), 10, 4)
    plain = HeadInputs(full, Backbone())
    assert plain.ema is None and plain.build_loader(Loader, "instance").mode == "instance"
