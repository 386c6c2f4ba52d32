"""Image decoding and augmentation: JPEG bytes -> PIL -> uint8 (3, H, W) tensors.

Pixels stay uint8 and unnormalised: the model's stem normalises them on the device
(`vitcore.model.inputs`), which keeps worker-to-trainer traffic 4x smaller than float32.

The transforms are fused for speed at small resolutions, where per-image fixed costs dominate.
Each takes an image straight from `open_image` (header read, pixels not decoded yet), chooses
its crop box from the header size, lets libjpeg decode at the strongest 1/2, 1/4 or 1/8 DCT
reduction that keeps the box at least the output size, and crops and resizes in one
`Image.resize(box=...)` pass (the evaluation transform resizes the whole image, then crops, to
match torchvision's pixels). A decoded image, or a PNG, simply skips the reduction. Crop and
flip are drawn from torch's RNG with the same calls as torchvision's v2.RandomResizedCrop and
RandomHorizontalFlip, so a seed gives the crop torchvision would have taken.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from vitcore.model.inputs import EVAL_CROP_FRACTION

DEFAULT_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults: the crops' area fraction
DEFAULT_RATIO = (3 / 4, 4 / 3)

Size = int | tuple[int, int]
_JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker, then the first segment's marker
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels
# What a broken image file can raise while PIL parses or decodes it.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@functools.lru_cache(maxsize=None)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """As torchvision computes it (in float32), so that the aspect draws match it bit for bit."""
    lo, hi = torch.log(torch.tensor(ratio)).tolist()
    return lo, hi


def crop_params(width: int, height: int, scale: tuple[float, float] = DEFAULT_SCALE,
                ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop of a width x height image: torchvision's
    algorithm with the same torch RNG calls, so a seed gives v2.RandomResizedCrop's box."""
    area = width * height
    log_ratio = _log_ratio(ratio)
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).exp_().item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    # Fallback: the central crop of the image clamped to the ratio range.
    in_ratio, w, h = width / height, width, height
    if in_ratio < min(ratio):
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        w = int(round(h * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: Box, size: tuple[int, int]) -> Image.Image:
    """Crop `box` (full-image pixels) of an opened image and resize it to `size` (h, w): RGB out.

    A not-yet-decoded JPEG decodes at the strongest DCT reduction (1/2, 1/4, 1/8) that keeps the
    box at least `size`; the box is then mapped into the reduced image. One bilinear, antialiased
    `resize(box=...)` does the crop and the resize. Raises OSError on corrupt or truncated data.
    """
    out_h, out_w = size
    room = min((box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h)
    reduction = next((r for r in (8, 4, 2) if r <= room), 1)
    if reduction > 1:
        width, height = image.size
        # Asking for (W // r, H // r) makes PIL pick exactly r (header-only: no-op once decoded).
        drafted = image.draft("RGB", (width // reduction, height // reduction))
        if drafted is not None:
            factor = round(width / drafted[1][2])
            box = (box[0] / factor, box[1] / factor, box[2] / factor, box[3] / factor)
    if image.mode not in ("RGB", "L"):  # palette, alpha, CMYK...: to RGB before filtering, as a decode would
        image = image.convert("RGB")
    out = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    return out if out.mode == "RGB" else out.convert("RGB")


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 (3, H, W), a channels-last view (like torchvision's PILToTensor);
    collation makes the batch contiguous in one copy."""
    w, h = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """Opened image -> random resized crop -> horizontal flip (p=0.5) -> optional RandAugment ->
    uint8 (3, H, W). Same draws as v2.Compose([RandomResizedCrop, RandomHorizontalFlip, ...])."""

    size: tuple[int, int]  # (h, w)
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO
    randaugment: v2.RandAugment | None = None

    def __call__(self, image: Image.Image) -> Tensor:
        width, height = image.size  # from the header
        top, left, h, w = crop_params(width, height, self.scale, self.ratio)
        flip = torch.rand(1).item() < 0.5
        out = resized_crop(image, (left, top, left + w, top + h), self.size)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            out = self.randaugment(out)
        return to_tensor(out)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Opened image -> resize the shorter side to `resize` -> centre crop `size` -> uint8 (3, H, W).

    The whole image is resized (after the DCT reduction a large JPEG allows), then cropped: the
    pixels of torchvision's Resize + CenterCrop, and so of timm's eval transform, exactly, whenever
    no reduction applies. (One `resize(box=...)` pass over the crop alone rounds differently: PIL's
    filter weights land on exact halves at rational scales, and a float ulp decides those pixels.)
    """

    size: tuple[int, int]  # (h, w)
    resize: int  # shorter side before the crop; at least max(size)

    def __post_init__(self) -> None:
        if self.resize < max(self.size):
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.size}")

    def __call__(self, image: Image.Image) -> Tensor:
        width, height = image.size
        out_h, out_w = self.size
        if width <= height:  # as torchvision computes the longer side
            rw, rh = self.resize, int(self.resize * height / width)
        else:
            rw, rh = int(self.resize * width / height), self.resize
        top, left = int(round((rh - out_h) / 2.0)), int(round((rw - out_w) / 2.0))
        resized = resized_crop(image, (0, 0, width, height), (rh, rw))  # (rh, rw) RGB
        return to_tensor(resized.crop((left, top, left + out_w, top + out_h)))


def train_transform(size: Size, scale: tuple[float, float] = DEFAULT_SCALE,
                    randaugment: bool = False) -> RandomResizedCropFlip:
    """Training augmentation: random resized crop (`scale`: its share of the image's area), flip,
    optional RandAugment (torchvision's defaults)."""
    return RandomResizedCropFlip(_hw(size), scale=scale, randaugment=v2.RandAugment() if randaugment else None)


def eval_transform(size: Size) -> ResizeCenterCrop:
    """Evaluation preprocessing: resize the shorter side to size / 0.875, centre-crop `size`."""
    hw = _hw(size)
    return ResizeCenterCrop(hw, int(max(hw) / EVAL_CROP_FRACTION))


def open_image(data: bytes) -> Image.Image:
    """Open image bytes: the header is parsed (size, mode), the pixels are decoded on first use.
    Raises OSError (PIL.UnidentifiedImageError) when the bytes are no image at all."""
    # Naming the format of JPEG bytes spares PIL probing its other plugins: ~50 us an image.
    formats = ("JPEG",) if data[:3] == _JPEG_MAGIC else None
    return Image.open(io.BytesIO(data), formats=formats)


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image, letting a JPEG shrink to `draft_size` (w, h) on the way.

    `Image.draft` makes libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain, choosing the
    strongest reduction that keeps both sides >= `draft_size`; far cheaper than decoding the full
    image and resizing. Non-JPEG formats ignore it. Raises OSError on corrupt or truncated data.
    """
    image = open_image(data)
    if draft_size is not None:
        image.draft("RGB", draft_size)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image

