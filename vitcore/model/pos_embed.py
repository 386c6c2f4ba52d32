"""Resampling learned position embeddings to a new patch grid.

One function serves both the encoder's forward pass at a resolution it was not built for and
checkpoint adaptation for fine-tuning at a higher resolution: the two must agree exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Grid = tuple[int, int]


def grid_size(image_size: int | tuple[int, int], patch_size: int) -> Grid:
    """The (rows, cols) patch grid of an image; raises if a side is not a multiple of the patch."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    return h // patch_size, w // patch_size


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: Grid, new_grid: Grid, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resample (1, prefix + gh*gw, D) position embeddings from `old_grid` to `new_grid`.

    The prefix ([CLS]) positions are kept as they are; the grid part is treated as a D-channel
    image and resized with 2D bicubic interpolation with antialias=True, as timm resamples (the
    paper's own code interpolates bilinearly; antialiasing smooths when shrinking and changes
    PyTorch's bicubic kernel slightly when enlarging). Computed in float32 whatever the input
    dtype, because bicubic in bf16 visibly distorts the embeddings; returned in the input dtype.
    Identity when the grid is unchanged.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    n_old = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != num_prefix_tokens + n_old:
        raise ValueError(
            f"position embeddings hold {pos_embed.shape[1]} positions, expected "
            f"{num_prefix_tokens} + {old_grid[0]}x{old_grid[1]}"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)  # (1, gh'*gw', D)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)
