"""Masked patch prediction: corruption counts and kinds, targets, loss, metrics, and real learning."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pretrain.config import PretrainConfig
from pretrain.corruption import KEPT, MASK, RANDOM, corrupt, corruption_counts, round_half_up
from pretrain.targets import TARGETS, MeanColour, class_colours, colour_classes
from pretrain.task import MPPTask
from vitcore.config import load_config

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-10k.tar"


def task_for(target: str = "mean_color", variant: str = "Pico/8", image_size: int = 32, **mpp) -> MPPTask:
    cfg = PretrainConfig()
    cfg.model.variant, cfg.model.image_size = variant, image_size
    cfg.mpp.target = target
    for k, v in mpp.items():
        setattr(cfg.mpp, k, v)
    return MPPTask(cfg)


def batch_of(images: torch.Tensor) -> dict:
    return {"image": images, "label": None, "key": [str(i) for i in range(len(images))]}


def random_images(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


# ---- corruption -------------------------------------------------------------------------------

def test_rounding_is_half_up_not_bankers():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999)] == [1, 2, 3, 2]
    assert round_half_up(0.7 * 5) == 4  # 3.4999999999999996 in floating point: still a tie
    assert corruption_counts(64, 0.5, 0.8, 0.1) == (32, 26, 3)  # 25.6 -> 26, 3.2 -> 3, 3 kept
    assert corruption_counts(10, 0.5, 0.8, 0.1) == (5, 4, 1)  # 0.5 -> 1 random, 0 kept
    assert corruption_counts(2, 1.0, 0.75, 0.25) == (2, 2, 0)  # 1.5 -> 2 masks leave no room
    assert corruption_counts(3, 0.01, 0.8, 0.1)[0] == 1  # never an empty loss


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4), n=st.integers(1, 80), ratio=st.floats(0.01, 1.0),
    mask_prob=st.floats(0.0, 1.0), random_share=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
)
def test_corruption_counts_and_kinds_are_exact(b, n, ratio, mask_prob, random_share, seed):
    random_prob = (1.0 - mask_prob) * random_share
    k, k_mask, k_rand = corruption_counts(n, ratio, mask_prob, random_prob)
    assume(not (k_rand > 0 and b * n < 2))
    d = 4
    x = torch.randn(b, n, d)  # distinct embeddings, so a copy is recognisable
    token = torch.randn(1, 1, d)
    out, rec = corrupt(x, token, ratio, mask_prob, random_prob, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and rec.positions.shape == rec.kind.shape == rec.source.shape == (b, k)
    assert rec.positions.dtype == rec.kind.dtype == rec.source.dtype == torch.int64
    for i in range(b):
        pos, kind, src = rec.positions[i], rec.kind[i], rec.source[i]
        assert len(set(pos.tolist())) == k and 0 <= pos.min() and pos.max() < n
        assert [(kind == c).sum().item() for c in (MASK, RANDOM, KEPT)] == [k_mask, k_rand, k - k_mask - k_rand]
        own = i * n + pos
        is_rand = kind == RANDOM
        assert (src[~is_rand] == -1).all()
        assert (src[is_rand] != own[is_rand]).all() and (src[is_rand] < b * n).all()
        assert torch.equal(out[i, pos[is_rand]], x.reshape(b * n, d)[src[is_rand]])
        assert torch.equal(out[i, pos[kind == MASK]], token[0].expand(k_mask, d))
        assert torch.equal(out[i, pos[kind == KEPT]], x[i, pos[kind == KEPT]])
        unselected = torch.ones(n, dtype=torch.bool)
        unselected[pos] = False
        assert torch.equal(out[i, unselected], x[i, unselected])


def test_random_sources_span_the_batch_and_positions_are_uniform():
    x = torch.randn(4, 16, 2)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(16)
    other_image = 0
    image_of_slot = torch.arange(4)[:, None].expand(4, 8)  # (B, K)
    for _ in range(400):
        _, rec = corrupt(x, torch.zeros(1, 1, 2), 0.5, 0.5, 0.5, g)
        hits += torch.bincount(rec.positions.flatten(), minlength=16)
        rand = rec.kind == RANDOM
        other_image += (rec.source[rand] // 16 != image_of_slot[rand]).sum()
    assert other_image > 0  # replacements come from other images too, not only one's own
    assert (hits / hits.mean() - 1).abs().max() < 0.1  # each position chosen about equally often


# ---- targets ----------------------------------------------------------------------------------

def test_mean_color_targets_on_a_non_square_grid():
    levels = torch.randint(0, 8, (2, 3, 2, 3), generator=torch.Generator().manual_seed(1))  # (B, rgb, gh, gw)
    images = (levels * 32 + 16).to(torch.uint8).repeat_interleave(8, 2).repeat_interleave(8, 3)  # (2, 3, 16, 24)
    expected = (levels[:, 0] * 64 + levels[:, 1] * 8 + levels[:, 2]).flatten(1)  # (B, 6) row-major
    assert torch.equal(TARGETS["mean_color"](8, 3).make(images), expected)
    extremes = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), 255)]).to(torch.uint8)
    assert TARGETS["mean_color"](8, 3).make(extremes).flatten().tolist() == [0, 511]
    assert TARGETS["mean_color"](8, 1).make(extremes).flatten().tolist() == [0, 7]


def test_downsampled_targets_are_4x4_sub_patches_row_major():
    levels = torch.randint(0, 8, (1, 3, 8, 12), generator=torch.Generator().manual_seed(2))  # 2x3 patches of 4x4
    images = (levels * 32 + 16).to(torch.uint8).repeat_interleave(2, 2).repeat_interleave(2, 3)  # (1, 3, 16, 24)
    t = TARGETS["downsampled"](8, 3).make(images)
    assert t.shape == (1, 6, 16)
    classes = levels[:, 0] * 64 + levels[:, 1] * 8 + levels[:, 2]  # (1, 8, 12)
    for n in range(6):
        r, c = divmod(n, 3)
        assert torch.equal(t[0, n], classes[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].flatten())


def test_pixel_targets_match_the_patch_embedding_layout():
    images = random_images(2, 16, 24)
    t = TARGETS["pixels"](8, 3).make(images)
    assert t.shape == (2, 6, 192) and 0 <= t.min() and t.max() <= 1
    assert torch.equal(t[1, 4], images[1, :, 8:16, 8:16].flatten().float() / 255)  # row 1, col 1
    model = task_for().build_model()[0]
    proj = model.encoder.patch_embed.proj
    emb, _ = model.encoder.embed_patches(images)  # (2, 6, D), from pixels the stem maps to [-1, 1]
    assert torch.allclose(emb, (t - 0.5) / 0.5 @ proj.weight.flatten(1).T + proj.bias, atol=1e-5)


def test_class_colours_invert_the_quantisation_at_bin_centres():
    for bits in (1, 3, 5):
        classes = torch.arange(2 ** (3 * bits))
        rgb = class_colours(classes, bits)
        assert torch.equal(colour_classes(rgb, bits), classes)
    assert class_colours(torch.tensor([0, 511]), 3).tolist() == [[1 / 16] * 3, [15 / 16] * 3]



def _pixels_summing_to(total: int, n: int, rng: random.Random) -> list[int]:
    """n uint8 values, spread out at random, whose sum is exactly `total`."""
    values = [total // n + (i < total % n) for i in range(n)]
    for _ in range(4 * n):  # move mass between random pairs: the sum and the range are kept
        i, j = rng.sample(range(n), 2)
        d = min(rng.randrange(256), 255 - values[i], values[j])
        values[i], values[j] = values[i] + d, values[j] - d
    rng.shuffle(values)
    return values


@pytest.mark.parametrize("target,patch,cell", [("mean_color", 8, 8), ("downsampled", 16, 4)])
def test_colour_levels_are_exact_at_every_bin_edge(target, patch, cell):
    """A channel whose mean is exactly k/8 of 255 is in bin k (bin 7 for k = 8), one unit of sum
    less in bin k-1, however its pixels are spread; float32 pooling of x/255 got ~1 in 4 wrong."""
    rng, n = random.Random(0), cell * cell
    cells = (patch // cell) ** 2  # 1 for mean_color, 16 sub-patches for downsampled
    for k in range(9):
        edge = 255 * k * n // 8
        assert edge * 8 == 255 * k * n  # exactly on the edge
        for total, level in [(edge, min(k, 7)), (edge - 1, k - 1)][: 1 + (k > 0)]:
            for _ in range(3):
                blocks = torch.tensor([[_pixels_summing_to(total, n, rng) for _ in range(cells)] for _ in range(3)])
                side = patch // cell  # (3, cells, n) -> (1, 3, patch, patch), cell by cell row-major
                image = blocks.reshape(3, side, side, cell, cell).permute(0, 1, 3, 2, 4).reshape(1, 3, patch, patch)
                t = TARGETS[target](patch, 3).make(image.to(torch.uint8))
                assert (t == level * 73).all(), (k, total, t.flatten().tolist())  # 73 = 64 + 8 + 1

# ---- model, loss, metrics ---------------------------------------------------------------------

@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_loss_sees_only_corrupted_positions(target):
    task = task_for(target)
    model = task.build_model()[0]
    grabbed = {}

    def keep(module, args, out):
        out.retain_grad()
        grabbed["x"] = out  # (B, 1+N, D) encoder outputs

    model.encoder.norm.register_forward_hook(keep)
    torch.manual_seed(0)
    images = random_images(3)
    loss, _ = task.loss(model, batch_of(images))
    loss.backward()
    grad = grabbed["x"].grad[:, 1:].abs().sum(-1)  # (B, N)
    touched = torch.zeros_like(grad, dtype=torch.bool)
    torch.manual_seed(0)
    logits, rec = model(images)
    touched.scatter_(1, rec.positions, True)
    assert (grad[~touched] == 0).all() and (grad[touched] > 0).all()
    target_k = task.targets(images, rec.positions)
    if target == "pixels":
        expected = F.mse_loss(logits, target_k)
    else:
        expected = F.cross_entropy(logits.reshape(*target_k.shape, -1).flatten(0, -2), target_k.flatten())
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_every_parameter_receives_a_gradient(head):
    task = task_for(head=head)
    task.cfg.model.dropout, task.cfg.model.drop_path = 0.1, 0.1
    model = task.build_model()[0].train()
    loss, _ = task.loss(model, batch_of(random_images(4)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.mask_token.grad.abs().sum() > 0
    assert task.encoder(model) is model.encoder


@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_metrics_are_detached_scalars(target):
    task = task_for(target, keep_prob=0.0, mask_prob=0.9, random_prob=0.1)
    model = task.build_model()[0]
    loss, metrics = task.loss(model, batch_of(random_images(4)))
    assert loss.ndim == 0 and loss.requires_grad
    expected = {"loss", "mse_mask", "mse_random"} if target == "pixels" else \
        {"loss", "acc", "baseline_acc", "acc_mask", "acc_random"}  # no kept patches: no acc_kept
    assert set(metrics) == expected
    for name, value in metrics.items():
        assert value.ndim == 0 and not value.requires_grad and torch.isfinite(value), name


@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_loss_needs_no_host_sync(target):
    """On the meta device tensors have no values: any .item(), bincount or branch on a value fails."""
    task = task_for(target)
    with torch.device("meta"):
        model = task.build_model()[0]
        images = torch.empty(4, 3, 32, 32, dtype=torch.uint8)
    loss, metrics = task.loss(model, batch_of(images))
    loss.backward()
    assert loss.is_meta and all(v.is_meta for v in metrics.values())


def test_loss_runs_under_bf16_autocast():
    task = task_for()
    model = task.build_model()[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = task.loss(model, batch_of(random_images(2)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_visualize_is_an_image_grid(target):
    task = task_for(target, corrupt_ratio=1.0, mask_prob=1.0, random_prob=0.0, keep_prob=0.0)
    model = task.build_model()[0].train()
    state = torch.get_rng_state()
    grid = task.visualize(model, batch_of(random_images(6)))["mpp/predictions"]
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG is left alone
    assert grid.shape == (3, 4 * 34 + 2, 4 * 34 + 2)  # 4 rows x 4 images of 32 px, 2 px padding
    assert 0 <= grid.min() and grid.max() <= 1 and model.training
    assert torch.allclose(grid[:, 36:68, 2:34], torch.tensor(0.5))  # every patch masked: grey



def test_a_new_target_is_one_class(monkeypatch):
    """A target written here, registered by name, trains, evaluates and draws through the unchanged
    config, task and model: the patch's mean colour at 1 bit per channel (8 classes)."""
    class Coarse(MeanColour):
        name = "coarse"

        def __init__(self, patch: int, bits: int) -> None:
            super().__init__(patch, 1)

    monkeypatch.setitem(TARGETS, "coarse", Coarse)
    cfg = load_config(PretrainConfig, None, ["mpp.target=coarse", "model.variant=Pico/8", "model.image_size=32"])
    task = MPPTask(cfg)
    model = task.build_model()[0]
    images = random_images(4)
    assert model.head.out_features == 8
    loss, metrics = task.loss(model, batch_of(images))
    assert loss.isfinite() and {"acc", "baseline_acc"} <= metrics.keys()
    with torch.no_grad():
        sums = task.eval_sums(model.eval(), batch_of(images))
    assert set(task.eval_metrics(sums)) == {"top1", "top5", "loss"} and sums["count"] == 4 * 8  # 8 of 16 patches
    assert task.visualize(model, batch_of(images))["mpp/predictions"].shape[0] == 3


# ---- real learning ----------------------------------------------------------------------------

def cifar_images(count: int) -> torch.Tensor:
    from PIL import Image

    with tarfile.open(CIFAR) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg") and "/train/" in m.name]
        picked = members[:: len(members) // count][:count]  # spread over the classes
        arrays = [torch.frombuffer(bytearray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                                             .tobytes()), dtype=torch.uint8).view(32, 32, 3) for m in picked]
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()  # (count, 3, 32, 32)


@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 sample archive not present")
def test_mpp_learns_on_real_images():
    torch.manual_seed(0)
    task = task_for("mean_color", "Pico/8", 32)
    model = task.build_model()[0].train()
    batch = batch_of(cifar_images(64))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(60):
        loss, metrics = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in metrics.items()})
    first = sum(h["loss"] for h in history[:5]) / 5
    last = {k: sum(h[k] for h in history[-5:]) / 5 for k in history[-1]}
    assert last["loss"] < 0.7 * first, (first, last)
    assert last["acc"] > last["baseline_acc"] + 0.02, last
