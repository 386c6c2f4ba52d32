"""The contract between a stage and the engine. A stage is a `Task` plus a config whose schema
extends `vitcore.config.StageConfig`; the engine knows nothing else of it.

A task says how to train (`build_model`, `loss`), how it is evaluated (`eval_sums` per batch,
additive, all-reduced once by `vitcore.eval.loop`; `eval_metrics` from the reduced sums; which
metric picks `checkpoints/best` and in which direction), and what a person sees (progress-bar
keys, report columns, figure panels, TensorBoard images).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from vitcore.model.vit import ViT, flops_per_image

Batch = dict[str, Any]


class Task:
    """A subclass sets `name` (recorded in checkpoints and summary.json), `labeled` (samples must
    carry a class label), `transform` and `eval_transform` (PIL image -> uint8 (3, H, W), run in
    data workers) and implements the methods that raise."""

    name: str
    labeled: bool
    transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]
    # Evaluation: the metrics `eval_metrics` returns, each with the direction that is better
    metrics: dict[str, str] = {"loss": "min"}
    best_metric: str = "loss"  # of `metrics`: picks checkpoints/best unless run.best_metric says otherwise
    bar_keys: tuple[str, ...] = ("loss", "img_s")  # training scalars shown in the progress bar
    # (column, summary key, format) for `python -m vitcore.report`: keys of the final training
    # metrics, "eval.<metric>" for the final evaluation, "probe.<score>" for the feature monitor's
    report_columns: tuple[tuple[str, str, str], ...] = (("loss", "loss", "{:.3f}"),)
    # For `python -m vitcore.report.plots`: the word for this task's runs in figure titles, and its
    # training panels as (title, metrics.jsonl keys drawn in it)
    title: str = "training"
    curves: tuple[tuple[str, tuple[str, ...]], ...] = (("train loss", ("loss",)),)
    log_lines: Sequence[str] = ()  # printed when training starts (build_model may set them: what it loaded)

    def build_model(self) -> nn.Module:
        """The whole trainable module."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, {name: detached 0-d tensor}); batch["image"] is uint8 (B, 3, H, W)."""
        raise NotImplementedError

    def encoder(self, model: nn.Module) -> ViT:
        """The ViT inside an unwrapped model."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Evaluation of one batch by an unwrapped model in eval() mode, as additive sums (tensors of
        any fixed shape: the loop adds them over batches and ranks), without touching the global RNG.
        Per-image values (B, ...) under names starting `vitcore.eval.metrics.ROWS` are not added: the
        final evaluation writes them to the run's predictions (`vitcore.rundir.PREDICTIONS`)."""
        raise NotImplementedError(f"the {self.name} task has no evaluation: set eval.shards=null")

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of `metrics` from the sums over the whole evaluation set."""
        raise NotImplementedError

    def eval_images(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{TensorBoard tag: (3, H, W) image in [0, 1]} drawn from an evaluation's sums (a confusion matrix)."""
        return {}

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The weights to evaluate, by metric prefix: "" for the trained ones (an EMA adds "ema_")."""
        return {"": model}

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
        unwrapped model from fixed validation images (or the last training batch)."""
        return {}

    def declared(self) -> dict[str, Any]:
        """What summary.json records of the task for the report and the plots."""
        return {"stage": self.name, "columns": self.report_columns, "title": self.title, "curves": self.curves,
                "metrics": self.metrics}
