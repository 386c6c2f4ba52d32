"""The contract between a stage and the engine. A stage is a `Task` plus a config whose schema
extends `vitcore.config.StageConfig`; the engine knows nothing else of it.

A new objective writes the abstract methods: the model (`build_model`), its loss, where its
encoder is, and its evaluation (`eval_sums` per batch, additive, all-reduced once by
`vitcore.eval.loop`; `eval_metrics` from the reduced sums). Everything else has a default: the
metrics' better directions, EMA-like extra weights to evaluate, the step hook, FLOPs, checkpoint
metadata, images, and what a person sees of its runs (`Presentation`). A constructor reads no
files: what a task needs from its data it reads when first asked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from vitcore.model.vit import ViT, flops_per_image

Batch = dict[str, Any]
TRAINED = "model"  # `eval_models`' name for the trained weights: their metrics carry no prefix


def metric_key(model: str, metric: str) -> str:
    """How an evaluated model's metric is named in metrics.jsonl, summary.json and run.best_metric
    (after "val/"): "top1" for the trained weights, "ema_top1" for weights `eval_models` names "ema"."""
    return metric if model == TRAINED else f"{model}_{metric}"


@dataclass(frozen=True)
class Presentation:
    """What a person sees of a task's runs; nothing here changes training."""

    title: str = "training"  # the word for this task's runs in figure titles
    bar_keys: tuple[str, ...] = ("loss", "img_s")  # training scalars shown in the progress bar
    # (column, summary key, format) for `python -m vitcore.report`: keys of the final training
    # metrics, "eval.<metric>" for the final evaluation, "probe.<score>" for the feature monitor's
    report_columns: tuple[tuple[str, str, str], ...] = (("loss", "loss", "{:.3f}"),)
    # For `python -m vitcore.report.plots`: training panels as (title, metrics.jsonl keys drawn in it)
    curves: tuple[tuple[str, tuple[str, ...]], ...] = (("train loss", ("loss",)),)


class Task(ABC):
    """A subclass sets `name` (recorded in checkpoints and summary.json), `labeled` (samples must
    carry a class label), `transform` and `eval_transform` (PIL image -> uint8 (3, H, W), run in
    data workers), and writes the abstract methods."""

    name: str
    labeled: bool
    transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]
    # Evaluation: the metrics `eval_metrics` returns, each with the direction that is better
    metrics: dict[str, str] = {"loss": "min"}
    best_metric: str = "loss"  # of `metrics`: picks checkpoints/best unless run.best_metric says otherwise
    evaluated: tuple[str, ...] = (TRAINED,)  # the names `eval_models` returns, the trained weights first
    presentation: Presentation = Presentation()

    @abstractmethod
    def build_model(self) -> tuple[nn.Module, list[str]]:
        """(the whole trainable module, lines to print when training starts: what it was loaded from)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, {name: detached 0-d tensor}); batch["image"] is uint8 (B, 3, H, W)."""

    @abstractmethod
    def encoder(self, model: nn.Module) -> ViT:
        """The ViT inside an unwrapped model."""

    @abstractmethod
    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Evaluation of one batch by an unwrapped model in eval() mode, as additive sums (tensors of
        any fixed shape: the loop adds them over batches and ranks), without touching the global RNG.
        Per-image values (B, ...) under names starting `vitcore.eval.metrics.ROWS` are not added: the
        final evaluation writes them to the run's predictions (`vitcore.rundir.PREDICTIONS`)."""

    @abstractmethod
    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of `metrics` from the sums over the whole evaluation set."""

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The weights to evaluate by name, as `evaluated` lists them (an EMA adds "ema")."""
        return {TRAINED: model}

    def eval_images(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{TensorBoard tag: (3, H, W) image in [0, 1]} drawn from an evaluation's sums (a confusion matrix)."""
        return {}

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after optimizer step `step` (0-based) with the unwrapped model (an EMA update, say)."""

    def train_flops(self, model: nn.Module, image_size: tuple[int, int]) -> int:
        """Training FLOPs per sample: forward + backward (2x forward) through the encoder."""
        return 3 * flops_per_image(self.encoder(model).cfg, image_size)

    def meta(self) -> dict[str, Any]:
        """Task-specific checkpoint metadata (classes, pooling, where it was initialised from)."""
        return {}

    def visualize(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """{TensorBoard tag: (3, H, W) image in [0, 1]} every run.image_every steps, drawn by the
        unwrapped model from fixed images (the first of the validation shards, else of the training ones)."""
        return {}

    def declared(self) -> dict[str, Any]:
        """What summary.json records of the task for the report and the plots."""
        shown = asdict(self.presentation)
        return {"stage": self.name, "columns": shown["report_columns"], "title": shown["title"],
                "curves": shown["curves"], "metrics": self.metrics, "evaluated": list(self.evaluated)}
