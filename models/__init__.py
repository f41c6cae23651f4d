"""Face-embedding backbones (IResNet, MobileFaceNet, ViT) behind a name -> constructor registry.

    backbone = build_backbone("r50", embedding_size=512)    # (N, 3, 112, 112) -> (N, 512)

Plain PyTorch modules: nothing here knows about distribution, files or training.
"""
from .registry import build_backbone, list_backbones, register_backbone, resolve_name

__all__ = ["build_backbone", "list_backbones", "register_backbone", "resolve_name"]
