"""Pictures of what a ViT attends to, and of a confusion matrix, as tensors for TensorBoard or PNG.

Attention rollout (Abnar & Zuidema, 2020) follows attention through the residual stream by
averaging heads, adding the identity for the skip connection and multiplying the layers. Its
inputs are the per-block weights in `ViTOutput.attentions` from `ViT(images, return_attention=True)`;
`attention_maps` runs that forward and draws the pictures the engine logs. Everything else is a
pure function of tensors; images come back as (3, H, W) floats in [0, 1], as `SummaryWriter.add_image`
takes them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from vitcore.model.pos_embed import Grid, grid_size
from vitcore.model.vit import ViT

# An 'inferno'-like ramp, black -> purple -> red -> orange -> pale yellow, sampled from matplotlib's
# inferno at 0, 1/4, ..., 1. Luminance rises monotonically, so bright always means high.
INFERNO: tuple[tuple[float, float, float], ...] = (
    (0.001, 0.000, 0.014),
    (0.341, 0.062, 0.429),
    (0.735, 0.216, 0.330),
    (0.978, 0.557, 0.035),
    (0.988, 0.998, 0.645),
)


def rollout(attentions: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout: how much each output token draws on each input token through all blocks.

    Per block (B, heads, T, T) weights -> (B, T, T) in float32, rows summing to 1. Each block's
    heads are averaged into A, mixed with the skip connection as A' = residual * I + (1 - residual) * A
    (the paper's 0.5 * A + 0.5 * I), rows renormalised, and the blocks multiplied with the first
    innermost: R = A'_L @ ... @ A'_1.
    """
    if not attentions:
        raise ValueError("rollout needs the attention weights of at least one block")
    result: torch.Tensor | None = None
    for attn in attentions:
        a = attn.float().mean(dim=1)  # (B, T, T)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (T, T)
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result  # (B, T, T)
    assert result is not None
    return result


def _normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (gh, gw) map of (..., gh, gw) to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(-2)  # (..., N)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape)


def _patch_maps(cls_row: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(..., T) attention from [CLS] to all tokens -> (..., gh, gw) over the patch tokens."""
    gh, gw = grid
    if cls_row.shape[-1] != 1 + gh * gw:
        raise ValueError(f"{cls_row.shape[-1]} tokens do not match [CLS] + a {gh}x{gw} grid")
    return cls_row[..., 1:].reshape(*cls_row.shape[:-1], gh, gw)


def cls_attention_map(attentions: list[torch.Tensor], grid: Grid, residual: float = 0.5) -> torch.Tensor:
    """(B, gh, gw) rollout of [CLS] over the patches, scaled to [0, 1] per image: where the model looks."""
    cls_row = rollout(attentions, residual)[:, 0]  # (B, T)
    return _normalise_maps(_patch_maps(cls_row, grid))


def last_layer_cls_heads(attentions: list[torch.Tensor], grid: Grid) -> torch.Tensor:
    """(B, heads, gh, gw) last block's [CLS] attention over the patches per head, each map scaled to [0, 1]."""
    if not attentions:
        raise ValueError("last_layer_cls_heads needs the attention weights of at least one block")
    cls_row = attentions[-1].float()[:, :, 0]  # (B, heads, T)
    return _normalise_maps(_patch_maps(cls_row, grid))


def colormap(values: torch.Tensor) -> torch.Tensor:
    """(...) values in [0, 1] -> (..., 3) RGB in [0, 1] on the INFERNO ramp, linearly interpolated."""
    stops = torch.tensor(INFERNO, dtype=torch.float32, device=values.device)  # (K, 3)
    pos = values.float().clamp(0.0, 1.0) * (len(INFERNO) - 1)
    i = pos.floor().long().clamp(max=len(INFERNO) - 2)  # (...) index of the lower stop
    t = (pos - i).unsqueeze(-1)  # (..., 1) position between stops i and i + 1
    return stops[i] * (1.0 - t) + stops[i + 1] * t  # (..., 3)


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Attention maps blended over their images, for TensorBoard's `add_image`.

    (B, 3, H, W) uint8 images (floats are taken as already in [0, 1]) and (B, gh, gw) maps in [0, 1]
    -> (3, H', W') float grid in [0, 1]: the images in the top row, the overlays below (nrow = B).
    """
    if images.ndim != 4 or images.shape[1] != 3 or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"expected (B, 3, H, W) images and (B, gh, gw) maps, got {tuple(images.shape)} "
                         f"and {tuple(maps.shape)}")
    pictures = _pictures(images)  # (B, 3, H, W)
    blended = _blend(pictures, maps, alpha)  # (B, 3, H, W)
    return make_grid(torch.cat([pictures, blended]), nrow=images.shape[0], padding=2).clamp(0.0, 1.0)


def head_overlays(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-head maps blended over their images: (B, 3, H, W) images and (B, heads, gh, gw) maps in
    [0, 1] -> (3, H', W') grid, one row per image: the image, then one overlay per head."""
    if images.ndim != 4 or maps.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"expected (B, 3, H, W) images and (B, heads, gh, gw) maps, got {tuple(images.shape)} "
                         f"and {tuple(maps.shape)}")
    B, heads = maps.shape[:2]
    pictures = _pictures(images)  # (B, 3, H, W)
    blended = _blend(pictures.repeat_interleave(heads, dim=0), maps.flatten(0, 1), alpha)  # (B*heads, 3, H, W)
    rows = torch.cat([pictures[:, None], blended.unflatten(0, (B, heads))], dim=1)  # (B, 1+heads, 3, H, W)
    return make_grid(rows.flatten(0, 1), nrow=1 + heads, padding=2).clamp(0.0, 1.0)


def attention_maps(vit: ViT, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"attention_rollout", "attention_heads"}: images for TensorBoard of where `vit` (in eval()
    mode) looks on uint8 (B, 3, H, W) `images`: the rollout of [CLS] over all blocks, and the last
    block's [CLS] attention per head."""
    with torch.no_grad():
        attentions = vit(images, return_attention=True).attentions
    grid = grid_size((images.shape[-2], images.shape[-1]), vit.cfg.patch_size)
    return {"attention_rollout": overlay(images, cls_attention_map(attentions, grid)),
            "attention_heads": head_overlays(images, last_layer_cls_heads(attentions, grid))}


def _pictures(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [0, 1]; float images are taken as already in [0, 1]."""
    images = images.detach()
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)


def _blend(pictures: torch.Tensor, maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, 3, H, W) pictures in [0, 1] with (B, gh, gw) maps upsampled and coloured over them."""
    maps = maps.detach().float().to(pictures.device)[:, None]  # (B, 1, gh, gw)
    up = F.interpolate(maps, size=pictures.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)
    heat = colormap(up[:, 0]).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return (1.0 - alpha) * pictures + alpha * heat


def confusion_image(matrix: torch.Tensor, class_names: Sequence[str] | None, cell: int = 16) -> torch.Tensor:
    """A (C, C) confusion matrix of counts (rows: true class, columns: predicted) as a (3, H, W)
    float image in [0, 1], coloured by each row's share (a row is one true class's images).

    With matplotlib: a figure with `class_names` (None: the class indices) on both axes, the count
    in every cell (up to `MAX_COUNTS` classes) and a colour scale. Without it (an optional extra):
    the bare heat map, `cell` pixels per entry, with 1-pixel grey grid lines between cells when
    cell >= 4. A row with no samples is drawn as zeros.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square (C, C) matrix, got {tuple(matrix.shape)}")
    class_names = [str(c) for c in range(matrix.shape[0])] if class_names is None else class_names
    if len(class_names) != matrix.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {matrix.shape[0]}-class confusion matrix")
    m = matrix.detach().float().cpu()
    totals = m.sum(dim=1, keepdim=True)  # (C, 1)
    rates = torch.where(totals > 0, m / totals.clamp_min(1e-12), torch.zeros_like(m))  # (C, C)
    try:
        figure = _confusion_figure(m, rates, class_names)
    except ImportError:  # matplotlib is an optional extra
        return _heat_map(rates, cell)
    return _render(figure)


MAX_COUNTS = 40  # above this many classes the cells are too small to hold their counts


def _confusion_figure(counts: torch.Tensor, rates: torch.Tensor, class_names: Sequence[str]) -> Any:
    """A matplotlib Figure (no pyplot state) of the matrix: names on the axes, counts, colour bar."""
    from matplotlib.figure import Figure

    c = counts.shape[0]
    side = min(3.0 + 0.45 * c, 30.0)  # inches: the figure grows with the classes, to a bound
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(rates.numpy(), cmap="inferno", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, label="share of the true class", shrink=0.8)
    ax.set_xticks(range(c), [str(n) for n in class_names], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(c), [str(n) for n in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= MAX_COUNTS:
        for i in range(c):
            for j in range(c):  # dark text on the bright end of the ramp, light on the dark end
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="black" if rates[i, j] > 0.6 else "white")
    return fig


def _render(fig: Any) -> torch.Tensor:
    """A matplotlib Figure -> (3, H, W) float image in [0, 1]."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = torch.from_numpy(np.asarray(canvas.buffer_rgba()).copy())  # (H, W, 4) uint8
    return rgba[..., :3].permute(2, 0, 1).float() / 255.0


def _heat_map(rates: torch.Tensor, cell: int) -> torch.Tensor:
    """(C, C) rates in [0, 1] -> (3, C * cell, C * cell) colours, grey grid lines when cell >= 4."""
    image = colormap(rates).permute(2, 0, 1)  # (3, C, C)
    image = image.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)  # (3, C*cell, C*cell)
    if cell >= 4:
        lines = torch.arange(1, rates.shape[0], device=image.device) * cell
        image[:, lines, :] = 0.5
        image[:, :, lines] = 0.5
    return image

