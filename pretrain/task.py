"""The masked patch prediction task: the model (encoder + [mask] token + head), loss and metrics.

The engine knows nothing of MPP; it calls the `vitcore.train.task.Task` methods implemented here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from pretrain.config import MPPConfig, PretrainConfig
from pretrain.corruption import KEPT, MASK, RANDOM, Corruption, corrupt, corruption_counts
from pretrain.targets import TARGETS, patchify, unpatchify
from vitcore.data.transforms import eval_transform, train_transform
from vitcore.eval.loop import eval_mode
from vitcore.model.vit import ViT, ViTConfig
from vitcore.train.task import Presentation, Task

CROP_SCALE = (0.35, 1.0)  # area fraction of the random crops: milder than fine-tuning's (0.08, 1)


class MPPOutput(NamedTuple):
    logits: Tensor  # (B, K, outputs) predictions at the selected positions only
    corruption: Corruption


class MPPModel(nn.Module):
    """ViT encoder + learnable [mask] embedding + a prediction head on the corrupted positions."""

    def __init__(self, encoder: ViT, mpp: MPPConfig, outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.mpp = mpp
        dim = encoder.cfg.dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if mpp.head == "mlp":
            self.head: nn.Module = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, outputs))
        else:
            self.head = nn.Linear(dim, outputs)
        for m in self.head.modules():  # the encoder's init (timm's): trunc_normal(0.02), zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> MPPOutput:
        """uint8 (B, 3, H, W) images -> logits (B, K, outputs) at the K corrupted positions.
        The corruption draws from `generator`, or from the global RNG (seeded by the engine)."""
        tokens, grid = self.encoder.embed_patches(images)  # (B, N, D)
        tokens, record = corrupt(tokens, self.mask_token, self.mpp.corrupt_ratio, self.mpp.mask_prob,
                                 self.mpp.random_prob, generator)  # (B, N, D)
        patches = self.encoder.forward_tokens(tokens, grid).patches  # (B, N, D)
        B, N, D = patches.shape
        rows = (torch.arange(B, device=patches.device)[:, None] * N + record.positions).flatten()  # (B*K,)
        selected = patches.reshape(B * N, D).index_select(0, rows).view(*record.positions.shape, D)  # (B, K, D)
        # The head runs on the K selected tokens only: static shape, and no work on the rest.
        return MPPOutput(self.head(selected), record)  # (B, K, outputs)

    def no_weight_decay(self) -> set[str]:
        """The [mask] embedding is a token, not a weight: never decayed (read by `vitcore.train.optim`)."""
        return {"mask_token"}


class MPPTask(Task):
    """Masked patch prediction as an engine task. Its evaluation (on `eval.shards`, labels unused)
    scores the predicted colours of the corrupted patches (top-1, top-5, cross-entropy), or their
    pixels' mean squared error for `mpp.target=pixels`, with a fixed corruption per batch."""

    name = "pretrain"  # recorded in checkpoints
    labeled = False  # self-supervised: shards need no labels
    presentation = Presentation(
        title="pretraining", bar_keys=("loss", "acc", "baseline_acc", "img_s"),
        report_columns=(("loss", "loss", "{:.3f}"), ("MPP acc", "acc", "{:.1%}"),
                        ("most-frequent-colour acc", "baseline_acc", "{:.1%}"), ("val MPP acc", "eval.top1", "{:.1%}"),
                        ("kNN top-1", "probe.knn_top1_patch_mean", "{:.1%}"),
                        ("linear probe top-1", "probe.linear_top1_patch_mean", "{:.1%}")),
        curves=(("train loss", ("loss",)), ("MPP accuracy vs the most-frequent colour", ("acc", "baseline_acc"))))

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.transform = train_transform(cfg.model.image_size, CROP_SCALE)  # PIL -> uint8 (3, H, W), in data workers
        self.eval_transform = eval_transform(cfg.model.image_size)
        self.mpp = cfg.mpp
        self.patch = cfg.model.patch_size
        self.target = TARGETS[cfg.mpp.target](self.patch, cfg.mpp.bits)  # what the head predicts
        self.metrics, self.best_metric = self.target.metrics, self.target.best_metric

    def build_model(self) -> tuple[MPPModel, list[str]]:
        m = self.cfg.model
        vit_cfg = ViTConfig.from_variant(m.variant, image_size=m.image_size, dropout=m.dropout, drop_path=m.drop_path)
        return MPPModel(ViT(vit_cfg), self.mpp, self.target.outputs), []

    def encoder(self, model: nn.Module) -> ViT:
        return model.encoder  # the engine passes the unwrapped module

    def targets(self, images: Tensor, positions: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) images -> the target's values at (B, K) positions: (B, K, ...)."""
        t = self.target.make(images)  # (B, N, ...)
        index = positions.reshape(*positions.shape, *[1] * (t.ndim - 2)).expand(-1, -1, *t.shape[2:])
        return t.gather(1, index)  # (B, K, ...)

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The target's loss (cross-entropy; MSE for `pixels`) over the corrupted patches only, and
        its detached metrics."""
        images = batch["image"]  # (B, 3, H, W) uint8
        logits, rec = model(images)  # (B, K, outputs)
        target = self.targets(images, rec.positions)  # (B, K, ...)
        return self.target.loss(logits, target, rec.kind, self._present_kinds(images))

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """The target's sums (colour top-1/top-5 hits and cross-entropy, or the pixels' squared
        error) over every corrupted patch, the corruption drawn from a fixed-seed generator (the
        training RNG is left alone)."""
        images = batch["image"]  # (B, 3, H, W) uint8
        generator = torch.Generator(images.device).manual_seed(0)
        logits, rec = model(images, generator)  # (B, K, outputs)
        return self.target.eval_sums(logits, self.targets(images, rec.positions))

    def eval_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        return self.target.eval_metrics(sums)

    def _present_kinds(self, images: Tensor) -> list[tuple[str, int]]:
        """(name, code) of the corruption kinds each image has at least one patch of. Decided from
        shapes and config, never from tensor values, so it costs no host sync."""
        n = (images.shape[-2] // self.patch) * (images.shape[-1] // self.patch)  # N patches per image
        k, k_mask, k_rand = corruption_counts(n, self.mpp.corrupt_ratio, self.mpp.mask_prob, self.mpp.random_prob)
        counts = {"mask": (MASK, k_mask), "random": (RANDOM, k_rand), "kept": (KEPT, k - k_mask - k_rand)}
        return [(name, code) for name, (code, count) in counts.items() if count > 0]

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """"mpp/predictions": (3, H', W') in [0, 1], for up to 4 images rows input / corrupted view / prediction
        (corrupted patches painted with the prediction, the rest dimmed) / target.

        Takes the unwrapped module (the engine passes it): only the main process draws, and a DDP
        forward on one rank alone could wait on collectives forever. Its own fixed-seed generator
        leaves the training RNG untouched (a run with images draws what one without would)."""
        images = batch["image"][:4]  # (b, 3, H, W) uint8
        generator = torch.Generator(images.device).manual_seed(0)
        with eval_mode(model):
            logits, rec = model(images, generator)  # (b, K, outputs)
        p, kind = self.patch, rec.kind[..., None]  # kind (b, K, 1)
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        x = patchify(images.float() / 255, p)  # (b, N, 3*p*p)
        index = rec.positions[..., None].expand(-1, -1, x.shape[-1])  # (b, K, 3*p*p)
        seen = torch.where(kind == MASK, 0.5, x.flatten(0, 1)[rec.source.clamp(min=0)])  # (b, K, 3*p*p)
        seen = torch.where(kind == KEPT, x.gather(1, index), seen)  # (b, K, 3*p*p)
        predicted = self.target.render(self.target.predictions(logits))  # (b, K, 3*p*p)
        truth = self.target.render(self.target.make(images))  # (b, N, 3*p*p)
        rows = [x, x.scatter(1, index, seen), (0.4 * x).scatter(1, index, predicted), truth]
        tiles = torch.cat([unpatchify(r, p, grid) for r in rows])  # (4*b, 3, H, W)
        return {"mpp/predictions": make_grid(tiles, nrow=images.shape[0], padding=2, pad_value=1.0).clamp(0, 1)}

