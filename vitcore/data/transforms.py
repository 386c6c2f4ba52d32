"""Image decoding and augmentation: JPEG bytes -> PIL -> uint8 (3, H, W) tensors.

Pixels stay uint8 and unnormalised until they reach the device: that keeps worker-to-trainer
traffic 4x smaller than float32, and the MPP targets are computed from the real pixel values.
`normalize` then maps a uint8 batch to the model's input range on whatever device it sits.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

# The ViT paper and big_vision feed pixels in [-1, 1]; not the ImageNet statistics.
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, then centre-crop `size` (the usual 224 <- 256)

Size = int | tuple[int, int]
# What a broken image file can raise while PIL parses or decodes it.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageTransform:
    """A PIL -> uint8 (3, H, W) pipeline plus the smallest decode size that loses nothing.

    `draft_size` (w, h) tells the decoder how far it may shrink a JPEG in the DCT domain
    before the pipeline runs (see `decode_image`).
    """

    pipeline: Callable[[Image.Image], Tensor]
    draft_size: tuple[int, int]

    def __call__(self, image: Image.Image) -> Tensor:
        return self.pipeline(image)


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _wh(hw: tuple[int, int]) -> tuple[int, int]:
    return hw[1], hw[0]


def pretrain_transform(size: Size) -> ImageTransform:
    """MPP pretraining augmentation: random resized crop (35-100% of the area) and flip."""
    hw = _hw(size)
    pipeline = v2.Compose([
        v2.RandomResizedCrop(hw, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])
    # At scale 1 the crop is the whole image, so the decoded image must be at least `size`.
    return ImageTransform(pipeline, _wh(hw))


def finetune_train_transform(size: Size, randaugment: bool) -> ImageTransform:
    """Supervised fine-tuning augmentation: random resized crop, flip, optional RandAugment."""
    hw = _hw(size)
    steps: list[Callable] = [v2.RandomResizedCrop(hw, antialias=True), v2.RandomHorizontalFlip()]
    if randaugment:
        steps.append(v2.RandAugment())
    steps.append(v2.PILToTensor())
    return ImageTransform(v2.Compose(steps), _wh(hw))


def eval_transform(size: Size) -> ImageTransform:
    """Evaluation preprocessing: resize the shorter side to size / 0.875, centre-crop `size`."""
    hw = _hw(size)
    resized = int(max(hw) / EVAL_CROP_FRACTION)
    pipeline = v2.Compose([
        v2.Resize(resized, antialias=True),
        v2.CenterCrop(hw),
        v2.PILToTensor(),
    ])
    return ImageTransform(pipeline, (resized, resized))


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image, letting a JPEG shrink to `draft_size` (w, h) on the way.

    `Image.draft` makes libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain, choosing the
    strongest reduction that keeps both sides >= `draft_size`; far cheaper than decoding the full
    image and resizing. Non-JPEG formats ignore it. Raises OSError on corrupt or truncated data.
    """
    image = Image.open(io.BytesIO(data))
    if draft_size is not None:
        image.draft("RGB", draft_size)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def normalize(images: Tensor) -> Tensor:
    """Map uint8 images (B, 3, H, W) or (3, H, W) to float32 model inputs, on their own device."""
    mean = torch.tensor(MEAN, device=images.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=images.device).view(-1, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std
