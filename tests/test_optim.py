import copy
import math
import re

import pytest
import torch

from pretrain.config import MPPConfig
from pretrain.task import MPPModel
from vitcore.config import ConfigError, OptimConfig
from vitcore.train.optim import build_optimizer, lr_at, set_lr, skip_if_nonfinite
from vitcore.model.vit import ViT, ViTConfig


def pico(**overrides) -> ViT:
    """Pico/8 at 16 px: depth 2, so 4 layers for layer decay."""
    return ViT(ViTConfig.from_variant("Pico/8", image_size=16, **overrides))


def by_name(model, opt, key: str) -> dict[str, float]:
    """Parameter name -> its group's `key` (lr, weight_decay, lr_scale)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g[key] for g in opt.param_groups for p in g["params"]}


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
    model = pico()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert len(opt.param_groups) == 2  # no layer decay: [decayed, undecayed], as older checkpoints hold
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert {"pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "norm.weight"} <= plain
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_no_weight_decay_comes_from_the_model_and_its_submodules(name):
    model = MPPModel(pico(), MPPConfig(head="mlp"), outputs=8)
    wd = by_name(model, build_optimizer(model, OptimConfig(name=name, weight_decay=0.1, layer_decay=0.5)), "weight_decay")
    undecayed = {"mask_token", "encoder.pos_embed", "encoder.cls_token", "encoder.patch_embed.proj.bias",
                 "encoder.blocks.1.norm1.weight", "encoder.blocks.1.norm1.bias", "encoder.norm.weight", "head.0.bias"}
    decayed = {"encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.1.mlp.fc2.weight",
               "head.0.weight", "head.2.weight"}
    assert {n for n, v in wd.items() if v == 0.0} >= undecayed
    assert all(wd[n] == 0.1 for n in decayed)
    assert {n for n, v in wd.items() if v == 0.1} == {n for n, p in model.named_parameters() if p.ndim > 1} - undecayed


def test_no_weight_decay_naming_a_missing_parameter_is_an_error():
    class Typo(torch.nn.Linear):
        def no_weight_decay(self) -> set[str]:
            return {"wieght"}

    with pytest.raises(ValueError, match="wieght"):
        build_optimizer(torch.nn.Sequential(Typo(2, 2)), OptimConfig())


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_layer_decay_scales_each_layers_lr_after_set_lr(name):
    model = pico(num_classes=5)  # 2 blocks: layers 0 (embeddings), 1, 2 (blocks), 3 (norm, head)
    cfg = OptimConfig(name=name, lr=0.1, warmup_steps=10, layer_decay=0.5)
    opt = build_optimizer(model, cfg)
    assert len(opt.param_groups) == 8  # 4 scales x (decayed, undecayed): grouped, not one per tensor
    expected = {"patch_embed.proj.weight": 0.5**3, "patch_embed.proj.bias": 0.5**3, "cls_token": 0.5**3,
                "pos_embed": 0.5**3, "blocks.0.attn.qkv.weight": 0.5**2, "blocks.0.norm2.bias": 0.5**2,
                "blocks.1.mlp.fc1.weight": 0.5, "blocks.1.norm1.weight": 0.5, "norm.weight": 1.0,
                "head.weight": 1.0, "head.bias": 1.0}
    assert by_name(model, opt, "lr") == pytest.approx({n: cfg.lr * s for n, s in by_name(model, opt, "lr_scale").items()})
    for step in (0, 4, 50):
        set_lr(opt, lr := lr_at(step, cfg, 100))
        lrs = by_name(model, opt, "lr")
        assert {n: lrs[n] for n in expected} == pytest.approx({n: lr * s for n, s in expected.items()})
    scales = by_name(model, build_optimizer(model, OptimConfig(name=name)), "lr_scale")
    assert set(scales.values()) == {1.0}  # layer_decay defaults to off


def test_a_head_outside_the_vit_is_the_top_layer():
    model = MPPModel(pico(), MPPConfig(), outputs=8)
    scales = by_name(model, build_optimizer(model, OptimConfig(layer_decay=0.5)), "lr_scale")
    assert scales["head.weight"] == scales["head.bias"] == scales["mask_token"] == 1.0
    assert scales["encoder.norm.weight"] == 1.0 and scales["encoder.blocks.1.attn.proj.weight"] == 0.5
    assert scales["encoder.blocks.0.mlp.fc1.bias"] == 0.25
    assert scales["encoder.patch_embed.proj.weight"] == scales["encoder.pos_embed"] == 0.125


def test_sgd_steps_as_torchs_own_sgd():
    torch.manual_seed(0)
    model = pico(num_classes=3)
    twin = copy.deepcopy(model)
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.05, layer_decay=0.7)
    opt = build_optimizer(model, cfg)
    assert all(g["fused"] and g["momentum"] == 0.9 and not g["nesterov"] for g in opt.param_groups)
    lrs, wds = by_name(model, opt, "lr"), by_name(model, opt, "weight_decay")
    ref = torch.optim.SGD([{"params": [p], "lr": lrs[n], "weight_decay": wds[n]} for n, p in twin.named_parameters()],
                          momentum=0.9, foreach=False, fused=False)
    images = torch.randn(2, 3, 16, 16)
    for _ in range(2):  # the first step (buffer = grad) and one with momentum
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(images).logits.square().sum().backward()
            o.step()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, msg=n)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], msg=n)


def test_sgd_nonfinite_step_is_skipped_on_the_device_even_the_first():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, weight_decay=0.0))
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x = torch.randn(4, 3)

    def step(found_inf: float) -> None:
        opt.zero_grad()
        model(x).sum().backward()
        skip_if_nonfinite(opt, torch.tensor(found_inf))
        opt.step()

    before = [p.detach().clone() for p in model.parameters()]
    step(1.0)  # a skipped first step: fused SGD would otherwise leave empty_like garbage as momentum
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not opt.state[p]["momentum_buffer"].any() for p in model.parameters())
    for found_inf in (0.0, 1.0, 0.0):  # the reference never sees the skipped steps
        step(found_inf)
        if found_inf == 0.0:
            ref.zero_grad()
            twin(x).sum().backward()
            ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(name="lion"), "optim.name: 'lion' is not one of adam, adamw, sgd"),
        (dict(momentum=1.0), "optim.momentum: must be in [0, 1)"),
        (dict(momentum=-0.1), "optim.momentum: must be in [0, 1)"),
        (dict(layer_decay=0.0), "optim.layer_decay: must be in (0, 1]"),
        (dict(layer_decay=1.5), "optim.layer_decay: must be in (0, 1]"),
    ],
)
def test_bad_optim_configs_are_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        OptimConfig(**overrides).validate("optim")


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
