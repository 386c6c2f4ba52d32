import math

import pytest
import torch

from vitcore.model.pos_embed import grid_size, resample_pos_embed
from vitcore.model.vit import ViT, ViTConfig


def smooth_field(gh: int, gw: int, dim: int = 4) -> torch.Tensor:
    """(1, 1 + gh*gw, dim) embeddings whose grid part is a smooth function of position."""
    ys = (torch.arange(gh) + 0.5) / gh
    xs = (torch.arange(gw) + 0.5) / gw
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    chans = [torch.sin(math.pi * x), torch.cos(math.pi * y), x * y, torch.sin(math.pi * (x + y) / 2)][:dim]
    grid = torch.stack(chans, -1).reshape(1, gh * gw, dim)
    return torch.cat([torch.full((1, 1, dim), 7.0), grid], 1)


def test_identity_on_the_same_grid():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos, (4, 4), (4, 4)) is pos


def test_up_then_down_reproduces_a_smooth_field():
    pos = smooth_field(8, 8)
    up = resample_pos_embed(pos, (8, 8), (16, 16))
    back = resample_pos_embed(up, (16, 16), (8, 8))
    assert up.shape == (1, 1 + 256, 4)
    torch.testing.assert_close(back, pos, atol=0.03, rtol=0)
    # the upsampled field is the same function on the finer grid (away from the border)
    fine = smooth_field(16, 16)[:, 1:].reshape(16, 16, 4)[2:-2, 2:-2]
    torch.testing.assert_close(up[:, 1:].reshape(16, 16, 4)[2:-2, 2:-2], fine, atol=0.02, rtol=0)


def test_cls_position_is_kept_and_non_square_grid_works():
    pos = smooth_field(6, 4)
    out = resample_pos_embed(pos, (6, 4), (9, 6))
    assert out.shape == (1, 1 + 54, 4)
    assert torch.equal(out[:, 0], pos[:, 0])
    torch.testing.assert_close(out[:, 1:].reshape(9, 6, 4)[3:-3, 2:-2],
                               smooth_field(9, 6)[:, 1:].reshape(9, 6, 4)[3:-3, 2:-2], atol=0.03, rtol=0)


def test_bf16_input_is_resampled_in_float32():
    pos = smooth_field(8, 8)
    out = resample_pos_embed(pos.bfloat16(), (8, 8), (12, 12))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), resample_pos_embed(pos, (8, 8), (12, 12)), atol=0.02, rtol=0)


def test_wrong_length_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 1 \\+ 4x4"):
        resample_pos_embed(torch.randn(1, 10, 4), (4, 4), (8, 8))
    assert grid_size((32, 48), 16) == (2, 3)


def test_model_at_a_new_resolution_uses_the_resampled_embeddings():
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=32)).eval()
    x = torch.randn(1, 3, 48, 64)
    tokens, grid = model.embed_patches(x)
    manual = model.forward_tokens(tokens, grid)
    expected_pos = resample_pos_embed(model.pos_embed, (4, 4), (6, 8))
    assert grid == (6, 8)
    # swapping in the resampled table at the new size gives the same outputs
    big = ViT(ViTConfig.from_variant("Pico/8", image_size=(48, 64))).eval()
    big.load_state_dict({**model.state_dict(), "pos_embed": expected_pos})
    torch.testing.assert_close(big(x).patches, manual.patches)
