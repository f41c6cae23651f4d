"""Name -> constructor registry of backbones."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .iresnet import IResNet, iresnet, iresnet_tiny
from .mobilefacenet import MobileFaceNet
from .vit import VisionTransformer, vit


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[..., nn.Module]
    options: frozenset          # keyword options the constructor accepts
    description: str


_REGISTRY: dict[str, BackboneSpec] = {}
_ALIASES: dict[str, str] = {}


def register_backbone(name: str, build: Callable[..., nn.Module], options, description: str,
                      aliases=()) -> None:
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = BackboneSpec(name, build, frozenset(options), description)
    for alias in aliases:
        _ALIASES[alias] = name


def list_backbones() -> list[str]:
    """Registered canonical names (aliases such as `iresnet50` resolve to them)."""
    return list(_REGISTRY)


def resolve_name(name: str) -> str:
    canonical = _ALIASES.get(name, name)
    if canonical not in _REGISTRY:
        known = ", ".join(list(_REGISTRY) + list(_ALIASES))
        raise ValueError(f"unknown backbone {name!r}; known backbones: {known}")
    return canonical


def build_backbone(name: str, embedding_size: int = 512, **options) -> nn.Module:
    """A backbone mapping (N, 3, 112, 112) float in [-1, 1] -> (N, embedding_size).

    Common options: `dropout` (before the embedding linear layer), `fp16` (body under autocast in the
    device's fast half type: float16 on CUDA, bfloat16 on CPU), `gradient_checkpointing`. ViTs also
    take `depth`, `drop_path_rate`, `mask_ratio`; iresnets `depths` (tiny only).
    """
    spec = _REGISTRY[resolve_name(name)]
    unknown = sorted(set(options) - spec.options)
    if unknown:
        raise ValueError(f"backbone {spec.name!r} does not take option(s) {', '.join(unknown)}; "
                         f"it takes: {', '.join(sorted(spec.options))}")
    if embedding_size <= 0:
        raise ValueError(f"embedding_size must be positive, got {embedding_size}")
    model = spec.build(embedding_size=embedding_size, **options)
    model.backbone_name = spec.name
    return model


_IRESNET_OPTIONS = {"dropout", "fp16", "gradient_checkpointing"}
for _depth in (18, 34, 50, 100, 200):
    register_backbone(
        f"r{_depth}",
        lambda embedding_size, _d=_depth, **o: iresnet(_d, embedding_size, **o),
        _IRESNET_OPTIONS,
        f"IResNet-{_depth} (arcface_torch layout)",
        aliases=(f"iresnet{_depth}",),
    )
register_backbone("tiny", iresnet_tiny, _IRESNET_OPTIONS | {"depths"},
                  "small IResNet (16-128 channels, stride-2 stem) for CPU demos and tests",
                  aliases=("iresnet_tiny",))
_MBF_OPTIONS = {"dropout", "fp16", "gradient_checkpointing"}
register_backbone("mbf", lambda embedding_size, **o: MobileFaceNet((1, 4, 6, 2), 2, embedding_size, **o),
                  _MBF_OPTIONS, "MobileFaceNet (arcface_torch layout)", aliases=("mobilefacenet",))
register_backbone("mbf_large", lambda embedding_size, **o: MobileFaceNet((2, 8, 12, 4), 4, embedding_size, **o),
                  _MBF_OPTIONS, "MobileFaceNet-large (arcface_torch layout)")
_VIT_OPTIONS = {"dropout", "fp16", "gradient_checkpointing", "depth", "drop_path_rate", "mask_ratio"}
for _size in ("t", "s", "b"):
    register_backbone(f"vit_{_size}", lambda embedding_size, _s=_size, **o: vit(_s, embedding_size, **o),
                      _VIT_OPTIONS, f"ViT-{_size.upper()} for 112x112 faces (arcface_torch layout)")

__all__ = ["build_backbone", "list_backbones", "register_backbone", "resolve_name",
           "IResNet", "MobileFaceNet", "VisionTransformer"]
