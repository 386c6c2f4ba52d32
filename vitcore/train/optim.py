"""Optimizer and learning-rate schedule, step-based (never epoch-based).

The model says what is special about its parameters, as in timm: any submodule may define
`no_weight_decay() -> set[str]` (parameter names relative to it, never decayed) and, for
layer-wise lr decay, `num_layers() -> int` and `layer_id(name) -> int` (see `vitcore.model.vit.ViT`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from vitcore.config import OptimConfig


def no_weight_decay(model: nn.Module) -> set[str]:
    """Full names of the parameters the model's submodules exempt from weight decay."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_weight_decay() names {sorted(unknown)}, which are not parameters of the model")
    return names


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Parameter name -> lr multiplier `layer_decay ** (num_layers - 1 - layer_id)`.

    A parameter takes its layer from the outermost submodule defining `layer_id` that holds it;
    one outside every such submodule (a task's head, say) is in the top layer, scale 1.
    """
    layered = [(prefix, m) for prefix, m in model.named_modules() if hasattr(m, "layer_id") and hasattr(m, "num_layers")]
    scales = {}
    for name, _ in model.named_parameters():
        scales[name] = 1.0
        for prefix, module in layered:  # pre-order: the outermost owner comes first
            if not prefix or name.startswith(prefix + "."):
                n, i = module.num_layers(), module.layer_id(name[len(prefix) + 1 :] if prefix else name)
                if not 0 <= i < n:
                    raise ValueError(f"layer_id({name!r}) = {i} is outside [0, {n})")
                scales[name] = layer_decay ** (n - 1 - i)
                break
    return scales


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr_scale, weight_decay), lowest scale first, decayed
    before undecayed; biases, norms (ndim <= 1) and the model's `no_weight_decay` are undecayed.

    With layer_decay = 1 that is two groups, [decayed, undecayed], as checkpoints have always held.
    """
    exempt, scales = no_weight_decay(model), layer_scales(model, cfg.layer_decay)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            wd = 0.0 if p.ndim <= 1 or name in exempt else cfg.weight_decay
            groups.setdefault((scales[name], wd), []).append(p)
    return [
        {"params": params, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": wd}
        for (scale, wd), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] == 0.0))
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum, no Nesterov) over `param_groups(model, cfg)`.

    The fused implementations are used because they can skip an update on a device-side
    `found_inf` flag (see `skip_if_nonfinite`), which keeps the non-finite guard free of host syncs.
    """
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False, fused=True)
        if cfg.momentum > 0:
            opt.register_step_pre_hook(_zero_momentum_buffers)
        return opt
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


def _zero_momentum_buffers(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Give every parameter a zero momentum buffer before its first SGD step.

    Fused SGD's first step allocates the buffers with `empty_like` and fills them in the kernel,
    which `found_inf` skips: a skipped first step would leave uninitialised memory that the next
    step then reads as momentum. A zero buffer makes the first step buf = grad, as torch's own.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def skip_if_nonfinite(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Make the next fused `step()` a no-op when `found_inf` (a 0-d float tensor) is 1.

    This is the hook torch's GradScaler uses; the optimizer then leaves parameters, moments
    (momentum buffers) and its step count untouched, decided on the device without a `.item()`.
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
    """Set the schedule's `lr` on every group, times the group's layer-wise `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
