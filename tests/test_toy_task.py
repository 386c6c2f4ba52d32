"""The stage contract, proven by a third task that lives only here: a ViT regresses each image's
mean colour (3 numbers) from its [CLS] token. With no edit to vitcore it trains, evaluates with its
own metric (mean absolute error, lower is better), picks checkpoints/best by it, checkpoints,
resumes bit-exactly and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from vitcore import checkpoint
from vitcore.config import ModelConfig, RunConfig, StageConfig
from vitcore.data import read_index
from vitcore.data.transforms import eval_transform, train_transform
from vitcore.model.vit import ViT, ViTConfig
from vitcore.report.table import main as report
from vitcore.rundir import read_metrics
from vitcore.train.engine import main
from vitcore.train.task import Presentation, Task


@dataclass
class ToyConfig(StageConfig):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(variant="Pico/8", image_size=32))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/toy", steps=4, log_every=2, ckpt_every=2,
                                                             image_every=0))


class MeanColour(nn.Module):
    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.cfg.dim, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(images).pooled)  # (B, 3)


class MeanColourTask(Task):
    name = "toy"
    labeled = False
    metrics = {"mae": "min"}
    best_metric = "mae"
    presentation = Presentation(title="mean colour",
                                report_columns=(("loss", "loss", "{:.4f}"), ("val MAE", "eval.mae", "{:.4f}")))

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg
        self.transform = train_transform(cfg.model.image_size)
        self.eval_transform = eval_transform(cfg.model.image_size)

    def build_model(self) -> tuple[nn.Module, list[str]]:
        m = self.cfg.model
        return MeanColour(ViT(ViTConfig.from_variant(m.variant, image_size=m.image_size))), []

    def encoder(self, model: nn.Module) -> ViT:
        return model.vit

    @staticmethod
    def target(images: torch.Tensor) -> torch.Tensor:
        return images.float().mean((2, 3)) / 255  # (B, 3) in [0, 1]

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"]
        loss = F.mse_loss(model(images).float(), self.target(images))
        return loss, {}

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        error = (model(images).float() - self.target(images)).abs().mean(1)  # (B,)
        return {"abs_error": error.sum().double(), "images": torch.tensor(float(len(error)), dtype=torch.float64)}

    def eval_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"mae": float(sums["abs_error"] / sums["images"])}


def run(shards: Path, out: Path, *extra: str) -> dict:
    args = [f"data.shards={shards}", f"eval.shards={shards}", "data.batch_size=16", "data.num_workers=0",
            "data.shuffle_buffer=64", "eval.num_workers=0", "optim.warmup_steps=1", f"run.out_dir={out}", *extra]
    return main(ToyConfig, MeanColourTask, args)


def test_a_task_defined_outside_vitcore_trains_evaluates_checkpoints_resumes_and_reports(
        cifar_shards, tmp_path, capsys):
    straight = run(cifar_shards, tmp_path / "straight", "run.eval_every=2")
    assert straight["stage"] == "toy" and straight["steps"] == 4
    assert set(straight["eval"]) == {"mae", "count", "skipped"} and 0 < straight["eval"]["mae"] < 1
    evaluations = [row for row in read_metrics(tmp_path / "straight") if "val/mae" in row]
    assert [r["step"] for r in evaluations] == [2, 4]
    best = min(evaluations, key=lambda r: r["val/mae"])  # lower is better: the task said so
    assert straight["best"]["metric"] == "val/mae" and straight["best"]["step"] == best["step"]
    assert straight["best"]["mae"] == best["val/mae"]
    assert checkpoint.load_meta(straight["best"]["checkpoint"])["step"] == best["step"]

    # stopped at step 2, then resumed to 4: the same weights bit for bit
    run(cifar_shards, tmp_path / "resumed", "run.eval_every=2", "run.steps=2")
    resumed = run(cifar_shards, tmp_path / "resumed", "run.eval_every=2")
    a = load_file(str(Path(straight["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["checkpoint"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same weights evaluated in another process: equal to float32 rounding (kernels may differ with layout)
    assert resumed["eval"]["mae"] == pytest.approx(straight["eval"]["mae"], rel=1e-6)
    assert resumed["eval"]["count"] == straight["eval"]["count"] == read_index(cifar_shards)["total"]

    capsys.readouterr()
    report([f"toy={tmp_path / 'straight'}"])
    table = capsys.readouterr().out
    assert "val MAE" in table and f"{straight['eval']['mae']:.4f}" in table


def test_the_toy_tasks_best_metric_must_be_one_it_declares(cifar_shards, tmp_path):
    with pytest.raises(SystemExit, match="val/top1 needs eval.shards and one of the task's metrics: val/mae"):
        run(cifar_shards, tmp_path / "bad", "run.best_metric=val/top1")
