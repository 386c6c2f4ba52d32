"""Prediction targets for masked patch prediction, computed from the unnormalised pixels.

A target is a small strategy found by its name in `TARGETS` (a new target is one subclass): how many
outputs the head has, the targets of every patch, the training loss and metrics, the evaluation
sums and metrics, and how targets and predictions look as pixels. Three kinds (ViT paper, appendix
B.1.2): `mean_color`, the patch's mean colour quantised to 3 bits per channel (512 classes; the
paper's best); `downsampled`, the patch shrunk to 4x4 with each sub-patch quantised the same way
(16 predictions of 512 classes); `pixels`, the whole patch for L2 regression. Patches are ordered
row-major over the grid, as the ViT's Conv2d patch embedding.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vitcore.eval.metrics import classification_metrics, classification_sums, mean_metrics, mean_sums

SUB = 4  # the downsampled target's side: 4x4 sub-patches
Kinds = list[tuple[str, int]]  # (name, code) of the corruption kinds present in a batch


class Target:
    """What the MPP head predicts for each corrupted patch. `make` gives every patch's target from
    uint8 pixels; the other methods take the head's (B, K, outputs) logits at K corrupted positions
    and the (B, K, ...) targets gathered there."""

    name: ClassVar[str]
    metrics: ClassVar[dict[str, str]] = {"top1": "max", "top5": "max", "loss": "min"}  # evaluation, better direction
    best_metric: ClassVar[str] = "top1"

    def __init__(self, patch: int, bits: int) -> None:
        self.patch, self.bits = patch, bits
        self.colours = 2 ** (3 * bits)  # classes of a colour (512 for 3 bits)

    @staticmethod
    def problem(patch: int) -> str | None:
        """Why this target cannot work with `patch`-pixel patches, or None (checked with the config)."""
        return None

    @property
    def outputs(self) -> int:
        """Width of the prediction head."""
        raise NotImplementedError

    def make(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> the targets of every patch (B, N, ...)."""
        raise NotImplementedError

    def loss(self, logits: Tensor, target: Tensor, kind: Tensor, kinds: Kinds) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss, detached metrics, per corruption kind too); `kind` (B, K) is each position's code."""
        raise NotImplementedError

    def eval_sums(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        return classification_metrics(sums)

    def predictions(self, logits: Tensor) -> Tensor:
        """(B, K, outputs) -> predicted values in `make`'s layout (B, K, ...)."""
        raise NotImplementedError

    def render(self, values: Tensor) -> Tensor:
        """Targets or predictions (B, M, ...) -> (B, M, 3*p*p) pixels in [0, 1], in `patchify`'s
        layout, so they can be painted into an image."""
        raise NotImplementedError


class MeanColour(Target):
    """The patch's mean colour, quantised: one of 512 classes (3 bits)."""

    name = "mean_color"
    per_patch = 1  # colour predictions per patch

    @property
    def outputs(self) -> int:
        return self.per_patch * self.colours

    def make(self, images: Tensor) -> Tensor:
        """(B, N) int64 classes, from integer pixel sums (`sum_classes`): exact at the bin edges."""
        sums = _block_sums(images, self.patch)  # (B, 3, gh, gw)
        return sum_classes(sums.flatten(2).transpose(1, 2), self.patch * self.patch, self.bits)  # (B, N)

    def loss(self, logits: Tensor, target: Tensor, kind: Tensor, kinds: Kinds) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy over every prediction; accuracy overall, per corruption kind and of always
        answering the batch's most frequent colour."""
        scores = logits.float().reshape(*target.shape, self.colours)  # (B, K[, 16], C) fp32 for the softmax
        loss = F.cross_entropy(scores.flatten(0, -2), target.flatten())
        with torch.no_grad():
            correct = (scores.argmax(-1) == target).float()  # (B, K[, 16])
            kind = kind.reshape(*kind.shape, *[1] * (target.ndim - 2)).expand_as(target)  # (B, K[, 16])
            freq = torch.zeros(self.colours, device=target.device).index_add_(
                0, target.flatten(), torch.ones(target.numel(), device=target.device))  # (C,) no bincount: it syncs
            metrics = {"loss": loss.detach(), "acc": correct.mean(), "baseline_acc": freq.max() / target.numel()}
            metrics.update({f"acc_{name}": masked_mean(correct, kind == code) for name, code in kinds})
        return loss, metrics

    def eval_sums(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Colour top-1/top-5 hits and cross-entropy over every prediction."""
        return classification_sums(logits.reshape(-1, self.colours), target.flatten())

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.argmax(-1)  # (B, K)

    def render(self, values: Tensor) -> Tensor:
        B, M = values.shape[:2]
        rgb = class_colours(values, self.bits)  # (B, M, 3)
        return rgb[..., None].expand(B, M, 3, self.patch * self.patch).reshape(B, M, -1)  # (B, M, 3*p*p)


class Downsampled(MeanColour):
    """The patch shrunk to 4x4, each sub-patch's mean colour quantised: 16 predictions of 512 classes."""

    name = "downsampled"
    per_patch = SUB * SUB

    @staticmethod
    def problem(patch: int) -> str | None:
        return None if patch % SUB == 0 else f"downsampled targets need a patch size divisible by 4, got {patch}"

    def make(self, images: Tensor) -> Tensor:
        """(B, N, 16) int64 classes, sub-patches row-major within the patch."""
        B, _, H, W = images.shape
        gh, gw, s = H // self.patch, W // self.patch, self.patch // SUB
        sums = _block_sums(images, s)  # (B, 3, gh*4, gw*4): each patch as 4x4
        sums = sums.reshape(B, 3, gh, SUB, gw, SUB).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, 4, 4, 3)
        return sum_classes(sums.reshape(B, gh * gw, SUB * SUB, 3), s * s, self.bits)  # (B, N, 16)

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.unflatten(-1, (self.per_patch, self.colours)).argmax(-1)  # (B, K, 16)

    def render(self, values: Tensor) -> Tensor:
        B, M = values.shape[:2]
        rgb = class_colours(values, self.bits).reshape(B, M, SUB, SUB, 3).permute(0, 1, 4, 2, 3)  # (B, M, 3, 4, 4)
        s = self.patch // SUB
        big = rgb.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)  # (B, M, 3, p, p)
        return big.reshape(B, M, -1)  # (B, M, 3*p*p)


class Pixels(Target):
    """The whole patch's pixels in [0, 1], regressed with L2: its evaluation is the validation loss."""

    name = "pixels"
    metrics = {"loss": "min"}
    best_metric = "loss"

    @property
    def outputs(self) -> int:
        return 3 * self.patch * self.patch

    def make(self, images: Tensor) -> Tensor:
        return patchify(images.float() / 255, self.patch)  # (B, N, 3*p*p) in [0, 1]

    def loss(self, logits: Tensor, target: Tensor, kind: Tensor, kinds: Kinds) -> tuple[Tensor, dict[str, Tensor]]:
        err = (logits.float() - target).pow(2).mean(-1)  # (B, K)
        loss = err.mean()
        metrics = {"loss": loss.detach()}
        metrics.update({f"mse_{name}": masked_mean(err.detach(), kind == code) for name, code in kinds})
        return loss, metrics

    def eval_sums(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        return mean_sums(loss=(logits.float() - target).pow(2).mean(-1))  # squared errors (B, K)

    def eval_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        return mean_metrics(sums)

    def predictions(self, logits: Tensor) -> Tensor:
        return logits

    def render(self, values: Tensor) -> Tensor:
        return values.float().clamp(0, 1)  # (B, M, 3*p*p)


TARGETS: dict[str, type[Target]] = {t.name: t for t in (MeanColour, Downsampled, Pixels)}


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` holds, as a 0-d tensor, without a host sync."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


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
