"""Where a run's scalars and images go: metrics.jsonl always, TensorBoard and Weights & Biases by choice.

    accelerate launch pretrain/run.py run.log_with=[tensorboard,wandb]   # default: [tensorboard]

A sink takes what `RunLogger` hands it, on the main process only: `scalars(step, samples, section,
values)` (section `train` for training rows, `val` for evaluations, `probe` for the monitor),
`image(step, tag, image)` and `close()`. TensorBoard and W&B name a scalar `<group>/<name>`
(`train/loss`, `sys/img_s`, `val/top1`, `probe/knn_top1`); metrics.jsonl keeps training scalars
under their bare names and the others under `val/...`, `probe/...` (`vitcore.rundir`).

Why not Accelerate's trackers: its TensorBoard tracker writes into a subfolder and cannot drop
the events a resumed run replaces (`purge_step`), and metrics.jsonl is this project's run format
that the reports read, not a tracker; the rank-0 rule is `RunLogger`'s already.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from vitcore import PROJECT, rundir

# Training scalars that describe the machine rather than the model: the `sys/` group
SYSTEM_SCALARS = frozenset({"img_s", "img_s_per_rank", "data_wait", "tflops_per_rank", "mfu", "skipped_samples"})


class Sink(Protocol):
    def scalars(self, step: int, samples: int, section: str, values: dict[str, float]) -> None: ...

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """A (3, H, W) float image in [0, 1]."""

    def close(self) -> None: ...


def tag(section: str, name: str) -> str:
    """A scalar's name in TensorBoard and W&B."""
    return f"{'sys' if section == 'train' and name in SYSTEM_SCALARS else section}/{name}"


class JsonlSink:
    """metrics.jsonl: one row per logging step, evaluation and probe (see `vitcore.rundir`)."""

    def __init__(self, out_dir: Path, start_step: int) -> None:
        self.out_dir = out_dir
        rundir.truncate_metrics(out_dir, start_step)  # a resumed run replaces what came after its checkpoint

    def scalars(self, step: int, samples: int, section: str, values: dict[str, float]) -> None:
        named = values if section == "train" else {f"{section}/{k}": v for k, v in values.items()}
        rundir.append_metrics(self.out_dir, {"step": step, "samples": samples, **named})

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        pass  # scalars only

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Event files in the run directory itself (`tensorboard --logdir runs/` shows every run)."""

    def __init__(self, out_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, main process only

        # purge_step: TensorBoard hides events an earlier run in this dir logged after the step we
        # resume from (that step itself was logged before its checkpoint, and is not logged again).
        self.writer = SummaryWriter(str(out_dir), purge_step=start_step + 1)

    def scalars(self, step: int, samples: int, section: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(tag(section, name), value, step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        self.writer.add_image(tag, image, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (`pip install -e '.[wandb]'`) under the run directory's `wandb/`, named
    after the run directory, with the resolved config. Its id is derived from the run directory, so a
    resumed run continues the same W&B run. `WANDB_PROJECT` (default: the distribution's name,
    `vitcore.PROJECT`), `WANDB_ENTITY` and
    `WANDB_MODE=offline` (no network: `wandb sync` later) are W&B's own settings."""

    def __init__(self, out_dir: Path, start_step: int, config: dict[str, Any]) -> None:
        import wandb

        run_id = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out_dir.name, id=run_id,
                              resume="allow", dir=str(out_dir), config=config)

    def scalars(self, step: int, samples: int, section: str, values: dict[str, float]) -> None:
        self.run.log({tag(section, k): v for k, v in values.items()} | {"samples": samples}, step=step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        import wandb

        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)
        self.run.log({tag: wandb.Image(pixels)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(names: list[str], out_dir: Path, start_step: int, config: dict[str, Any]) -> list[Sink]:
    """metrics.jsonl's sink, then those `run.log_with` names, in its order."""
    sinks: list[Sink] = [JsonlSink(out_dir, start_step)]
    for name in names:
        sinks.append(TensorBoardSink(out_dir, start_step) if name == "tensorboard" else
                     WandbSink(out_dir, start_step, config))
    return sinks
