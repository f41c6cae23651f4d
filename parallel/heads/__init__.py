"""Class-center strategies behind one interface (see base.py). `build_head` picks one by name."""
from __future__ import annotations

from parallel.heads.base import Head, HeadOutput
from parallel.heads.config import HeadConfig
from parallel.heads.dcq import DcqHead
from parallel.heads.f2c import F2cHead
from parallel.heads.mutual import MutualHead
from parallel.heads.parametric import FullHead, PartialHead

HEADS: dict[str, type] = {"full": FullHead, "partial": PartialHead, "mutual": MutualHead}
HEADS["dcq"] = DcqHead
HEADS["f2c"] = F2cHead


def register_head(name: str, cls: type) -> None:
    HEADS[name] = cls


def build_head(cfg: HeadConfig, state, num_classes: int, embedding_size: int) -> Head:
    cfg.validate()
    if cfg.type not in HEADS:
        raise ValueError(f"head.type: {cfg.type!r} is not built in this version; available: {', '.join(HEADS)}")
    return HEADS[cfg.type](cfg, state, num_classes, embedding_size)


__all__ = ["Head", "HeadOutput", "HeadConfig", "build_head", "register_head", "HEADS"]
