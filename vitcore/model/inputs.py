"""What the encoder expects of its pixels, kept with the model (timm keeps the same facts in a
model's `pretrained_cfg`): the statistics its stem normalises with and the evaluation crop.

Pixels stay uint8 until they reach the device (worker-to-trainer traffic 4x smaller than float32,
and MPP's targets come from the real values); the ViT's stem (`ViT.embed_patches`) calls
`normalize`, so no caller can forget it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# The ViT paper and big_vision feed pixels in [-1, 1]; not the ImageNet statistics.
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, then centre-crop `size` (the usual 224 <- 256)


def normalize(pixels: Tensor) -> Tensor:
    """(B, 3, H, W) or (3, H, W) pixels on the 0-255 scale (uint8, or float after MixUp) -> float32
    model inputs, on their own device."""
    mean, std = _stats(pixels.device)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


@functools.lru_cache(maxsize=None)
def _stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """(3, 1, 1) mean and std, made once per device: a new tensor every step would be a
    host-to-device copy (and a sync) on every step."""
    return torch.tensor(MEAN, device=device).view(-1, 1, 1), torch.tensor(STD, device=device).view(-1, 1, 1)
