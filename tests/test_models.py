"""Backbones: registry, shapes, arcface_torch weight compatibility, checkpointing, precision, memory format."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from models import build_backbone, list_backbones


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared; one intra-op thread keeps these small kernels fast and predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ALL = ["r18", "r34", "r50", "r100", "r200", "tiny", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b"]


def test_registry_lists_every_family_and_resolves_aliases():
    assert list_backbones() == ALL
    assert build_backbone("iresnet18", embedding_size=8).backbone_name == "r18"


def test_unknown_backbone_name_is_an_error_naming_it_and_the_known_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'r19'.*r18.*mbf.*vit_t"):
        build_backbone("r19")


def test_unknown_option_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"'mbf' does not take option\(s\) depth"):
        build_backbone("mbf", depth=3)


@pytest.mark.parametrize("name,options", [("tiny", {}), ("r18", {}), ("mbf", {}),
                                          ("vit_t", {"depth": 2})])
def test_backbone_maps_faces_to_embeddings_of_the_configured_size(name, options):
    model = build_backbone(name, embedding_size=96, **options).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 112, 112))
    assert out.shape == (3, 96) and out.dtype == torch.float32 and torch.isfinite(out).all()


# --- arcface_torch compatibility -------------------------------------------------------------------
# An independent statement of insightface's arcface_torch layouts (key -> shape) and of their forward
# pass written with torch.nn.functional; a state dict built from it must load strictly into our
# modules and give the same embeddings.

def _bn(prefix, c, out):
    for k in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.{k}"] = (c,)
    out[f"{prefix}.num_batches_tracked"] = ()


def insightface_iresnet_layout(depths, emb=512):
    out = OrderedDict()
    out["conv1.weight"] = (64, 3, 3, 3)
    _bn("bn1", 64, out)
    out["prelu.weight"] = (64,)
    cin = 64
    for s, (depth, w) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
        for b in range(depth):
            p = f"layer{s}.{b}"
            _bn(f"{p}.bn1", cin, out)
            out[f"{p}.conv1.weight"] = (w, cin, 3, 3)
            _bn(f"{p}.bn2", w, out)
            out[f"{p}.prelu.weight"] = (w,)
            out[f"{p}.conv2.weight"] = (w, w, 3, 3)
            _bn(f"{p}.bn3", w, out)
            if b == 0:
                out[f"{p}.downsample.0.weight"] = (w, cin, 1, 1)
                _bn(f"{p}.downsample.1", w, out)
            cin = w
    _bn("bn2", 512, out)
    out["fc.weight"] = (emb, 512 * 7 * 7)
    out["fc.bias"] = (emb,)
    _bn("features", emb, out)
    return out


def _conv_block(prefix, cin, cout, k, groups, out, act=True):
    out[f"{prefix}.layers.0.weight"] = (cout, cin // groups, k, k)
    _bn(f"{prefix}.layers.1", cout, out)
    if act:
        out[f"{prefix}.layers.2.weight"] = (cout,)


def _depthwise(prefix, cin, cout, hidden, out):
    _conv_block(f"{prefix}.layers.0", cin, hidden, 1, 1, out)
    _conv_block(f"{prefix}.layers.1", hidden, hidden, 3, hidden, out)
    _conv_block(f"{prefix}.layers.2", hidden, cout, 1, 1, out, act=False)


# (kind, cin, cout, hidden/groups, count, stride) of arcface_torch's mbf (blocks 1,4,6,2, scale 2)
MBF_PLAN = [("conv", 3, 128, 1, 1, 2), ("conv", 128, 128, 64, 1, 1), ("dw", 128, 128, 128, 1, 2),
            ("res", 128, 128, 128, 4, 1), ("dw", 128, 256, 256, 1, 2), ("res", 256, 256, 256, 6, 1),
            ("dw", 256, 256, 512, 1, 2), ("res", 256, 256, 256, 2, 1)]


def insightface_mbf_layout(emb=512):
    out = OrderedDict()
    for i, (kind, cin, cout, g, n, _) in enumerate(MBF_PLAN):
        if kind == "conv":
            _conv_block(f"layers.{i}", cin, cout, 3, g, out)
        elif kind == "dw":
            _depthwise(f"layers.{i}", cin, cout, g, out)
        else:
            for j in range(n):
                _depthwise(f"layers.{i}.layers.{j}", cin, cout, g, out)
    _conv_block("conv_sep", 256, 512, 1, 1, out)
    _conv_block("features.layers.0", 512, 512, 7, 512, out, act=False)
    out["features.layers.2.weight"] = (emb, 512)
    _bn("features.layers.3", emb, out)
    return out


def random_state(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g, dtype=torch.float64) / fan_in ** 0.5
        elif k.startswith("fc.weight") or len(shape) == 2:
            sd[k] = torch.randn(shape, generator=g, dtype=torch.float64) / shape[1] ** 0.5
        else:
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) \
                if k.endswith("weight") else 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return sd


def _f_bn(x, sd, p, eps=1e-5):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, eps=eps)


def reference_iresnet_forward(sd, x, depths):
    x = F.prelu(_f_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"), sd["prelu.weight"])
    for s, depth in enumerate(depths, start=1):
        for b in range(depth):
            p, stride = f"layer{s}.{b}", (2 if b == 0 else 1)
            y = _f_bn(x, sd, f"{p}.bn1")
            y = F.conv2d(y, sd[f"{p}.conv1.weight"], padding=1)
            y = F.prelu(_f_bn(y, sd, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            y = _f_bn(F.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=1), sd, f"{p}.bn3")
            if b == 0:
                x = _f_bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2), sd, f"{p}.downsample.1")
            x = x + y
    x = _f_bn(x, sd, "bn2").flatten(1)
    x = F.linear(x, sd["fc.weight"], sd["fc.bias"])
    return _f_bn(x, sd, "features")


def _f_conv_block(x, sd, p, stride, padding, groups, act=True):
    x = _f_bn(F.conv2d(x, sd[f"{p}.layers.0.weight"], stride=stride, padding=padding, groups=groups),
              sd, f"{p}.layers.1")
    return F.prelu(x, sd[f"{p}.layers.2.weight"]) if act else x


def _f_depthwise(x, sd, p, hidden, stride):
    y = _f_conv_block(x, sd, f"{p}.layers.0", 1, 0, 1)
    y = _f_conv_block(y, sd, f"{p}.layers.1", stride, 1, hidden)
    return _f_conv_block(y, sd, f"{p}.layers.2", 1, 0, 1, act=False)


def reference_mbf_forward(sd, x):
    for i, (kind, _, _, g, n, stride) in enumerate(MBF_PLAN):
        if kind == "conv":
            x = _f_conv_block(x, sd, f"layers.{i}", stride, 1, g)
        elif kind == "dw":
            x = _f_depthwise(x, sd, f"layers.{i}", g, stride)
        else:
            for j in range(n):
                x = x + _f_depthwise(x, sd, f"layers.{i}.layers.{j}", g, 1)
    x = _f_conv_block(x, sd, "conv_sep", 1, 0, 1)
    x = _f_conv_block(x, sd, "features.layers.0", 1, 0, 512, act=False).flatten(1)
    x = F.linear(x, sd["features.layers.2.weight"])
    return _f_bn(x, sd, "features.layers.3")


@pytest.mark.parametrize("name,layout,reference", [
    ("r18", lambda: insightface_iresnet_layout((2, 2, 2, 2)),
     lambda sd, x: reference_iresnet_forward(sd, x, (2, 2, 2, 2))),
    ("mbf", insightface_mbf_layout, reference_mbf_forward),
])
def test_arcface_torch_state_dict_loads_strictly_and_gives_the_same_embeddings(name, layout, reference):
    expected = layout()
    model = build_backbone(name).double().eval()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(expected)          # same names, same order
    assert ours == expected                      # same shapes
    sd = random_state(expected)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(x), reference(sd, x)
    assert want.abs().mean() > 1e-2                  # a non-trivial embedding
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_vit_names_follow_arcface_torch():
    keys = list(build_backbone("vit_t", depth=1).state_dict())
    assert "pos_embed" in keys
    for k in ["patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "norm.weight", "feature.0.weight", "feature.1.running_var",
              "feature.2.weight", "feature.3.bias", "mask_token"]:
        assert k in keys, k
    assert "blocks.0.attn.qkv.bias" not in keys and "feature.0.bias" not in keys
    sd = build_backbone("vit_t", depth=1).state_dict()
    assert sd["pos_embed"].shape == (1, 144, 256) and sd["feature.0.weight"].shape == (256, 144 * 256)


# --- gradient checkpointing, precision, memory format -----------------------------------------------

def _train_step(name, checkpointing, options, seed=0):
    torch.manual_seed(seed)
    model = build_backbone(name, embedding_size=32, gradient_checkpointing=checkpointing, **options).train()
    x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(3), requires_grad=True)
    torch.manual_seed(11)   # same dropout / drop-path / token-mask draws in both runs
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), x.grad.clone(), grads, buffers


@pytest.mark.parametrize("name,options", [("tiny", {"dropout": 0.2}), ("mbf", {}),
                                          ("vit_t", {"depth": 2, "drop_path_rate": 0.5})])
def test_gradient_checkpointing_gives_the_same_outputs_grads_and_norm_statistics(name, options):
    out0, gx0, g0, b0 = _train_step(name, False, options)
    out1, gx1, g1, b1 = _train_step(name, True, options)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() and len(g0) > 5
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in b0:   # running statistics updated once per step, not twice
        torch.testing.assert_close(b1[k], b0[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["tiny", "mbf"])
def test_channels_last_gives_the_same_embeddings(name):
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,options", [("tiny", {}), ("vit_t", {"depth": 1})])
def test_fp16_option_runs_the_body_in_half_precision_and_returns_float32(name, options):
    torch.manual_seed(0)
    full = build_backbone(name, **options).eval()
    half = build_backbone(name, fp16=True, **options).eval()
    half.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want, got = full(x), half(x)
    assert got.dtype == torch.float32
    assert not torch.equal(got, want)                                # really ran in lower precision
    cos = F.cosine_similarity(got, want)
    assert (cos > 0.98).all(), cos


def test_iresnet_output_norm_scale_is_frozen_like_arcface_torch():
    model = build_backbone("tiny")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))
