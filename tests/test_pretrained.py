from datetime import datetime, timezone

import pytest
import torch
from safetensors.torch import save_file

from pretrain.config import PretrainConfig
from pretrain.task import MPPModel, MPPTask
from vitcore.checkpoint import save_checkpoint
from vitcore.config import ModelConfig, to_dict
from vitcore.model.inputs import normalize
from vitcore.model.pos_embed import resample_pos_embed
from vitcore.model.pretrained import load_encoder
from vitcore.model.vit import ViT, ViTConfig


def pretrained(tmp_path, variant="Pico/8", image_size=64, step=5) -> MPPModel:
    """An MPP model saved as the engine's `_save` saves it: weights, meta with arch and encoder prefix."""
    cfg = PretrainConfig(model=ModelConfig(variant=variant, image_size=image_size))
    torch.manual_seed(1)
    model = MPPTask(cfg).build_model()[0]
    c = model.encoder.cfg
    meta = {
        "format": 1, "stage": "pretrain", "created": datetime.now(timezone.utc).isoformat(),
        "arch": {"variant": variant, "dim": c.dim, "depth": c.depth, "heads": c.heads, "mlp_ratio": c.mlp_ratio,
                 "patch_size": c.patch_size, "image_size": list(c.image_size), "grid": list(c.grid)},
        "encoder_prefix": "encoder.", "samples": 320, "config": to_dict(cfg),
    }
    save_checkpoint(tmp_path / "checkpoints", step, model.state_dict(), {"step": step}, meta, keep_last=2)
    return model


def classifier(image_size, variant="Pico/8", num_classes=10) -> ViT:
    torch.manual_seed(2)  # a different draw from the pretrained weights
    return ViT(ViTConfig.from_variant(variant, image_size=image_size, num_classes=num_classes)).eval()


@pytest.mark.parametrize("image_size,grid", [(96, (12, 12)), ((64, 96), (8, 12))])
def test_pos_embed_is_resampled_once_at_load(tmp_path, image_size, grid):
    src = pretrained(tmp_path).encoder
    vit = classifier(image_size)
    report = load_encoder(vit, tmp_path / "checkpoints" / "latest")
    assert vit.pos_embed.shape == (1, 1 + grid[0] * grid[1], 64)
    assert report.pos_embed == f"pos_embed 8x8 -> {grid[0]}x{grid[1]}"
    assert torch.equal(vit.pos_embed[:, 0], src.pos_embed[:, 0])  # [CLS] position kept exactly
    assert torch.equal(vit.pos_embed, resample_pos_embed(src.pos_embed, (8, 8), grid))
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert sorted(report.skipped) == ["head.bias", "head.weight", "mask_token"]
    assert "head.weight" not in report.loaded and "pos_embed" in report.loaded
    [line] = report.lines()
    # the checkpoint's recorded stage as data, never a stage word of vitcore's own
    assert f"checkpoint {tmp_path / 'checkpoints' / 'step-00000005'} (pretrain, step 5)" in line
    assert f"8x8 -> {grid[0]}x{grid[1]}" in line
    assert "dropped: " in line and "mask_token" in line


def test_same_resolution_reproduces_the_encoder_bit_for_bit(tmp_path):
    src = pretrained(tmp_path, image_size=32).encoder.eval()
    vit = classifier(32)
    report = load_encoder(vit, tmp_path)  # a run directory resolves to its latest checkpoint
    assert report.pos_embed is None and "pos_embed unchanged" in report.lines()[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = vit(x), src(x)
    assert torch.equal(ours.cls, theirs.cls) and torch.equal(ours.patches, theirs.patches)


def test_loading_an_encoder_keeps_the_fresh_head(tmp_path):
    pretrained(tmp_path)
    vit = classifier(96)
    built = {k: v.clone() for k, v in vit.head.state_dict().items()}
    load_encoder(vit, tmp_path / "checkpoints")
    assert all(torch.equal(vit.head.state_dict()[k], v) for k, v in built.items())
    assert built["weight"].std() > 0.015  # timm's init, not zero: a zero head passes the encoder no gradient


def test_wrong_variant_is_a_one_line_error_naming_both(tmp_path):
    pretrained(tmp_path, variant="Nano/8")
    with pytest.raises(ValueError) as e:
        load_encoder(classifier(64), tmp_path / "checkpoints" / "latest")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("init_from: the checkpoint is Nano/8 (dim 128, depth 6, heads 4, patch 8) "
                   "but the model is Pico/8 (dim 64, depth 2, heads 2, patch 8)")


def timm_vit(**kw):
    timm = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(3)
    return timm.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, **kw).eval()


@pytest.mark.parametrize("fmt", ["pth", "wrapped.pth", "safetensors"])
def test_timm_state_dict_loads_and_matches_timm(tmp_path, fmt):
    theirs = timm_vit(num_classes=1000)
    path = tmp_path / f"vit.{fmt}"
    sd = theirs.state_dict()
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save({"model": sd, "epoch": 3} if fmt.startswith("wrapped") else sd, path)

    vit = classifier(32)
    built = vit.head.weight.clone()
    report = load_encoder(vit, path)
    assert sorted(report.skipped) == ["head.bias", "head.weight"] and report.pos_embed is None
    assert report.source == f"timm state dict {path}"
    assert torch.equal(vit.head.weight, built) and vit.head.out_features == 10  # the head kept as built
    x = torch.rand(2, 3, 32, 32) * 255  # pixels: our stem normalises them; timm takes them normalised
    with torch.no_grad():
        torch.testing.assert_close(vit(x).cls, theirs.forward_features(normalize(x))[:, 0], atol=1e-5, rtol=1e-5)

    # at 64 px: the stored 4x4 grid resampled once, as timm resamples on the fly with dynamic_img_size
    vit = classifier(64)
    assert load_encoder(vit, path).pos_embed == "pos_embed 4x4 -> 8x8"
    dynamic = timm_vit(num_classes=1000, dynamic_img_size=True)
    dynamic.load_state_dict(sd)
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        torch.testing.assert_close(vit(x).cls, dynamic.forward_features(normalize(x))[:, 0], atol=1e-5, rtol=1e-5)


def test_missing_key_is_listed(tmp_path):
    sd = timm_vit(num_classes=0).state_dict()
    del sd["blocks.1.mlp.fc1.weight"]
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"does not match the model: missing blocks\.1\.mlp\.fc1\.weight; "
                                         r"unexpected blocks\.0\.attn\.extra$"):
        load_encoder(classifier(64), tmp_path / "vit.pth")


@pytest.mark.parametrize("kw,error", [
    (dict(reg_tokens=2), "extra prefix tokens \\(reg_token\\)"),
    (dict(class_token=False, global_pool="avg"), "no class token"),
    (dict(no_embed_class=True), "has 16 position embeddings, not 1 \\+ a square grid"),
])
def test_timm_models_this_vit_cannot_represent_are_refused(tmp_path, kw, error):
    torch.save(timm_vit(num_classes=0, **kw).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=error):
        load_encoder(classifier(64), tmp_path / "vit.pth")


def test_timm_architecture_mismatch_is_one_line(tmp_path):
    torch.save(timm_vit(num_classes=0).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"^init_from: the timm state dict is a ViT \(dim 64, depth 2, patch 8\) "
                                         r"but the model is Nano/8 \(dim 128, depth 6, heads 4, patch 8\)$"):
        load_encoder(classifier(64, variant="Nano/8"), tmp_path / "vit.pth")


def test_a_path_that_is_nothing_loadable_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from: no complete checkpoint"):
        load_encoder(classifier(64), tmp_path / "nowhere")
