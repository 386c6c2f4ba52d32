"""The pretraining stage's config schema. Its defaults are the embedded demo recipe: a Nano/8
ViT at 48 px (a 6x6 patch grid) on Imagenette shards, 500 steps of batch 64, that shows MPP
learning on a 2-core CPU in about 3 minutes (the first stage of `make demo`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretrain.targets import TARGETS
from vitcore.config import ModelConfig, RunConfig, StageConfig, check


@dataclass
class MPPConfig:
    corrupt_ratio: float = 0.5  # share of patches corrupted per image (the paper's 50%)
    mask_prob: float = 0.8  # of corrupted: replaced by the learnable [mask] embedding
    random_prob: float = 0.1  # of corrupted: replaced by another patch's embedding
    keep_prob: float = 0.1  # of corrupted: left unchanged (but still predicted)
    # a name in pretrain.targets.TARGETS: mean_color | downsampled (4x4 of 512 classes) | pixels (L2)
    target: str = "mean_color"
    bits: int = 3  # bits per colour channel: 3 -> 8 levels -> 512 classes
    head: str = "linear"  # linear | mlp

    def validate(self, key: str) -> None:
        check(0.0 < self.corrupt_ratio <= 1.0, f"{key}.corrupt_ratio", "must be in (0, 1]")
        for name in ("mask_prob", "random_prob", "keep_prob"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{key}.{name}", "must be in [0, 1]")
        total = self.mask_prob + self.random_prob + self.keep_prob
        check(math.isclose(total, 1.0, abs_tol=1e-6), f"{key}.mask_prob",
              f"mask_prob + random_prob + keep_prob must sum to 1, got {total:g}")
        check(self.target in TARGETS, f"{key}.target", f"{self.target!r} is not one of {', '.join(TARGETS)}")
        check(1 <= self.bits <= 8, f"{key}.bits", "must be between 1 and 8")
        check(self.head in ("linear", "mlp"), f"{key}.head", f"{self.head!r} is not one of linear, mlp")


@dataclass
class PretrainConfig(StageConfig):
    # 48 px: the low resolution the fine-tuning stage (64 px) raises, at half the cost of 64 px
    model: ModelConfig = field(default_factory=lambda: ModelConfig(image_size=48))
    # 500 steps: MPP accuracy several times the most-frequent-colour baseline in ~4 minutes on 2 CPU cores.
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/pretrain", steps=500))
    # eval.shards (`make demo` gives Imagenette val, labels unused): MPP accuracy on held-out images, or
    # the validation loss for mpp.target=pixels; monitor: kNN and linear-probe top-1 while pretraining runs
    mpp: MPPConfig = field(default_factory=MPPConfig)

    def validate(self) -> None:
        target = TARGETS.get(self.mpp.target)  # an unknown name is mpp.target's own error
        problem = target.problem(self.model.patch_size) if target else None
        check(problem is None, "mpp.target", problem or "")
