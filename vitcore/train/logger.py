"""What a run reports as it goes: a progress bar, printed evaluations, scalars and images to its
sinks (metrics.jsonl always; TensorBoard and W&B as `run.log_with` says: `vitcore.train.sinks`)
and, at the end, summary.json (through `vitcore.rundir`).

Scalars are grouped by prefix: `train/` (loss, the task's metrics, lr, gradient norm), `sys/`
(throughput, data wait, FLOP/s, MFU, skipped samples), `val/` (evaluations) and `probe/` (the
feature monitor). metrics.jsonl keeps the training scalars under their bare names (`loss`,
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
from vitcore.train.sinks import open_sinks


class RunLogger:
    """`bar_keys`: the training scalars shown in the progress bar (the task chooses them); `sinks`:
    `run.log_with`; `config`: the resolved config, for the sinks that show it (W&B)."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 bar_keys: tuple[str, ...] = ("loss", "img_s"), sinks: tuple[str, ...] = ("tensorboard",),
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.bar_keys = bar_keys
        self.out_dir = out_dir
        self.start_time = time.perf_counter()
        self.last: dict[str, Any] = {}
        if not enabled:
            return
        self.sinks = open_sinks(list(sinks), out_dir, start_step, config or {})
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def log(self, step: int, samples: int, scalars: dict[str, float]) -> None:
        """One logging step: the sinks (x-axis = optimizer step), the bar."""
        self.last = {"step": step, "samples": samples, **scalars}
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.scalars(step, samples, "train", scalars)
        self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in self.bar_keys if k in scalars}, refresh=False)

    def log_section(self, section: str, step: int, samples: int, scalars: dict[str, float], count: float) -> None:
        """An evaluation (`val`) or the feature monitor's scores (`probe`): the sinks under
        `<section>/` (in metrics.jsonl a row of their own), and the accuracies (keys with top1/top5)
        or else every scalar as one printed line."""
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.scalars(step, samples, section, scalars)
        accuracies = {k: v for k, v in scalars.items() if "top1" in k or "top5" in k}
        shown = ", ".join([f"{k} {v:.2%}" for k, v in accuracies.items()] if accuracies else
                          [f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("count", "images", "seconds")])
        tqdm.write(f"step {step} {section}: {shown} ({int(count)} images)")

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """A (3, H, W) float image in [0, 1]."""
        if self.enabled:
            for sink in self.sinks:
                sink.image(step, tag, image.float().clamp(0, 1).cpu())

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
            for sink in self.sinks:
                sink.close()
            if summary is not None:
                rundir.write_summary(self.out_dir, result)
        return result
