"""What a run reports: a progress bar, TensorBoard scalars and images, metrics.jsonl, summary.json.

Only the main process writes; on other ranks every method is a no-op, so the engine calls them
unconditionally. Values arrive as Python floats: the engine syncs once per logging step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vitcore.atomic import atomic_write_text


class Monitor:
    """`bar_keys`: the training scalars shown in the progress bar (the task chooses them); every
    scalar goes to TensorBoard and metrics.jsonl."""

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
        self.metrics_path = out_dir / "metrics.jsonl"
        self._truncate_after(start_step)
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
            self.writer.add_scalar(name, value, step)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(self.last) + "\n")
        self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in self.bar_keys if k in scalars}, refresh=False)

    def log_eval(self, step: int, samples: int, scalars: dict[str, float]) -> None:
        """An evaluation: TensorBoard under `val/`, a metrics.jsonl row with `val/` keys, one line."""
        self._log_section("val", step, samples, scalars, scalars.get("count", 0))

    def log_probe(self, step: int, samples: int, scalars: dict[str, float]) -> None:
        """The feature monitor's scores: TensorBoard under `probe/`, a metrics.jsonl row, one line."""
        self._log_section("probe", step, samples, scalars, scalars.get("images", 0))

    def _log_section(self, section: str, step: int, samples: int, scalars: dict[str, float], images: float) -> None:
        """Scalars under `<section>/` to TensorBoard and a metrics.jsonl row of their own; the
        accuracies (keys with top1/top5) as one printed line."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"{section}/{name}", value, step)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "samples": samples,
                                **{f"{section}/{k}": v for k, v in scalars.items()}}) + "\n")
        shown = ", ".join(f"{k} {v:.2%}" for k, v in scalars.items() if "top1" in k or "top5" in k)
        tqdm.write(f"step {step} {section}: {shown} ({int(images)} images)")

    def confusion(self, step: int, matrix: torch.Tensor, class_names: list[str] | None = None) -> None:
        """A (C, C) confusion matrix of counts (rows: true class) as a TensorBoard image."""
        if self.enabled:
            from vitcore.report.attention import confusion_image

            self.image(step, "val/confusion", confusion_image(matrix, class_names))

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """A (3, H, W) float image in [0, 1]."""
        if self.enabled:
            self.writer.add_image(tag, image.float().clamp(0, 1).cpu(), step)

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
                atomic_write_text(self.out_dir / "summary.json", json.dumps(result, indent=2))
        return result

    def _truncate_after(self, step: int) -> None:
        """Drop lines an earlier run logged after `step` (all of them on a fresh start), so each
        step appears once after a resume."""
        if not self.metrics_path.exists():
            return
        kept = [row for row in read_metrics(self.metrics_path) if row["step"] <= step]
        # A crash here leaves the old file or the new one.
        atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, passing over blank lines and the half-written last line a
    crash can leave."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
