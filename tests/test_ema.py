"""The fine-tuning EMA (`Classifier.update_ema`, `ClassifyTask.after_step`): timm's decay warm-up, the
exact update, that the optimizer never touches it, and that checkpoints and resume carry it."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import FinetuneConfig
from finetune.task import Classifier, ClassifyTask
from vitcore import checkpoint
from vitcore.config import OptimConfig, load_config
from vitcore.model.vit import ViT, ViTConfig
from vitcore.train.engine import Trainer
from vitcore.train.optim import build_optimizer
from vitcore.train.preemption import Preempted


def classifier(seed: int = 0, ema: bool = True) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(ViT(ViTConfig.from_variant("Pico/8", image_size=32, num_classes=10)), ema=ema)


def perturb(model: Classifier, seed: int) -> None:
    """Moves the live weights away from the EMA (a fresh EMA is a copy of them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.vit.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def decays(ema_decay: float, steps: list[int]) -> list[float]:
    """The decay `ClassifyTask.after_step` applies at each step, read off a recording model."""
    task = ClassifyTask(load_config(FinetuneConfig, None, ["init_from=null", f"finetune.ema_decay={ema_decay}"]))
    seen: list[float] = []
    model = SimpleNamespace(ema=object(), update_ema=seen.append)
    for step in steps:
        task.after_step(model, step)
    return seen


def test_decay_warms_up_as_timm_then_holds_the_configured_value():
    # (1 + step) / (10 + step): 0.1 at step 0, 2/11 at 1, 11/20 at 10, 1001/1010 at 1000
    assert decays(0.9999, [0, 1, 10, 1000]) == [1 / 10, 2 / 11, 11 / 20, 1001 / 1010]
    # capped by the configured decay once the warm-up passes it
    assert decays(0.5, [0, 1, 10, 1000]) == [1 / 10, 2 / 11, 0.5, 0.5]
    assert decays(0.99, [1000]) == [0.99]


def test_without_an_ema_after_step_changes_nothing():
    task = ClassifyTask(load_config(FinetuneConfig, None, ["init_from=null", "finetune.ema_decay=0"]))
    model = classifier(ema=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task.after_step(model, 0)
    after = model.state_dict()
    assert model.ema is None and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_update_is_decay_times_ema_plus_the_rest_times_live():
    model = classifier()
    perturb(model, 1)
    ema_before = [p.detach().clone() for p in model.ema.parameters()]
    live = [p.detach().clone() for p in model.vit.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(ema_before, live))
    decay = 0.9
    model.update_ema(decay)
    after = list(model.ema.parameters())
    assert len(after) == len(live) == len(ema_before)
    for e, l, a in zip(ema_before, live, after):
        torch.testing.assert_close(a, decay * e + (1 - decay) * l)
    assert all(torch.equal(p, l) for p, l in zip(model.vit.parameters(), live))  # the live weights are untouched


def test_the_ema_takes_no_gradient_and_no_optimizer_step():
    model = classifier()
    assert all(not p.requires_grad for p in model.ema.parameters())
    optimizer = build_optimizer(model, OptimConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.ema.parameters()}
    ema_before = [p.detach().clone() for p in model.ema.parameters()]
    live_before = [p.detach().clone() for p in model.vit.parameters()]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert all(p.grad is None for p in model.ema.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.ema.parameters(), ema_before))
    assert not all(torch.equal(a, b) for a, b in zip(model.vit.parameters(), live_before))  # the step did train


def test_the_ema_lives_in_the_state_dict():
    model = classifier(seed=0)
    perturb(model, 1)
    model.update_ema(0.5)
    state = model.state_dict()
    assert {k for k in state if k.startswith("ema.")} == {f"ema.{k}" for k in model.vit.state_dict()}
    other = classifier(seed=1)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(model.ema.parameters(), other.ema.parameters()))
    assert all(not p.requires_grad for p in other.ema.parameters())


def overrides(shards, out):
    return ["init_from=null", "model.variant=Pico/8", "model.image_size=32", f"data.shards={shards}",
            "data.batch_size=8", "data.num_workers=1", "eval.shards=null", "run.steps=6", "run.log_every=1",
            "run.ckpt_every=100", "run.image_every=0", "optim.warmup_steps=2", "finetune.ema_decay=0.9",
            f"run.out_dir={out}"]


class PreemptedAt(ClassifyTask):
    """Fine-tuning whose process sends itself SIGTERM after optimizer step `at` (0-based): the engine
    checkpoints at the next step boundary and stops, as under a scheduler's preemption."""

    def __init__(self, cfg, at):
        super().__init__(cfg)
        self.at = at

    def after_step(self, model, step):
        super().after_step(model, step)
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_resumed_run_carries_the_ema_bit_for_bit(cifar_shards, tmp_path):
    whole_cfg = load_config(FinetuneConfig, None, overrides(cifar_shards, tmp_path / "whole"))
    Trainer(whole_cfg, ClassifyTask(whole_cfg)).fit()
    whole = load_file(tmp_path / "whole" / "checkpoints" / "latest" / "model.safetensors")

    cut = load_config(FinetuneConfig, None, overrides(cifar_shards, tmp_path / "cut"))
    with pytest.raises(Preempted, match="step 3 of 6"):
        Trainer(cut, PreemptedAt(cut, at=2)).fit()
    at_cut = load_file(checkpoint.find_latest(tmp_path / "cut" / "checkpoints") / "model.safetensors")
    Trainer(cut, ClassifyTask(cut)).fit()  # run.resume=auto: from the step-3 checkpoint
    resumed = load_file(tmp_path / "cut" / "checkpoints" / "latest" / "model.safetensors")

    ema = sorted(k for k in whole if k.startswith("ema."))
    assert ema and len(ema) == len([k for k in whole if k.startswith("vit.")])
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "the resumed run's weights or EMA differ"
    # the comparison can fail: the EMA moved after the checkpoint, and differs from the live weights
    assert any(not torch.equal(at_cut[k], resumed[k]) for k in ema)
    assert any(not torch.equal(whole[k], whole["vit." + k[len("ema."):]]) for k in ema)
