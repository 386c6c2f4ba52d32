"""One optimizer step, as the engine takes it and as `benchmarks/gpu_check.py` times it."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from vitcore.data.plan import derive_seed
from vitcore.train.meter import TrainMeter
from vitcore.train.optim import lr_at, set_lr, skip_if_nonfinite
from vitcore.train.task import Batch, Task


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of `rank` for optimizer step `step` (0-based). Every step reseeds, so a run
    resumed at any step (a preemption's too) draws what an uninterrupted one would, without storing
    every rank's RNG state, and nothing between steps (evaluation, monitor, images) can shift it."""
    return derive_seed(seed, rank, step, "train")


class TrainStep:
    """`step(model, optimizer, batches, meter, i)`: optimizer step `i` (0-based) over `optim.accum_steps`
    micro-batches of the prepared `model`; returns its lr. `cfg` is the stage config (its optim and
    run sections)."""

    def __init__(self, cfg: Any, task: Task, accelerator: Accelerator) -> None:
        self.cfg, self.task, self.accelerator = cfg, task, accelerator

    def __call__(self, model: nn.Module, optimizer: Any, batches: Iterator[Batch], meter: TrainMeter,
                 step: int) -> float:
        cfg, accel = self.cfg, self.accelerator
        accum = cfg.optim.accum_steps
        set_lr(optimizer, lr := lr_at(step, cfg.optim, cfg.run.steps))
        torch.manual_seed(rank_seed(cfg.run.seed, accel.process_index, step))
        for micro in range(accum):
            t = time.perf_counter()
            batch = next(batches)
            meter.wait += time.perf_counter() - t
            # gradients are all-reduced only on the last micro-batch of the accumulation;
            # prepare() already runs the model's forward under the mixed-precision autocast
            with accel.no_sync(model) if micro < accum - 1 else nullcontext():
                loss, metrics = self.task.loss(model, batch)
                accel.backward(loss / accum)
            meter.add({"loss": loss.detach(), **metrics}, 1 / accum)
        grad_norm = accel.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm of sharded gradients, a plain tensor from here on
            grad_norm = grad_norm.full_tensor()
        found_inf = (~torch.isfinite(grad_norm)).float()  # identical on all ranks: grads are reduced
        if accel.scaler is None:  # fp16's GradScaler skips non-finite steps itself
            skip_if_nonfinite(optimizer.optimizer, found_inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.task.after_step(accel.unwrap_model(model), step)
        # fp16's scaler overflows and skips by design while it finds its scale: not a divergence
        meter.step_done(grad_norm, found_inf, counts_streak=accel.scaler is None)
        return lr
