"""What a run reports as it goes: a progress bar, TensorBoard scalars and images, metrics.jsonl
and, at the end, summary.json (both through `vitcore.rundir`).

TensorBoard groups scalars by prefix: `train/` (loss, the task's metrics, lr, gradient norm),
`sys/` (throughput, data wait, FLOP/s, MFU, skipped samples), `val/` (evaluations) and `probe/`
(the feature monitor). metrics.jsonl keeps the training scalars under their bare names (`loss`,
`img_s`, ...) and evaluation and probe scalars under `val/...` and `probe/...`.

Only the main process writes; on other ranks every method is a no-op, so the engine calls them
unconditionally. Values arrive as Python floats: the engine syncs once per logging step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vitcore import rundir

# Training scalars that describe the machine rather than the model: TensorBoard's `sys/` group
SYSTEM_SCALARS = frozenset({"img_s", "img_s_per_rank", "data_wait", "tflops_per_rank", "mfu", "skipped_samples"})


class RunLogger:
    """`bar_keys`: the training scalars shown in the progress bar (the task chooses them)."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 bar_keys: tuple[str, ...] = ("loss", "img_s")) -> None:
        self.enabled = enabled
        self.bar_keys = bar_keys
        self.out_dir = out_dir
        self.start_time = time.perf_counter()
        self.last: dict[str, Any] = {}
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, main process only

        # purge_step: TensorBoard hides events an earlier run in this dir logged after the step we
        # resume from (that step itself was logged before its checkpoint, and is not logged again).
        self.writer = SummaryWriter(str(out_dir), purge_step=start_step + 1)
        rundir.truncate_metrics(out_dir, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def log(self, step: int, samples: int, scalars: dict[str, float]) -> None:
        """One logging step: TensorBoard (x-axis = optimizer step), metrics.jsonl, the bar."""
        self.last = {"step": step, "samples": samples, **scalars}
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"{'sys' if name in SYSTEM_SCALARS else 'train'}/{name}", value, step)
        rundir.append_metrics(self.out_dir, self.last)
        self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in self.bar_keys if k in scalars}, refresh=False)

    def log_section(self, section: str, step: int, samples: int, scalars: dict[str, float], count: float) -> None:
        """An evaluation (`val`) or the feature monitor's scores (`probe`): TensorBoard under
        `<section>/`, a metrics.jsonl row of their own, and the accuracies (keys with top1/top5) or
        else every scalar as one printed line."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"{section}/{name}", value, step)
        rundir.append_metrics(self.out_dir, {"step": step, "samples": samples,
                                             **{f"{section}/{k}": v for k, v in scalars.items()}})
        accuracies = {k: v for k, v in scalars.items() if "top1" in k or "top5" in k}
        shown = ", ".join([f"{k} {v:.2%}" for k, v in accuracies.items()] if accuracies else
                          [f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("count", "images", "seconds")])
        tqdm.write(f"step {step} {section}: {shown} ({int(count)} images)")

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """A (3, H, W) float image in [0, 1]."""
        if self.enabled:
            self.writer.add_image(tag, image.float().clamp(0, 1).cpu(), step)

    def predictions(self, rows: list[dict[str, Any]] | None) -> None:
        """The final evaluation's per-image predictions (`vitcore.rundir.PREDICTIONS`), if it made any."""
        if self.enabled and rows:
            rundir.write_predictions(self.out_dir, rows)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self, summary: dict[str, Any] | None) -> dict[str, Any]:
        """Write summary.json (final metrics, wall time, throughput) and close the writers; with
        None (a run stopped early) only close them: summary.json is for finished runs."""
        result = {**(summary or {}), "final": self.last, "wall_time_s": round(time.perf_counter() - self.start_time, 2)}
        if self.enabled:
            self.bar.close()
            self.writer.close()
            if summary is not None:
                rundir.write_summary(self.out_dir, result)
        return result
