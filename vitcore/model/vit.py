"""The Vision Transformer encoder (Dosovitskiy et al., 2021), readable in one sitting.

Submodules are named as in timm's `VisionTransformer` (patch_embed.proj, blocks.i.attn.qkv, ...)
so that our state dict is timm's: exporting the weights is a key-for-key copy (`vitcore.report.export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitcore.config import WIDTHS, parse_variant
from vitcore.model.inputs import normalize
from vitcore.model.pos_embed import Grid, grid_size, resample_pos_embed

@dataclass
class ViTConfig:
    dim: int
    depth: int
    heads: int
    patch_size: int
    image_size: tuple[int, int] = (224, 224)  # the grid the position embeddings are stored for
    mlp_ratio: int = 4
    num_classes: int = 0  # 0: no classification head (pretraining); >0: a linear head
    pool: str = "cls"  # what the head reads: "cls" (the paper) or "avg" (mean of the final patch tokens)
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block, linearly 0 -> rate over depth

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> ViTConfig:
        """Build the config of a named variant such as "B/16"; keyword arguments override fields."""
        width, patch = parse_variant(variant)
        image_size = overrides.pop("image_size", 224)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        return cls(**WIDTHS[width], patch_size=patch, image_size=tuple(image_size), **overrides)

    @property
    def grid(self) -> Grid:
        return grid_size(self.image_size, self.patch_size)


@dataclass
class ViTOutput:
    cls: torch.Tensor  # (B, D) final-norm [CLS] representation
    patches: torch.Tensor  # (B, N, D) final-norm patch tokens, row-major over the grid
    pooled: torch.Tensor  # (B, D) what the head reads: `cls`, or the mean of `patches`
    logits: torch.Tensor | None = None  # (B, num_classes) when the model has a head
    attentions: list[torch.Tensor] = field(default_factory=list)  # per block (B, heads, 1+N, 1+N)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class PatchEmbed(nn.Module):
    """Image -> patch tokens. A conv with kernel = stride = patch is patchify + flatten + linear."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        grid = grid_size((x.shape[2], x.shape[3]), self.patch_size)  # a conv would silently crop
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D), N = gh * gw


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v projection: one matmul instead of three
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        attn = None
        if return_attention:
            # SDPA does not expose the weights, so the inspection path computes them explicitly.
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, heads, T, T)
            out = F.dropout(attn, self.attn_dropout, self.training) @ v
        else:
            p = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(out)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = Mlp(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + drop_path(y, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, attn


class ViT(nn.Module):
    """ViT encoder: [CLS] + patch tokens + learned 1D position embeddings -> L blocks -> LayerNorm.

    Any input size divisible by the patch size works; the stored position embeddings (for
    `cfg.image_size`) are resampled bicubically to the input's grid when they differ.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.grid
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT initialisation: position embeddings and linear weights (the head's too) from
        truncated normal(0.02), zero biases, the [CLS] token from normal(1e-6), and the patch-embedding
        conv and the norms at PyTorch's defaults (the conv: kaiming-uniform, std 1/sqrt(3 * fan_in),
        about 0.04 for 8x8 RGB patches). This code once zero-initialised the head (the paper's
        fine-tuning) and drew the conv from normal(0.02): from scratch, the zero head alone cost 8
        points of top-1 at 500 steps (a zero head passes the encoder no gradient until it grows),
        the conv about 2 (docs/benchmarks.md, peer parity)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """(B, 3, H, W) pixels on the 0-255 scale (uint8; float after MixUp) -> (B, N, D) patch
        embeddings, before positions are added. The stem normalises the pixels here, the one place
        (`vitcore.model.inputs`): an exported timm model gets the statistics in its pretrained_cfg.

        Split from `forward_tokens` so a task can corrupt embeddings in between (MPP does).
        """
        return self.patch_embed(normalize(images))

    def forward_tokens(
        self, tokens: torch.Tensor, grid: Grid, return_attention: bool = False
    ) -> ViTOutput:
        """(B, N, D) patch embeddings on a `grid` -> encoder outputs."""
        pos = resample_pos_embed(self.pos_embed, self.grid, grid)  # (1, 1+N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1) + pos[:, :1]
        x = self.pos_drop(torch.cat([cls, tokens + pos[:, 1:]], dim=1))  # (B, 1+N, D)
        attentions = []
        for block in self.blocks:
            x, attn = block(x, return_attention)
            if attn is not None:
                attentions.append(attn)
        x = self.norm(x)
        pooled = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
        logits = self.head(pooled) if isinstance(self.head, nn.Linear) else None
        return ViTOutput(cls=x[:, 0], patches=x[:, 1:], pooled=pooled, logits=logits, attentions=attentions)

    def forward(self, images: torch.Tensor, return_attention: bool = False) -> ViTOutput:
        """(B, 3, H, W) pixels on the 0-255 scale -> encoder outputs."""
        return self.forward_tokens(*self.embed_patches(images), return_attention=return_attention)

    def no_weight_decay(self) -> set[str]:
        """Parameters never weight-decayed besides biases and norms (read by `vitcore.train.optim`)."""
        return {"pos_embed", "cls_token"}

    def num_layers(self) -> int:
        """Layers for layer-wise lr decay: the embeddings, each block, then norm and head."""
        return self.cfg.depth + 2

    def layer_id(self, name: str) -> int:
        """Layer of parameter `name`: 0 for the embeddings, i + 1 for blocks.i, depth + 1 for norm/head."""
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1


def flops_per_image(cfg: ViTConfig, image_size: tuple[int, int] | None = None) -> int:
    """Forward matmul FLOPs for one image (2 per multiply-add), as in nanoGPT's estimate_mfu."""
    gh, gw = grid_size(image_size or cfg.image_size, cfg.patch_size)
    n, t, d = gh * gw, gh * gw + 1, cfg.dim
    patch = 2 * n * 3 * cfg.patch_size**2 * d
    per_block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * cfg.mlp_ratio * d
    head = 2 * d * cfg.num_classes
    return patch + cfg.depth * per_block + head

