"""Supervised fine-tuning as an engine task: a ViT classifier at the fine-tuning resolution,
initialised from a pretrained encoder (position embeddings resampled once, at load), with a
fresh linear head (timm's init), full fine-tuning or a linear probe, label smoothing, MixUp/CutMix,
RandAugment and an EMA of the weights evaluated beside them.
"""

from __future__ import annotations

import copy
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from finetune.config import FinetuneConfig
from vitcore.config import ConfigError
from vitcore.data import read_index
from vitcore.data.transforms import eval_transform, train_transform
from vitcore.eval.attention import attention_maps, confusion_image
from vitcore.eval.loop import eval_mode
from vitcore.eval.metrics import classification_metrics, classification_sums, prediction_rows
from vitcore.model.pretrained import load_encoder
from vitcore.model.vit import ViT, ViTConfig, flops_per_image
from vitcore.train.task import TRAINED, Presentation, Task


class Classifier(nn.Module):
    """A ViT with a linear head, optionally frozen below the head, optionally with an EMA copy.

    The EMA's weights are buffers-in-spirit (parameters with requires_grad=False): they live in
    the state dict, so checkpoints and resume carry them, and DDP never reduces them.
    """

    def __init__(self, vit: ViT, frozen: bool = False, ema: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.frozen = frozen
        if frozen:
            vit.requires_grad_(False)
            vit.head.requires_grad_(True)
        self.ema = copy.deepcopy(vit).requires_grad_(False) if ema else None

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) pixels on the 0-255 scale -> logits (B, classes)."""
        if not self.frozen:
            return self.vit(images).logits
        with torch.no_grad():  # a linear probe: no graph, no backward through the encoder
            pooled = self.vit(images).pooled  # (B, D)
        return self.vit.head(pooled)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:  # the frozen encoder keeps eval behaviour: no dropout, no drop path
            self.vit.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights, on the device, without a host sync."""
        assert self.ema is not None
        ema, live = list(self.ema.parameters()), list(self.vit.parameters())
        torch._foreach_lerp_(ema, live, 1.0 - decay)


class ClassifyTask(Task):
    name = "finetune"
    labeled = True
    metrics = {"top1": "max", "top5": "max", "loss": "min"}
    best_metric = "top1"
    presentation = Presentation(
        title="fine-tuning", bar_keys=("loss", "acc", "img_s"),
        report_columns=(("loss", "loss", "{:.3f}"), ("train acc", "acc", "{:.1%}"),
                        ("val top-1", "eval.top1", "{:.1%}"), ("val top-5", "eval.top5", "{:.1%}"),
                        ("EMA top-1", "eval_ema.top1", "{:.1%}")))

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        size = cfg.model.image_size
        self.transform = train_transform(size, randaugment=cfg.finetune.randaugment)
        self.eval_transform = eval_transform(size)
        self.evaluated = (TRAINED, "ema") if cfg.finetune.ema_decay > 0 else (TRAINED,)

    @cached_property
    def class_names(self) -> list[str]:
        """The classes of data.shards (its index.json), read when first needed, not by the constructor."""
        try:
            index = read_index(self.cfg.data.shards)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.shards: {e} (write labelled shards with `python -m vitcore.data.shards`, "
                              "or `make demo` for the default Imagenette ones)") from None
        if not index["classes"]:
            raise ConfigError(f"data.shards: {self.cfg.data.shards} has no labels (index.json classes is null)")
        return list(index["classes"])

    @cached_property
    def mix(self) -> v2.Transform | None:
        """MixUp and/or CutMix on the batch's pixels (one of the two per batch when both are on)."""
        ft = self.cfg.finetune
        mixes = [kind(alpha=alpha, num_classes=len(self.class_names))
                 for alpha, kind in ((ft.mixup_alpha, v2.MixUp), (ft.cutmix_alpha, v2.CutMix)) if alpha > 0]
        return v2.RandomChoice(mixes) if len(mixes) > 1 else (mixes[0] if mixes else None)

    def build_model(self) -> tuple[Classifier, list[str]]:
        m, ft = self.cfg.model, self.cfg.finetune
        vit = ViT(ViTConfig.from_variant(m.variant, image_size=m.image_size, num_classes=len(self.class_names),
                                         pool=ft.pooling, dropout=m.dropout, drop_path=m.drop_path))
        if self.cfg.init_from is not None:
            try:
                report = load_encoder(vit, self.cfg.init_from)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            lines = report.lines()
        else:
            lines = ["init_from: null, training from scratch"]
        return Classifier(vit, frozen=ft.mode == "linear_probe", ema=ft.ema_decay > 0), lines

    def encoder(self, model: nn.Module) -> ViT:
        return model.vit

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy with label smoothing on (possibly mixed) soft targets; train top-1 against
        the unmixed labels."""
        images, labels = batch["image"], batch["label"]  # uint8 (B, 3, H, W), (B,)
        targets: Tensor = labels
        if self.mix is not None:  # blends float pixels (0-255): the model's stem normalises them
            images, targets = self.mix(images.float(), labels)  # targets (B, C) soft
        logits = model(images).float()  # (B, C)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.finetune.label_smoothing)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return loss, {"acc": acc}

    def eval_sums(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Top-1/top-5 hits, cross-entropy and the confusion matrix of one batch, and each image's
        label and top-5 (for the final evaluation's predictions); `model` is a ViT (the trained
        weights or their EMA)."""
        logits = model(batch["image"]).logits
        return {**classification_sums(logits, batch["label"], len(self.class_names)),
                **prediction_rows(logits, batch["label"])}

    def eval_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        return classification_metrics(sums)

    def eval_images(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        matrix = sums["confusion"].view(len(self.class_names), len(self.class_names))  # (C, C), rows: true class
        return {"val/confusion": confusion_image(matrix, self.class_names)}

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        return {TRAINED: model.vit, **({"ema": model.ema} if model.ema is not None else {})}

    def after_step(self, model: nn.Module, step: int) -> None:
        if model.ema is not None:
            # timm's warmup: early averages do not drag in the initial weights for long
            decay = min(self.cfg.finetune.ema_decay, (1 + step) / (10 + step))
            model.update_ema(decay)

    def train_flops(self, model: nn.Module, image_size: tuple[int, int]) -> int:
        forward = flops_per_image(model.vit.cfg, image_size)
        return forward if self.cfg.finetune.mode == "linear_probe" else 3 * forward  # a probe has no backward

    def meta(self) -> dict[str, Any]:
        ft = self.cfg.finetune
        return {"num_classes": len(self.class_names), "classes": self.class_names, "pooling": ft.pooling,
                "mode": ft.mode, "init_from": self.cfg.init_from, "ema": ft.ema_decay > 0}

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Attention rollout of the trained weights over up to 8 images: images above, maps below."""
        with eval_mode(model.vit) as vit:
            maps = attention_maps(vit, batch["image"][:8])  # (b, 3, H, W) uint8 images
        return {"attention/rollout": maps["attention_rollout"]}
