"""vitcore.data.transforms: decoding, the fused crop + flip, and their agreement with torchvision v2."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image, JpegImagePlugin
from shard_helpers import encode, make_image
from torchvision.transforms import v2

from pretrain.task import CROP_SCALE
from vitcore.data import decode_image, eval_transform, open_image, train_transform
from vitcore.model.inputs import normalize
from vitcore.data.transforms import crop_params


def test_transforms_give_uint8_chw_and_normalize_maps_to_unit_range() -> None:
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    assert train_transform(16, CROP_SCALE)(image).shape == (3, 16, 16)
    assert train_transform((16, 24), CROP_SCALE)(image).shape == (3, 16, 24)
    assert train_transform(16, randaugment=True)(image).dtype == torch.uint8
    out = eval_transform(32)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    x = normalize(torch.stack([out, torch.zeros_like(out)]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
    assert x[0, 0].allclose(torch.tensor(1.0)) and x[1].allclose(torch.tensor(-1.0))


def test_draft_decode_shrinks_jpeg_but_not_below_target() -> None:
    data = encode(Image.new("L", (224, 224), 7))
    image = decode_image(data, (64, 64))
    assert image.mode == "RGB" and image.size == (112, 112)
    assert decode_image(data, (200, 200)).size == (224, 224)
    with pytest.raises(OSError):
        decode_image(data[:300])


def _v2_reference(size: int, scale: tuple[float, float]) -> v2.Compose:
    """The unfused pipeline the fused transform replaces, for a fully decoded RGB image."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
                       v2.PILToTensor()])


def _smooth_image(size: tuple[int, int]) -> Image.Image:
    """Gradients only: DCT-domain downscaling loses little on it."""
    ramp = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", [ramp, ramp.transpose(Image.Transpose.ROTATE_90).resize(size),
                               Image.radial_gradient("L").resize(size)])


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_crop_params_are_torchvisions() -> None:
    rrc = v2.RandomResizedCrop(16, scale=CROP_SCALE)
    for width, height in [(90, 70), (20, 300), (300, 20), (1, 1)]:  # the last two fall back to the centre
        image = Image.new("RGB", (width, height))
        for seed in range(50):
            torch.manual_seed(seed)
            ours = crop_params(width, height, CROP_SCALE)
            torch.manual_seed(seed)
            theirs = rrc.make_params([image])
            assert ours == (theirs["top"], theirs["left"], theirs["height"], theirs["width"])


def test_fused_crop_matches_v2_without_draft() -> None:
    """Same seed, same box and flip: only the resampling at the box edges differs."""
    rng = random.Random(1)
    for i in range(5):
        image, _ = make_image(rng, 0)  # RGB noise of a random size, fully decoded: no draft possible
        image = image.resize((image.width * 2, image.height * 2))
        for seed in range(20):
            torch.manual_seed(seed)
            want = _v2_reference(24, CROP_SCALE)(image)
            torch.manual_seed(seed)
            got = train_transform(24, CROP_SCALE)(image)
            assert got.dtype == torch.uint8 and got.shape == (3, 24, 24)
            assert _mean_abs_diff(got, want) < 3


def test_fused_crop_drafts_a_jpeg_close_to_the_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # noqa: ANN001, ANN202
        result = draft(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = encode(_smooth_image((256, 192)))
    full = decode_image(data)
    for seed in range(30):
        torch.manual_seed(seed)
        _, _, h, w = crop_params(256, 192, CROP_SCALE)
        torch.manual_seed(seed)
        want = _v2_reference(16, CROP_SCALE)(full)
        torch.manual_seed(seed)
        got = train_transform(16, CROP_SCALE)(open_image(data))
        assert _mean_abs_diff(got, want) < 3
        # The strongest reduction that keeps the crop box at least 16 px on both sides.
        assert scales[-1] == max(r for r in (1, 2, 4, 8) if min(h, w) >= 16 * r)
    assert len(scales) == 30 and {4, 8} <= set(scales)


def test_eval_transform_matches_v2_resize_and_centre_crop() -> None:
    data = encode(_smooth_image((300, 200)))
    for size, resize in ((32, 36), ((24, 40), 45)):
        reference = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])
        want = reference(decode_image(data))
        got = eval_transform(size)(open_image(data))  # decoded at 1/4 scale
        assert got.shape == want.shape and _mean_abs_diff(got, want) < 3
        noise = Image.effect_noise((300, 200), 60).convert("RGB")  # decoded: no draft
        assert _mean_abs_diff(eval_transform(size)(noise), reference(noise)) < 1


def test_flips_half_the_time_and_seeds_reproduce() -> None:
    ramp = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).convert("RGB")  # bright left, dark right
    data = encode(ramp)
    transform = train_transform(16, CROP_SCALE)
    flipped = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = transform(open_image(data)).float()
        flipped += bool(out[:, :, 0].mean() < out[:, :, -1].mean())
        torch.manual_seed(seed)
        assert torch.equal(transform(open_image(data)), out.to(torch.uint8))
    assert 70 < flipped < 130
    torch.manual_seed(0)
    a = transform(open_image(data))
    torch.manual_seed(1)
    assert not torch.equal(a, transform(open_image(data)))


def test_any_mode_and_png_come_out_rgb() -> None:
    noise = Image.effect_noise((50, 40), 60)
    flat = Image.new("L", (50, 40), 100)
    smooth = _smooth_image((50, 40)).split()  # JPEGs here get drafted: smooth, to compare with a full decode
    images = {
        "png rgba": encode(Image.merge("RGBA", [noise, flat, noise, flat]), "PNG"),
        "png palette": encode(Image.merge("RGB", [noise, flat, noise]).quantize(16), "PNG"),
        "jpeg grey": encode(smooth[0]),
        "jpeg cmyk": encode(Image.merge("CMYK", [*smooth, flat])),
    }
    for name, data in images.items():
        decoded = decode_image(data)  # the reference: everything to RGB first, as before the fusion
        for transform in (train_transform(16, CROP_SCALE), train_transform(16, randaugment=False), eval_transform(16)):
            torch.manual_seed(0)
            got = transform(open_image(data))
            torch.manual_seed(0)
            want = transform(decoded)
            assert got.dtype == torch.uint8 and got.shape == (3, 16, 16), name
            assert _mean_abs_diff(got, want) < 3, name
        if name == "jpeg grey":
            assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])
        assert train_transform(16, randaugment=True)(open_image(data)).shape == (3, 16, 16)
    with pytest.raises(OSError):
        train_transform(16, CROP_SCALE)(open_image(images["jpeg grey"][: len(images["jpeg grey"]) // 2]))
