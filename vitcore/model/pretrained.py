"""Loading a pretrained encoder into a ViT built at the fine-tuning resolution, once; and loading
the whole ViT a checkpoint holds (`load_model`, for evaluation, prediction and export).

Sources: a pretraining checkpoint of ours (a checkpoint directory, `latest`, a run's
`checkpoints/` or run directory, or the checkpoint's `model.safetensors`), or a timm
`VisionTransformer` state dict (`.safetensors`, or `.pth`/`.pt`/`.bin` read with
`torch.load(weights_only=True)`, bare or under "model" / "state_dict"). The position embeddings
are resampled here to the model's grid, so the forward pass never has to.

Keys are matched strictly: apart from the parts dropped on purpose (a pretraining head, the
[mask] token, a classifier head), every encoder weight must come from the source with the
model's shape, and the source may hold nothing else. The model's own head is left as built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vitcore import checkpoint
from vitcore.config import WIDTHS
from vitcore.model.pos_embed import Grid, grid_size, resample_pos_embed
from vitcore.model.vit import ViT, ViTConfig

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
OPTIONAL = ("head.weight", "head.bias")  # the target's classifier: kept as built (freshly initialised)


@dataclass
class LoadReport:
    source: str  # "checkpoint <dir> (<stage>, step N)" or "timm state dict <file>"
    loaded: list[str] = field(default_factory=list)  # target keys copied from the source
    skipped: list[str] = field(default_factory=list)  # source keys dropped on purpose, by source name
    pos_embed: str | None = None  # "pos_embed 8x8 -> 12x12"; None when the grid is unchanged

    def lines(self) -> list[str]:
        """Human log lines describing what was loaded."""
        parts = [f"init_from: {self.source}: {len(self.loaded)} tensors loaded"]
        parts.append(self.pos_embed or "pos_embed unchanged")
        if self.skipped:
            parts.append(f"dropped: {_names(self.skipped)}")
        return ["; ".join(parts)]


@dataclass
class _Source:
    kind: str  # "checkpoint" or "timm state dict", for the mismatch error
    description: str  # for LoadReport.source
    weights: dict[str, torch.Tensor]  # encoder weights under the target's (timm's) names
    skipped: list[str]
    arch: str  # "Nano/8 (dim 128, depth 6, heads 4, patch 8)", for the mismatch error
    shape: tuple[int, int, int | None, int]  # (dim, depth, heads or None when unknown, patch)
    grid: Grid  # the grid the stored position embeddings are for


def load_encoder(vit: ViT, path: str | Path) -> LoadReport:
    """Copy a pretrained encoder into `vit`, resampling its position embeddings to `vit.grid`.

    Raises ValueError (one line) when the source's architecture differs from `vit.cfg`, when it is
    a timm model this ViT cannot represent (no [CLS], register or distillation tokens, position
    embeddings not on 1 + a square grid), or when the keys do not match; FileNotFoundError when
    `path` is neither a checkpoint nor a state dict file. `vit.head` is not touched.
    """
    target = vit.state_dict()
    src = _read(Path(path), set(target))
    cfg = vit.cfg
    dim, depth, heads, patch = src.shape
    if (dim, depth, patch) != (cfg.dim, cfg.depth, cfg.patch_size) or heads not in (None, cfg.heads):
        raise ValueError(f"init_from: the {src.kind} is {src.arch} "
                         f"but the model is {_describe_model(cfg)}")

    weights = dict(src.weights)
    pos = weights.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[1] != 1 + src.grid[0] * src.grid[1]:
        shape = "none" if pos is None else tuple(pos.shape)
        raise ValueError(f"init_from: {src.description} has pos_embed of shape {shape}, "
                         f"expected (1, 1 + {src.grid[0]}x{src.grid[1]}, {dim})")
    report = LoadReport(source=src.description, skipped=src.skipped)
    if tuple(src.grid) != tuple(vit.grid):
        weights["pos_embed"] = resample_pos_embed(pos, src.grid, vit.grid)  # (1, 1 + gh*gw, D)
        report.pos_embed = f"pos_embed {_grid(src.grid)} -> {_grid(vit.grid)}"

    _check_keys(target, weights, src.description)
    with torch.no_grad():
        result = vit.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(OPTIONAL), result
    report.loaded = list(weights)
    return report


def load_model(path: str | Path, image_size: tuple[int, int] | None = None,
               prefix: str | None = None) -> tuple[ViT, dict[str, Any]]:
    """The ViT a checkpoint of ours holds, in eval mode, and the checkpoint's meta.json.

    Built from meta["arch"] at `image_size` (default: the stored resolution), the stored position
    embeddings resampled once to its grid. A task whose model classifies declares `num_classes` and
    `pooling` in its meta (and `classes`); the ViT then has that head, else it is the bare encoder
    (num_classes=0). The weights are those under `prefix` in model.safetensors (default:
    meta["encoder_prefix"]; another copy of the same ViT, an EMA say, lives under its own prefix).
    Raises ValueError when `image_size` is not divisible by the patch size, FileNotFoundError when
    `path` holds no checkpoint; the keys are matched strictly.
    """
    meta = checkpoint.load_meta(path)
    arch = meta["arch"]
    size = tuple(image_size or arch["image_size"])
    grid_size(size, arch["patch_size"])  # a ValueError naming the size and the patch
    vit = ViT(ViTConfig(dim=arch["dim"], depth=arch["depth"], heads=arch["heads"], patch_size=arch["patch_size"],
                        image_size=size, mlp_ratio=arch.get("mlp_ratio", 4),
                        num_classes=meta.get("num_classes", 0), pool=meta.get("pooling", "cls")))
    prefix = meta["encoder_prefix"] if prefix is None else prefix
    weights = {k[len(prefix):]: v for k, v in checkpoint.load_weights(path).items() if k.startswith(prefix)}
    stored = tuple(arch["grid"]) if "grid" in arch else grid_size(tuple(arch["image_size"]), arch["patch_size"])
    weights["pos_embed"] = resample_pos_embed(weights["pos_embed"], stored, vit.grid)  # (1, 1 + gh*gw, D)
    vit.load_state_dict(weights)  # strict: every key, every shape
    return vit.eval(), meta


def _read(path: Path, target_keys: set[str]) -> _Source:
    if path.is_file() and path.name == checkpoint.WEIGHTS and (path.parent / checkpoint.META).is_file():
        return _read_checkpoint(path.parent)
    if path.is_file():
        if path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
            return _read_timm(path, target_keys)
        raise ValueError(f"init_from: {path} is neither a checkpoint directory nor a state dict "
                         f"(.safetensors, {', '.join(TORCH_SUFFIXES)})")
    try:
        ckpt = checkpoint.resolve(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init_from: {e}, and it is not a state dict file") from None
    return _read_checkpoint(ckpt)


def _read_checkpoint(ckpt: Path) -> _Source:
    """Our checkpoint: the encoder's weights under meta["encoder_prefix"], prefix stripped."""
    meta = checkpoint.load_meta(ckpt)
    stage = meta.get("stage", "unknown")
    description = f"checkpoint {ckpt} ({stage}, step {meta.get('step')})"
    if "encoder_prefix" not in meta or "arch" not in meta:
        raise ValueError(f"init_from: {description} has no encoder_prefix/arch in its {checkpoint.META}")
    prefix, arch = meta["encoder_prefix"], meta["arch"]
    weights, skipped = {}, []
    for key, value in checkpoint.load_weights(ckpt).items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is None or name.startswith("head."):  # the pretraining head, [mask] token, a classifier
            skipped.append(key)
        else:
            weights[name] = value
    shape = (arch["dim"], arch["depth"], arch["heads"], arch["patch_size"])
    grid = tuple(arch["grid"]) if "grid" in arch else grid_size(tuple(arch["image_size"]), arch["patch_size"])
    variant = arch.get("variant")
    return _Source("checkpoint", description, weights, skipped, _describe(variant, *shape), shape, grid)


def _read_timm(path: Path, target_keys: set[str]) -> _Source:
    """A timm VisionTransformer state dict: our module names are timm's, so keys map one to one."""
    description = f"timm state dict {path}"
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        for wrapper in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"init_from: {description} is not a state dict of tensors")
    if "cls_token" not in state:
        raise ValueError(f"init_from: {description} has no class token (cls_token); this ViT needs one")
    extra = [k for k in ("reg_token", "dist_token") if k in state]
    if extra:
        raise ValueError(f"init_from: {description} has extra prefix tokens ({', '.join(extra)}); "
                         "this ViT has [CLS] only")
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"init_from: {description} has no pos_embed or patch_embed.proj.weight")
    proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise ValueError(f"init_from: {description} has a patch embedding of shape {tuple(proj.shape)}, "
                         "expected (D, 3, p, p)")
    n = state["pos_embed"].shape[1] - 1
    side = math.isqrt(max(n, 0))
    if n <= 0 or side * side != n:
        raise ValueError(f"init_from: {description} has {n + 1} position embeddings, not 1 + a square grid "
                         "(a model without a [CLS] position, or a non-square grid)")
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    dim, patch = state["cls_token"].shape[-1], proj.shape[-1]

    weights, skipped = {}, []
    for key, value in state.items():
        pooling = key.startswith(("fc_norm.", "head_drop.")) and key not in target_keys
        if key.startswith("head.") or pooling:  # the classifier: the target keeps its own
            skipped.append(key)
        else:
            weights[key] = value
    shape = (dim, depth, None, patch)  # the head count is not in a state dict (qkv is (3D, D) for any)
    return _Source("timm state dict", description, weights, skipped, _describe(None, *shape), shape, (side, side))


def _check_keys(target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], description: str) -> None:
    """Every target key but the head is provided, with the target's shape, and nothing else is."""
    missing = [k for k in target if k not in weights and k not in OPTIONAL]
    unexpected = [k for k in weights if k not in target]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
                  for k, v in weights.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} {_names(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"init_from: {description} does not match the model: {'; '.join(problems)}")


def _describe(variant: str | None, dim: int, depth: int, heads: int | None, patch: int) -> str:
    dims = f"dim {dim}, depth {depth}" + (f", heads {heads}" if heads is not None else "") + f", patch {patch}"
    return f"{variant} ({dims})" if variant else f"a ViT ({dims})"


def _describe_model(cfg: ViTConfig) -> str:
    width = next((w for w, s in WIDTHS.items() if s == dict(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)), None)
    return _describe(f"{width}/{cfg.patch_size}" if width else None, cfg.dim, cfg.depth, cfg.heads, cfg.patch_size)


def _grid(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def _names(keys: list[str], limit: int = 8) -> str:
    """Comma-separated, the first `limit` only."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
