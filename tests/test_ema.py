"""The momentum encoder: exact EMA arithmetic against a hand computation, eval-mode/no-grad behaviour,
wrapper hooks left behind, and ZeRO-3 (partitioned parameters read through GatheredParameters)."""
import os

import pytest
import torch
from torch import nn

from engine.ema import EmaEncoder


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_ema_follows_momentum_formula_for_parameters_and_buffers():
    net = small_net()
    ema = EmaEncoder(net, momentum=0.9)
    for (k, a), b in zip(ema.module.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b.float()), f"{k} is not an exact copy at the start"
    expected = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for _ in range(3):
        net.train()
        net(torch.randn(4, 3, 8, 8)).sum().backward()           # changes BN running stats and counter
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                expected[k] = 0.9 * expected[k] + 0.1 * v
            else:
                expected[k] = v.clone()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7, msg=k)
    assert int(ema.module[1].num_batches_tracked) == 3 and ema.num_updates == 3


def test_ema_forward_is_eval_mode_without_gradient_and_leaves_hooks_behind():
    net = small_net()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    ema = EmaEncoder(net, momentum=0.99)
    ema.train(True)
    running = ema.module[1].running_mean.clone()
    images = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    out = ema(images)
    assert out.dtype == torch.float32 and not out.requires_grad and not calls
    assert not ema.module.training and torch.equal(ema.module[1].running_mean, running)
    assert all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out, net.eval()(images.float()), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="momentum must be within"):
        EmaEncoder(net, momentum=1.0)


def zero3_rank(state):
    import deepspeed

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    module = small_net(seed=1)
    reference = small_net(seed=1)                                   # the same weights, never partitioned
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5),
                                      config={"train_micro_batch_size_per_gpu": 2,
                                              "zero_allow_untested_optimizer": True,
                                              "zero_optimization": {"stage": 3}})

    def gathered():
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)

    partitioned = any(tuple(p.shape) != tuple(p.ds_shape) for p in engine.module.parameters())
    try:
        EmaEncoder(engine.module, 0.5)
        refused = False
    except ValueError as err:
        refused = "ZeRO-3 partition" in str(err)
    ema = EmaEncoder(engine.module, 0.5, gathered=gathered, template=small_net(seed=7))
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    torch.manual_seed(state.rank)
    loss = engine(torch.randn(2, 3, 8, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    ema.update(engine.module, gathered=gathered)
    with gathered():
        now = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
    return dict(partitioned=partitioned, refused=refused, start=start, now=now, ema=ema.module.state_dict(),
                reference=reference.state_dict())


def test_ema_of_a_zero3_partitioned_backbone(spawn_ranks):
    results = spawn_ranks(zero3_rank, 2)
    for res in results:
        assert res["partitioned"] and res["refused"]
        for k, v in res["reference"].items():
            if k in res["start"]:
                torch.testing.assert_close(res["start"][k], v.to(res["start"][k].dtype), rtol=0, atol=0, msg=k)
        moved = False
        for k, v in res["ema"].items():
            if v.is_floating_point():
                torch.testing.assert_close(v, 0.5 * res["start"][k] + 0.5 * res["now"][k], rtol=1e-6, atol=1e-7,
                                           msg=k)
                moved |= not torch.equal(res["now"][k], res["start"][k])
        assert moved, "the optimizer step must have changed the weights"
    for k in results[0]["ema"]:   # BatchNorm statistics are per rank (DeepSpeed does not sync buffers)
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(results[0]["ema"][k], results[1]["ema"][k]), f"ranks hold different EMA {k}"
