import pytest
import torch
import torch.nn.functional as F

from vitcore.model.inputs import normalize
from vitcore.model.vit import WIDTHS, ViT, ViTConfig, flops_per_image

PAPER_VARIANTS = ["Ti/16", "S/16", "B/16", "B/32", "L/16", "H/14"]


def tiny(variant: str, **kw) -> ViT:
    """The variant's depth and patch size at a test-sized width (structure, not size)."""
    cfg = ViTConfig.from_variant(variant, **kw)
    cfg.dim, cfg.heads = 8 * cfg.heads, cfg.heads
    cfg.depth = min(cfg.depth, 4)
    return ViT(cfg)


@pytest.mark.parametrize("variant", PAPER_VARIANTS + ["Pico/8", "Nano/8"])
def test_forward_shapes_every_variant(variant):
    patch = int(variant.split("/")[1])
    model = tiny(variant, image_size=2 * patch, num_classes=5)
    out = model(torch.randn(3, 3, 2 * patch, 4 * patch))  # non-square input on a square grid
    dim = model.cfg.dim
    assert out.cls.shape == (3, dim)
    assert out.patches.shape == (3, 8, dim)
    assert out.logits.shape == (3, 5)
    assert out.attentions == []


def num_params(cfg: ViTConfig) -> int:
    """Parameter count of a config, built on the meta device so ViT-H costs no memory."""
    with torch.device("meta"):
        return sum(p.numel() for p in ViT(cfg).parameters())


@pytest.mark.parametrize("variant,paper_millions", [("B/16", 86), ("L/16", 307), ("H/14", 632)])
def test_parameter_counts_match_paper_table1(variant, paper_millions):
    n = num_params(ViTConfig.from_variant(variant, num_classes=1000))
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.01, n


def test_parameter_count_matches_a_real_model():
    cfg = ViTConfig.from_variant("Ti/16", num_classes=1000)
    assert num_params(cfg) == sum(p.numel() for p in ViT(cfg).parameters())


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown variant 'X/16'; expected one of Pico/<patch>"):
        ViTConfig.from_variant("X/16")


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)  # drop_path may drop a branch for the whole batch of 2: not with this seed
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=32, num_classes=4, drop_path=0.1, dropout=0.1))
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    (out.logits.sum() + out.patches.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_weights_sum_to_one_and_match_fused_path():
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, return_attention=True)
    assert len(out.attentions) == model.cfg.depth
    for attn in out.attentions:
        assert attn.shape == (2, model.cfg.heads, 17, 17)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, model.cfg.heads, 17))
    # the explicit path (used for inspection) computes what the fused SDPA path computes
    torch.testing.assert_close(out.patches, model(x).patches, atol=1e-5, rtol=1e-5)


def test_patch_embedding_conv_equals_patchify_flatten_linear():
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=32))
    x = torch.randn(2, 3, 32, 40)
    tokens, grid = model.patch_embed(x)  # the conv alone, after the stem's normalisation
    p = 8
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, gh, gw, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, grid[0] * grid[1], 3 * p * p)  # (B, N, C*p*p)
    conv = model.patch_embed.proj
    linear = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    assert grid == (4, 5)
    torch.testing.assert_close(tokens, linear, atol=1e-5, rtol=1e-5)


def test_the_stem_normalises_pixels_uint8_or_float_alike():
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=32)).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens, _ = model.embed_patches(pixels)
    torch.testing.assert_close(tokens, model.patch_embed(normalize(pixels))[0])
    torch.testing.assert_close(normalize(pixels)[:, :, 0, 0], pixels[:, :, 0, 0].float() / 127.5 - 1)  # [-1, 1]
    with torch.no_grad():  # MixUp's float pixels on the same 0-255 scale give the same outputs
        torch.testing.assert_close(model(pixels.float()).patches, model(pixels).patches)


def test_init_follows_timm():
    """Every tensor drawn as timm's ViT draws it (the patch conv and norms at PyTorch's defaults, the
    [CLS] token near zero, the head like every linear layer): the same spread, tensor by tensor."""
    import timm

    torch.manual_seed(0)
    ours = ViT(ViTConfig.from_variant("Ti/16", num_classes=10)).state_dict()
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        o = ours[name]
        if t.numel() >= 1000:  # enough draws for the spread to say which distribution
            assert abs(o.std().item() / t.std().item() - 1) < 0.1, name
        else:
            assert (o.std().item() < 1e-5) == (t.std().item() < 1e-5), name  # zeros, ones, near-zero [CLS]
            assert (o.mean().abs().item() < 1e-3) == (t.mean().abs().item() < 1e-3), name
    assert ours["head.weight"].std().item() > 0.015  # not zero: a zero head passes the encoder no gradient


def test_input_size_not_divisible_by_patch_is_an_error():
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=32))
    with pytest.raises(ValueError, match="not divisible"):
        ViTConfig.from_variant("Pico/8", image_size=30).grid
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 32))


def test_flops_counts_the_dominant_matmuls():
    cfg = ViTConfig.from_variant("B/16")
    # ViT-B/16 at 224 is 17.6 GMACs (the "GFLOPs" timm and DeiT quote), i.e. ~35.1 GFLOPs
    assert 34.5e9 < flops_per_image(cfg) < 35.7e9


def test_timm_export_matches_outputs():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    ours = ViT(ViTConfig.from_variant("Pico/8", image_size=32, num_classes=7)).eval()
    torch.nn.init.normal_(ours.head.weight)  # a zero head would make the logit check vacuous
    theirs = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                               num_classes=7, global_pool="token").eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # our names are timm's
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # pixels: our stem normalises them
    feats = theirs.forward_features(normalize(x))  # (B, 1+N, D) after the final norm
    out = ours(x)
    torch.testing.assert_close(feats[:, 1:], out.patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.forward_head(feats), out.logits, atol=1e-5, rtol=1e-5)
    assert set(WIDTHS) >= {"Ti", "S", "B", "L", "H"}
