"""Optimizer and learning-rate schedule, step-based (never epoch-based)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from vitcore.config import OptimConfig

# Embeddings and tokens are not decayed, as in the ViT/DeiT recipes; neither are biases or norms.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over two groups: decayed matrices, undecayed biases/norms/embeddings.

    The fused implementation is used because it can skip an update on a device-side
    `found_inf` flag (see `skip_if_nonfinite`), which keeps the non-finite guard free of host syncs.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_NAMES) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def skip_if_nonfinite(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Make the next fused `step()` a no-op when `found_inf` (a 0-d float tensor) is 1.

    This is the hook torch's GradScaler uses; the optimizer then leaves parameters, moments
    and its step count untouched, decided on the device without a `.item()`.
    """
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min((step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
