"""The fine-tuning stage's config schema. Its defaults are the embedded demo recipe: the `make demo`
MPP checkpoint (Nano/8 at 48 px) fine-tuned on Imagenette at 64 px, with the position embeddings
resampled from 6x6 to 8x8 once at load, sized for a 2-core CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vitcore import checkpoint
from vitcore.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, StageConfig, check
from vitcore.model.pretrained import TORCH_SUFFIXES

DEMO_PRETRAINED = "runs/demo/pretrain/checkpoints/latest"
MODES = ("full", "linear_probe")
POOLINGS = ("cls", "avg")


@dataclass
class FinetuneSection:
    mode: str = "full"  # full | linear_probe (encoder frozen and in eval mode, only the head trains)
    pooling: str = "cls"  # cls (the paper) | avg (mean of the patch tokens)
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # > 0: MixUp on the batch (torchvision v2)
    cutmix_alpha: float = 0.0  # > 0: CutMix on the batch; with both, one of the two per batch
    randaugment: bool = False  # RandAugment (torchvision's defaults) in the data workers
    ema_decay: float = 0.0  # > 0: an EMA of the weights (Polyak averaging), evaluated beside them

    def validate(self, key: str) -> None:
        check(self.mode in MODES, f"{key}.mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        check(self.pooling in POOLINGS, f"{key}.pooling", f"{self.pooling!r} is not one of {', '.join(POOLINGS)}")
        check(0.0 <= self.label_smoothing < 1.0, f"{key}.label_smoothing", "must be in [0, 1)")
        check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, f"{key}.mixup_alpha",
              "mixup_alpha and cutmix_alpha must be >= 0 (0 disables)")
        check(0.0 <= self.ema_decay < 1.0, f"{key}.ema_decay", "must be in [0, 1) (0 disables)")


@dataclass
class FinetuneConfig(StageConfig):
    # A pretraining checkpoint (its directory, a run's checkpoints/latest, or the run dir) or a timm
    # VisionTransformer state dict (.safetensors/.pth); null trains from scratch (the baseline).
    init_from: str | None = DEMO_PRETRAINED
    model: ModelConfig = field(default_factory=lambda: ModelConfig(image_size=64, drop_path=0.1))
    data: DataConfig = field(default_factory=lambda: DataConfig(shards="data/imagenette-112/train"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, min_lr=1e-6, warmup_steps=40))
    # 200 steps of batch 64 at 64 px: about 3 minutes on 2 CPU cores, evaluated at the end
    run: RunConfig = field(default_factory=lambda: RunConfig(
        out_dir="runs/finetune", steps=200, eval_every=0, image_every=100, ckpt_every=100))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(shards="data/imagenette-112/val"))
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def validate(self) -> None:
        if self.init_from is None:
            return
        path = Path(self.init_from)
        if path.suffix in (".safetensors", *TORCH_SUFFIXES) and path.is_file():
            return
        try:
            checkpoint.resolve(path)
        except FileNotFoundError:
            first = ("run `make demo` (it pretrains into runs/demo/pretrain) first, " if self.init_from == DEMO_PRETRAINED
                     else "pretrain first (`accelerate launch pretrain/run.py`), ")
            check(False, "init_from", f"no pretraining checkpoint or state dict at {self.init_from}: {first}"
                  "or set init_from=null to train from scratch")
