import math

import pytest
import torch

from vitcore.config import OptimConfig
from vitcore.optim import build_optimizer, lr_at, skip_if_nonfinite
from vitcore.vit import ViT, ViTConfig


def test_warmup_then_cosine_and_linear():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(0.0)
    linear = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0, schedule="linear")
    assert lr_at(50, linear, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(7, OptimConfig(lr=0.3, warmup_steps=0, schedule="constant"), 100) == 0.3
    assert all(math.isfinite(lr_at(s, cfg, 110)) for s in range(200))


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = ViT(ViTConfig.from_variant("Pico/8", image_size=16))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert {"pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "norm.weight"} <= plain
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_nonfinite_step_is_skipped_on_the_device(name):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.1))
    model(torch.randn(4, 3)).sum().backward()
    skip_if_nonfinite(opt, torch.ones(()))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(opt.state[p]["step"].item() == 0 for p in model.parameters())
    skip_if_nonfinite(opt, torch.zeros(()))
    opt.step()
    assert not torch.equal(before[0], model.weight)
