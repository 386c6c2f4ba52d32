"""Prediction targets for masked patch prediction, computed from the unnormalised pixels.

Three kinds (ViT paper, appendix B.1.2): `mean_color`, the patch's mean colour quantised to 3 bits
per channel (512 classes; the paper's best); `downsampled`, the patch shrunk to 4x4 with each
sub-patch quantised the same way (16 predictions of 512 classes); `pixels`, the whole patch for
L2 regression. Patches are ordered row-major over the grid, as the ViT's Conv2d patch embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TARGETS = ("mean_color", "downsampled", "pixels")
SUB = 4  # the downsampled target's side: 4x4 sub-patches


def num_outputs(target: str, patch: int, bits: int) -> int:
    """Width of the prediction head for a target kind."""
    classes = 2 ** (3 * bits)
    return {"mean_color": classes, "downsampled": SUB * SUB * classes, "pixels": 3 * patch * patch}[target]


def colour_classes(rgb: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., 3) colours in [0, 1] -> (...) int64 classes r*L*L + g*L + b, L = 2**bits levels.

    A channel's level is min(floor(v * L), L - 1): L equal bins, with v = 1 in the top one.
    """
    levels = 2**bits
    return _classes((rgb * levels).floor().long().clamp_(0, levels - 1), levels)  # (...)


def sum_classes(sums: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """(..., 3) int64 channel sums of `count` uint8 pixels -> (...) int64 classes, as
    `colour_classes` of their mean / 255, but exact: the level floor(L * sum / (255 * count)) is
    computed in integers, so a mean exactly on a bin edge (k/L) is always in the upper bin."""
    levels = 2**bits
    return _classes((sums * levels // (255 * count)).clamp_(0, levels - 1), levels)  # (...)


def _classes(q: torch.Tensor, levels: int) -> torch.Tensor:
    """(..., 3) int64 per-channel levels -> (...) int64 classes r*L*L + g*L + b."""
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def _block_sums(images: torch.Tensor, block: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> int64 (B, 3, H // block, W // block): each block's pixel sum per channel."""
    B, C, H, W = images.shape
    h, w = H // block, W // block
    blocks = images[:, :, : h * block, : w * block].reshape(B, C, h, block, w, block)
    return blocks.sum(dim=(3, 5), dtype=torch.int64)  # (B, 3, h, w)


def class_colours(classes: torch.Tensor, bits: int) -> torch.Tensor:
    """(...) int64 classes -> (..., 3) float RGB in [0, 1] at the centre of each channel's bin."""
    levels = 2**bits
    q = torch.stack([classes // (levels * levels), classes // levels % levels, classes % levels], dim=-1)  # (..., 3)
    return (q.float() + 0.5) / levels  # (..., 3)


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3*p*p): each patch flattened channel-major (c, row, col), like the conv weight."""
    return F.unfold(pixels, kernel_size=patch, stride=patch).transpose(1, 2)  # (B, N, 3*p*p)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, 3*p*p) -> (B, 3, H, W), the inverse of `patchify`."""
    size = (grid[0] * patch, grid[1] * patch)
    return F.fold(patches.transpose(1, 2), output_size=size, kernel_size=patch, stride=patch)  # (B, 3, H, W)


def make_targets(images: torch.Tensor, target: str, patch: int, bits: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) images -> targets: `mean_color` (B, N) int64, `downsampled` (B, N, 16)
    int64 (sub-patches row-major within the patch), `pixels` (B, N, 3*p*p) float in [0, 1].
    Colour classes come from integer pixel sums (`sum_classes`), exact at the bin edges."""
    B, _, H, W = images.shape
    gh, gw = H // patch, W // patch
    if target == "mean_color":
        sums = _block_sums(images, patch)  # (B, 3, gh, gw)
        return sum_classes(sums.flatten(2).transpose(1, 2), patch * patch, bits)  # (B, N)
    if target == "downsampled":
        s = patch // SUB
        sums = _block_sums(images, s)  # (B, 3, gh*4, gw*4): each patch as 4x4
        sums = sums.reshape(B, 3, gh, SUB, gw, SUB).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, 4, 4, 3)
        return sum_classes(sums.reshape(B, gh * gw, SUB * SUB, 3), s * s, bits)  # (B, N, 16)
    if target == "pixels":
        return patchify(images.float() / 255, patch)  # (B, N, 3*p*p) in [0, 1]
    raise ValueError(f"unknown MPP target {target!r}; expected one of {', '.join(TARGETS)}")


def render(values: torch.Tensor, target: str, patch: int, bits: int) -> torch.Tensor:
    """Targets or predictions of any kind (shapes as `make_targets`, M patches) -> (B, M, 3*p*p)
    pixels in [0, 1], in `patchify`'s layout, so they can be painted into an image."""
    B, M = values.shape[:2]
    if target == "mean_color":
        rgb = class_colours(values, bits)  # (B, M, 3)
        return rgb[..., None].expand(B, M, 3, patch * patch).reshape(B, M, -1)  # (B, M, 3*p*p)
    if target == "downsampled":
        rgb = class_colours(values, bits).reshape(B, M, SUB, SUB, 3).permute(0, 1, 4, 2, 3)  # (B, M, 3, 4, 4)
        s = patch // SUB
        big = rgb.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)  # (B, M, 3, p, p)
        return big.reshape(B, M, -1)  # (B, M, 3*p*p)
    return values.float().clamp(0, 1)  # (B, M, 3*p*p)
