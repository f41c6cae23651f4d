"""Vision Transformer for 112x112 faces (ViT-T/S/B of arcface_torch).

Parameter names and shapes follow insightface's arcface_torch `vit.py`:

    patch_embed.proj            9x9 conv, stride 9: 112x112 -> 12x12 = 144 tokens (no class token)
    pos_embed (1, 144, D), mask_token (1, 1, D)
    blocks.{i}.{norm1, attn.qkv (no bias), attn.proj, norm2, mlp.fc1, mlp.fc2}   pre-norm, ReLU6 MLP
    norm                        LayerNorm
    feature.{0 linear 144*D -> D, 1 BatchNorm1d, 2 linear D -> E, 3 BatchNorm1d}

In training a share `mask_ratio` of the tokens (per sample, at random) skips the blocks and is
replaced by `mask_token` after the final norm, as in arcface_torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DropPath, body_autocast, run_segment


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        # qkv (3, N, heads, T, dim/heads); attention itself in float32, as arcface_torch does
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(n, tokens, dim)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)   # (N, T, D)


class VisionTransformer(nn.Module):
    """(N, 3, 112, 112) float in [-1, 1] -> (N, embedding_size)."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int = 8,
        embedding_size: int = 512,
        img_size: int = 112,
        patch_size: int = 9,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        dropout: float = 0.0,
        fp16: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.mask_ratio = mask_ratio
        self.embed_dim = embed_dim
        self.embedding_size = embedding_size
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 0 else []
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _keep_indices(self, n: int, tokens: int, device) -> torch.Tensor:
        """(N, kept) indices of the tokens each sample keeps, drawn uniformly without replacement."""
        kept = int(tokens * (1.0 - self.mask_ratio))
        return torch.rand(n, tokens, device=device).argsort(dim=1)[:, :kept]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        with body_autocast(x, self.fp16):
            x = self.patch_embed(x) + self.pos_embed                  # (N, T, D)
            masking = self.training and self.mask_ratio > 0
            if masking:
                keep = self._keep_indices(n, self.num_patches, x.device)          # (N, K)
                x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))
            for block in self.blocks:
                x = run_segment(block, x, self.gradient_checkpointing)
        x = self.norm(x.to(self.norm.weight.dtype))
        if masking:
            full = self.mask_token.to(x.dtype).expand(n, self.num_patches, self.embed_dim).clone()
            x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, self.embed_dim), x)
        x = self.dropout(x.reshape(n, self.num_patches * self.embed_dim))
        return self.feature(x)


VIT_SIZES = {
    "t": dict(embed_dim=256, depth=12, num_heads=8),
    "s": dict(embed_dim=512, depth=12, num_heads=8),
    "b": dict(embed_dim=512, depth=24, num_heads=8),
}


def vit(size: str, embedding_size: int = 512, **options) -> VisionTransformer:
    """`size` t/s/b as in arcface_torch (vit_b differs from vit_s only in depth); `depth` may be
    overridden, e.g. for quick tests."""
    config = dict(VIT_SIZES[size])
    config.update(options)
    return VisionTransformer(embedding_size=embedding_size, **config)
