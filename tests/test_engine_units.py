"""Schedules against closed forms, the per-trainer Prometheus registry, and the trainer's step logic:
fp16 loss-scale undo and overflow skips mirrored on the head, head clipping by the global norm over shards."""
import math
import re
import urllib.request

import pytest
import torch
from torch import nn

from engine.config import Config, MetricsConfig
from engine.distributed_backbone import StepResult
from engine.head_inputs import HeadInputs
from engine.metrics import TrainMetrics
from engine.schedules import LRSchedule, build_schedule
from engine.trainer import Trainer
from parallel.groups import ParallelState
from parallel.heads import build_head
from parallel.heads.config import HeadConfig


def test_polynomial_schedule_matches_closed_form_with_linear_warmup():
    s = LRSchedule("polynomial", base_lr=0.1, total_steps=110, warmup_steps=10, power=2.0, min_lr=0.0)
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1)
    for step in (10, 35, 60, 109):
        t = (step - 10) / 100
        assert s(step) == pytest.approx(0.1 * (1 - t) ** 2)
    assert s(110) == 0.0 and s(500) == 0.0


def test_cosine_schedule_matches_closed_form_and_reaches_min_lr():
    s = LRSchedule("cosine", base_lr=1e-3, total_steps=100, warmup_steps=0, min_lr=1e-5)
    assert s(0) == pytest.approx(1e-3)
    assert s(50) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert s(25) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert s(100) == pytest.approx(1e-5)


def test_schedule_epochs_resolve_to_steps():
    cfg = Config().schedule
    cfg.epochs, cfg.warmup_epochs = 20, 2
    s = build_schedule(cfg, 0.1, steps_per_epoch=5058)   # MS1MV3 at 1024 per step
    assert (s.total_steps, s.warmup_steps) == (20 * 5058, 2 * 5058)


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_two_trainers_in_one_process_export_separate_labelled_registries(tmp_path):
    from multirank import free_port as fp

    base = fp()
    cfg = MetricsConfig(prometheus=True, prometheus_port=base, tensorboard=False)
    a = TrainMetrics(cfg, rank=0, local_rank=0, node=0, output_dir=str(tmp_path), total_steps=10,
                     build_info={"version": "x"})
    b = TrainMetrics(cfg, rank=1, local_rank=1, node=0, output_dir=None, total_steps=10)
    try:
        a.record_step(1, samples=32, global_samples=64, seconds=0.5, data_wait=0.1, loss=3.0, lr=0.1,
                      grad_norms={"backbone": 1.5, "head": 2.0}, active_classes=100)
        b.record_step(1, samples=32, global_samples=64, seconds=0.5, data_wait=0.2, loss=3.0, lr=0.1,
                      grad_norms={"backbone": 1.5, "head": 2.0})
        a.record_decode_errors(3)
        text_a, text_b = _scrape(base), _scrape(base + 1)
    finally:
        a.close()
        b.close()
    assert 'shardface_train_samples_total{local_rank="0",node="0",rank="0"} 32.0' in text_a
    assert 'shardface_train_samples_total{local_rank="1",node="0",rank="1"} 32.0' in text_b
    assert 'shardface_data_decode_errors_total{local_rank="0",node="0",rank="0"} 3.0' in text_a
    assert 'shardface_train_grad_norm{local_rank="0",node="0",part="head",rank="0"} 2.0' in text_a
    assert re.search(r'shardface_train_step_duration_seconds_bucket\{le="0.5",local_rank="0"', text_a)
    assert 'shardface_build_info{local_rank="0",node="0",rank="0",version="x"} 1.0' in text_a
    for name in ("shardface_train_steps_total", "shardface_train_data_wait_seconds_total", "shardface_train_loss",
                 "shardface_train_learning_rate", "shardface_head_active_classes", "shardface_process_memory_bytes"):
        assert name in text_a
    assert "job=" not in text_a and "instance=" not in text_a
    assert "process_cpu_seconds_total" not in text_a     # not the global registry


# ------------------------------------------------------------------------------------------ trainer step

class FakeBackbone:
    """Backbone double: a linear map, a backward that multiplies the loss by `loss_scale` the way
    DeepSpeed's fp16 loss scaler does, and a step whose outcome the test decides."""

    def __init__(self, dim, loss_scale=1.0, applied=True):
        self.state = ParallelState.single("cpu")
        torch.manual_seed(0)
        self.net = nn.Linear(12, dim)
        self.loss_scale, self.applied = loss_scale, applied

    def train(self, mode=True):
        pass

    def forward(self, images):
        return self.net(images.flatten(1))

    def backward(self, loss):
        (loss * self.loss_scale).backward()

    def step(self, lr):
        return StepResult(applied=self.applied, grad_norm=1.0, loss_scale=self.loss_scale)


def _trainer(state, head_cfg, backbone, clip=0.0, num_classes=10, dim=6):
    t = object.__new__(Trainer)
    cfg = Config()
    cfg.optim.grad_accum = 1
    cfg.optim.head_clip_grad_norm = clip
    t.cfg, t.state, t.backbone, t.step = cfg, state, backbone, 0
    t.head = build_head(head_cfg, state, num_classes, dim)
    t.inputs = HeadInputs(t.head, backbone)
    t.nonfinite = {"total": 0, "in_a_row": 0}
    t.schedule = LRSchedule("constant", base_lr=0.5, total_steps=10)
    return t


def _batches(n=8, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _head_cfg():
    cfg = HeadConfig(type="full")
    cfg.optimizer.momentum, cfg.optimizer.weight_decay = 0.0, 0.0
    return cfg


def test_fp16_loss_scale_is_undone_for_the_head_and_overflow_skips_its_step():
    state = ParallelState.single("cpu")
    ref = _trainer(state, _head_cfg(), FakeBackbone(6, loss_scale=1.0))
    scaled = _trainer(state, _head_cfg(), FakeBackbone(6, loss_scale=1024.0))
    dropped = _trainer(state, _head_cfg(), FakeBackbone(6, loss_scale=1024.0, applied=False))
    before = ref.head.bank.weight.detach().clone()
    for t in (ref, scaled, dropped):
        info = t.train_step(_batches())
    assert info["applied"] is False
    assert (ref.head.bank.weight - before).abs().max() > 1e-4
    torch.testing.assert_close(scaled.head.bank.weight, ref.head.bank.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dropped.head.bank.weight, before, rtol=0, atol=0)
    # the dropped step left nothing pending: the next applied step uses only its own gradient
    dropped.backbone.applied = True
    dropped.train_step(_batches(seed=1))
    fresh = _trainer(state, _head_cfg(), FakeBackbone(6, loss_scale=1024.0))
    fresh.train_step(_batches(seed=1))
    torch.testing.assert_close(dropped.head.bank.weight, fresh.head.bank.weight, rtol=1e-5, atol=1e-7)


def _clipped_update_norm(state, max_norm):
    t = _trainer(state, _head_cfg(), FakeBackbone(6, loss_scale=8.0), clip=max_norm)
    before = t.head.bank.weight.detach().clone()
    info = t.train_step(_batches())
    delta_sq = float((t.head.bank.weight - before).double().pow(2).sum())
    return {"delta_sq": delta_sq, "head_norm": info["grad_norm_head"]}


def test_head_clipping_uses_the_global_norm_over_shards(spawn_ranks):
    """SGD without momentum/decay: the update is -lr * clip * grad, so sum over shards of |dW|^2 must be
    (lr * max_norm)^2 when clipping is active, and every rank must report the same global norm."""
    out = spawn_ranks(_clipped_update_norm, 2, args=(0.05,))
    assert out[0]["head_norm"] == pytest.approx(out[1]["head_norm"]) and out[0]["head_norm"] > 0.05
    total = math.sqrt(sum(o["delta_sq"] for o in out))
    assert total == pytest.approx(0.5 * 0.05, rel=1e-4)
    # and the single-shard norm differs from the global one, so a local norm would have failed
    assert any(math.sqrt(o["delta_sq"]) < 0.5 * 0.05 * 0.99 for o in out)


def test_grafana_dashboard_queries_only_metrics_the_trainer_exports():
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "grafana_dashboard.json")) as f:
        dash = json.load(f)
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"shardface_[a-z_]+", target["expr"]))
    m = TrainMetrics(MetricsConfig(prometheus=False, tensorboard=False), rank=0, local_rank=0, node=0,
                     output_dir=None, total_steps=1)
    m.record_step(1, samples=1, global_samples=1, seconds=0.1, data_wait=0.0, loss=1.0, lr=0.1,
                  grad_norms={"backbone": 1.0, "head": 1.0}, active_classes=1)
    exported = set()
    for family in m.registry.collect():
        exported |= {s.name for s in family.samples}
    m.close()
    assert used and used <= exported, used - exported
