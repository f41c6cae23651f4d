"""The backbone's update under DeepSpeed (ZeRO 1/2, with and without CPU offload) and DDP on 2 gloo ranks
equals a single-process reference on the same global batch; k accumulated micro-batches equal one step
on the k-times larger batch, for the backbone and for a head outside the engine.

The head here is a stand-in with the head contract (global-batch mean loss; the gradient into x carries
the data-parallel world size because every rank back-propagates the same global loss through the
gather): a replicated linear softmax classifier. The reference is plain PyTorch on one process.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.config import Config
from engine.distributed_backbone import DistributedBackbone, deepspeed_config
from parallel.heads.base import HeadOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, CLASSES, IMG = 8, 5, 12


class TinyNet(nn.Module):
    """No BatchNorm: per-rank batch statistics would make the forward differ from the global batch."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act = nn.PReLU(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * (IMG // 4) ** 2, DIM)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.conv1(x))).flatten(1))


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


class StandInHead(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x, labels, batch=None):
        if dist.is_initialized() and dist.get_world_size() > 1:
            x = _GatherRows.apply(x)
            parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, labels)
            labels = torch.cat(parts)
        return HeadOutput(loss=F.cross_entropy(x @ self.weight.t(), labels))

    @torch.no_grad()
    def step(self, lr, grad_scale=1.0):
        self.weight -= lr * self.weight.grad * grad_scale
        self.weight.grad = None

    def skip_step(self):
        self.weight.grad = None


def _cfg(engine="deepspeed", ds="zero1", stage=-1, optimizer="sgd", grad_accum=1, micro=2, clip=0.0):
    cfg = Config()
    cfg.engine = engine
    cfg.deepspeed.config = os.path.join(ROOT, "configs", "deepspeed", f"{ds}.json")
    cfg.deepspeed.zero_stage = stage
    cfg.optim.optimizer = optimizer
    cfg.optim.lr = 0.1 if optimizer == "sgd" else 0.01
    cfg.optim.weight_decay = 5e-4
    cfg.optim.grad_accum = grad_accum
    cfg.optim.clip_grad_norm = clip
    cfg.data.batch_size = micro
    cfg.model.channels_last = True
    return cfg


def _problem(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyNet()
    head_w = torch.randn(CLASSES, DIM, generator=g) * 0.5
    images = torch.randn(n, 3, IMG, IMG, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return net.state_dict(), head_w, images, labels


def _reference(cfg, net_state, head_w, images, labels):
    """One optimizer step of plain PyTorch on the whole global batch, on one process."""
    net = TinyNet()
    net.load_state_dict(net_state)
    head = StandInHead(head_w)
    loss = F.cross_entropy(net(images) @ head.weight.t(), labels)
    loss.backward()
    if cfg.optim.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.clip_grad_norm)
    if cfg.optim.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    opt.step()
    head.step(cfg.optim.lr)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, head.weight.detach().clone()


def _train_one_step(state, cfg, net_state, head_w, images, labels):
    """The trainer's loop for one optimizer step: rank r takes its slice of every micro-batch."""
    world, rank, b, k = state.world_size, state.rank, cfg.data.batch_size, cfg.optim.grad_accum
    net = TinyNet()
    net.load_state_dict(net_state)
    backbone = DistributedBackbone(net, cfg, state)
    head = StandInHead(head_w)
    losses = []
    for m in range(k):
        lo = m * world * b + rank * b
        x = backbone.forward(images[lo:lo + b])
        out = head(x, labels[lo:lo + b])
        backbone.backward(out.loss)
        losses.append(float(out.loss.detach()))
    result = backbone.step(cfg.optim.lr)
    assert result.applied
    head.step(cfg.optim.lr, grad_scale=1.0 / result.loss_scale)
    return {"backbone": backbone.fp32_state_dict(), "head": head.weight.detach().clone(),
            "grad_norm": result.grad_norm, "kind": backbone.kind}


def _run_setups(state, setups, seed):
    out = []
    for cfg in setups:
        n = state.world_size * cfg.data.batch_size * cfg.optim.grad_accum
        net_state, head_w, images, labels = _problem(n, seed)
        out.append(_train_one_step(state, cfg, net_state, head_w, images, labels))
    return out


def _assert_matches_reference(results, setups, seed, world):
    for i, cfg in enumerate(setups):
        n = world * cfg.data.batch_size * cfg.optim.grad_accum
        ref_net, ref_head = _reference(cfg, *_problem(n, seed))
        for rank_results in results:
            got = rank_results[i]
            name = f"{got['kind']} {os.path.basename(cfg.deepspeed.config)} stage={cfg.deepspeed.zero_stage} " \
                   f"opt={cfg.optim.optimizer} k={cfg.optim.grad_accum}"
            for key, ref in ref_net.items():
                torch.testing.assert_close(got["backbone"][key], ref, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, key=key, name=name: f"{name}: {key}: {m}")
            torch.testing.assert_close(got["head"], ref_head, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: head: {m}")


def _moved(setups, seed, world):
    """Guard against a vacuous comparison: the step must change the weights noticeably."""
    cfg = setups[0]
    n = world * cfg.data.batch_size * cfg.optim.grad_accum
    net_state, head_w, images, labels = _problem(n, seed)
    ref_net, ref_head = _reference(cfg, net_state, head_w, images, labels)
    return max(float((ref_net[k] - net_state[k]).abs().max()) for k in net_state)


@pytest.fixture(scope="module")
def cpu_adam_built():
    """Builds (first time on a machine, about a minute; cached under TORCH_EXTENSIONS_DIR, by default
    ~/.cache/torch_extensions) or loads DeepSpeedCPUAdam's op in this process, so that the ranks only
    load it and never race to build it."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load()


SEED = 1
ZERO_SETUPS = [
    _cfg(ds="zero1"),
    _cfg(ds="zero2"),
    _cfg(ds="zero2_offload"),                      # SGD on the offloaded fp32 partitions
    _cfg(ds="zero2_offload", stage=1),             # ZeRO-1 + offload
    _cfg(ds="zero2", clip=0.05),                   # backbone global-norm clipping across partitions
    _cfg(ds="zero2_offload", optimizer="adamw"),   # DeepSpeedCPUAdam (JIT-built once per machine)
    _cfg(ds="zero3"),
]
ACCUMULATION_SETUPS = [_cfg(ds="zero2", grad_accum=3), _cfg(engine="ddp", grad_accum=3), _cfg(engine="ddp")]


@pytest.fixture(scope="module")
def two_rank_results(cpu_adam_built):
    """Every setup trained for one step on 2 gloo ranks, in one spawn (DeepSpeed's import is paid once)."""
    from multirank import run_ranks

    return run_ranks(_run_setups, 2, args=(ZERO_SETUPS + ACCUMULATION_SETUPS, SEED), timeout=300)


def test_deepspeed_zero123_with_and_without_offload_match_single_process_step(two_rank_results):
    results = [r[:len(ZERO_SETUPS)] for r in two_rank_results]
    assert all(r["kind"] == "deepspeed" for r in results[0])
    assert _moved(ZERO_SETUPS, SEED, 2) > 1e-3
    _assert_matches_reference(results, ZERO_SETUPS, SEED, 2)


def test_gradient_accumulation_equals_one_step_on_the_larger_batch(two_rank_results):
    """k=3 micro-batches of 2 per rank (DeepSpeed ZeRO-2 and DDP) == one step on 12 samples."""
    results = [r[len(ZERO_SETUPS):] for r in two_rank_results]
    assert [r["kind"] for r in results[0]] == ["deepspeed", "ddp", "ddp"]
    _assert_matches_reference(results, ACCUMULATION_SETUPS, SEED, 2)


def test_accumulation_is_not_divided_twice_nor_forgotten(spawn_ranks):
    """The comparison above can tell 1/k from 1/k^2 and from 1: scaling the loss either way breaks it."""
    cfg = _cfg(ds="zero2", grad_accum=3)
    n = 2 * cfg.data.batch_size * 3
    net_state, head_w, images, labels = _problem(n, 2)
    ref_net, ref_head = _reference(cfg, net_state, head_w, images, labels)
    wrong_cfg = copy.deepcopy(cfg)
    wrong_cfg.optim.lr = cfg.optim.lr * 3   # what a missing 1/k would produce with plain SGD, no momentum yet
    wrong_net, wrong_head = _reference(wrong_cfg, net_state, head_w, images, labels)
    assert not torch.allclose(wrong_head, ref_head, rtol=1e-5, atol=1e-6)
    assert max(float((wrong_net[k] - ref_net[k]).abs().max()) for k in ref_net) > 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_config_fills_batch_precision_and_clipping_from_the_recipe(precision):
    cfg = _cfg(ds="zero2_offload", grad_accum=4, micro=32, clip=1.5)
    cfg.precision = precision
    ds = deepspeed_config(cfg, data_world=8)
    assert ds["train_batch_size"] == 32 * 4 * 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["data_types"]["buffer_dtype"] == precision   # BatchNorm statistics follow the parameters
    assert ds["zero_force_ds_cpu_optimizer"] is False   # SGD with offload
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
