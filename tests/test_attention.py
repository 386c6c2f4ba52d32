import sys

import pytest
import torch

from vitcore.eval.attention import cls_attention_map, confusion_image, last_layer_cls_heads, overlay, rollout
from vitcore.model.vit import ViT, ViTConfig


def random_attentions(blocks: int, batch: int, heads: int, tokens: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, tokens, tokens, generator=g).softmax(-1) for _ in range(blocks)]


def test_rollout_of_identity_attentions_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    out = rollout([eye, eye, eye])
    assert out.shape == (2, 5, 5)
    torch.testing.assert_close(out, torch.eye(5).expand(2, 5, 5))


def test_rollout_rows_sum_to_one():
    for blocks, heads, residual in [(1, 1, 0.5), (4, 3, 0.5), (6, 2, 0.0), (3, 4, 0.9)]:
        attns = [a.to(torch.bfloat16) for a in random_attentions(blocks, 2, heads, 7)]
        out = rollout(attns, residual=residual)
        assert out.dtype == torch.float32 and out.shape == (2, 7, 7)
        assert (out >= 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 7))


def test_rollout_matches_hand_computed_two_layers():
    # Layer 1: two heads that average to all 0.5s -> A1' = 0.5 I + 0.5 A1 = [[.75, .25], [.25, .75]].
    a1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])[None]  # (1, 2, 2, 2)
    # Layer 2: both heads attend to token 0 -> A2' = [[1, 0], [.5, .5]].
    a2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(1, 2, 2, 2)
    # R = A2' @ A1' (first layer innermost); the other order would give [[.875, .125], [.625, .375]].
    expected = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    torch.testing.assert_close(rollout([a1, a2]), expected)


def test_cls_maps_on_a_real_vit():
    torch.manual_seed(0)
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=32)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32), return_attention=True)
    assert len(out.attentions) == 2
    maps = cls_attention_map(out.attentions, model.grid)
    assert maps.shape == (3, 4, 4)
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(3))
    heads = last_layer_cls_heads(out.attentions, model.grid)
    assert heads.shape == (3, 2, 4, 4)
    assert heads.min() >= 0 and heads.max() <= 1
    torch.testing.assert_close(heads.flatten(2).amax(2), torch.ones(3, 2))


def test_overlay_shape_and_range():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    maps = torch.rand(3, 4, 4)
    grid = overlay(images, maps, alpha=0.4)
    # make_grid pads 2 px around every tile: 3 tiles across, 2 rows down.
    assert grid.shape == (3, 2 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    assert grid.dtype == torch.float32
    assert grid.min() >= 0 and grid.max() <= 1
    torch.testing.assert_close(grid[:, 2:34, 2:34], images[0].float() / 255)  # top row: the images


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError


def test_confusion_image_without_matplotlib_is_the_bare_heat_map(no_matplotlib):
    c, cell = 5, 16
    image = confusion_image(torch.diag(torch.tensor([3, 10, 1, 7, 2])), list("abcde"), cell=cell)
    assert image.shape == (3, c * cell, c * cell)
    assert image.min() >= 0 and image.max() <= 1
    centre = cell // 2
    brightness = image.mean(0)[centre::cell, centre::cell]  # (C, C) at cell centres
    assert (brightness.diagonal() > 0.8).all()
    off = brightness[~torch.eye(c, dtype=torch.bool)]
    assert (off < 0.05).all()


def test_confusion_image_without_matplotlib_is_row_normalised(no_matplotlib):
    image = confusion_image(torch.tensor([[50, 50], [0, 0]]), ["a", "b"], cell=8)
    centres = image[:, 4::8, 4::8]  # (3, 2, 2)
    torch.testing.assert_close(centres[:, 0, 0], centres[:, 0, 1])  # a 50/50 row: equal halves
    assert centres.mean(0)[1].max() < 0.05  # an empty row is dark


def test_confusion_figure_names_the_classes_writes_the_counts_and_has_a_colour_scale():
    pytest.importorskip("matplotlib")
    from vitcore.eval.attention import _confusion_figure

    counts = torch.tensor([[5., 1., 0.], [2., 7., 1.], [0., 0., 0.]])
    rates = counts / counts.sum(1, keepdim=True).clamp_min(1)
    names = ["cat", "dog", "eel"]
    fig = _confusion_figure(counts, rates, names)
    ax, bar = fig.axes  # the matrix and its colour bar
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    # the count of cell (true i, predicted j) is written at x=j, y=i
    assert {(int(t.get_position()[1]), int(t.get_position()[0])): t.get_text() for t in ax.texts} == \
        {(i, j): str(int(counts[i, j])) for i in range(3) for j in range(3)}
    assert bar.get_ylim() == (0.0, 1.0) and bar.get_ylabel() == "share of the true class"
    torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()).float(), rates)


def test_confusion_image_with_matplotlib_is_a_picture_for_tensorboard():
    pytest.importorskip("matplotlib")
    image = confusion_image(torch.diag(torch.tensor([3, 10, 1, 7, 2])), ["a", "b", "c", "d", "e"])
    assert image.ndim == 3 and image.shape[0] == 3 and min(image.shape[1:]) > 5 * 16  # larger than the bare map
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert confusion_image(torch.eye(2), None).shape[0] == 3  # None: the class indices
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        confusion_image(torch.eye(3), ["a", "b"])

