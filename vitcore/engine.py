"""The one training engine. A stage is a task object plus a config; the engine knows neither MPP
nor classification, only this protocol:

    task.name                     "pretrain" | "finetune", recorded in checkpoints
    task.labeled                  whether samples must carry a class label
    task.transform                PIL image -> uint8 (3, H, W) tensor, run in data workers
    task.build_model()            the whole trainable nn.Module
    task.loss(model, batch)       (scalar loss, {name: detached 0-d tensor}); batch["image"] is uint8
    task.encoder(model)           the ViT inside an unwrapped model
    task.visualize(model, batch)  a (3, H, W) image in [0, 1] for TensorBoard

Host syncs happen on logging and checkpoint steps only: metrics accumulate as device tensors,
and a non-finite step is skipped on the device by the fused optimizer.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed

from vitcore import checkpoint
from vitcore.config import ConfigError, load_config, save_config, to_dict
from vitcore.data import ShardStream
from vitcore.data.stream import derive_seed
from vitcore.monitor import Monitor
from vitcore.optim import build_optimizer, lr_at, set_lr, skip_if_nonfinite
from vitcore.vit import ViT, flops_per_image

# Dense bf16/fp16 tensor-core peak FLOP/s by device name (the first name contained in the device's
# wins, so variants come before their family), for model FLOPs utilisation under mixed precision;
# fp32 runs and unknown devices log TFLOP/s only.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10G": 125e12}
# DDP, or one process: what the checkpoints and `optimizer.optimizer` calls are written for.
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


class Task(Protocol):
    name: str
    labeled: bool
    transform: Callable[[Any], torch.Tensor]

    def build_model(self) -> nn.Module: ...
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def encoder(self, model: nn.Module) -> ViT: ...
    def visualize(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor: ...


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


def main(schema: type, make_task: Callable[[Any], Task], argv: list[str] | None = None,
         description: str | None = None) -> dict[str, Any]:
    """Entry point of a stage: `run.py [--config PATH] [key=value ...]`; `description` heads --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe; without it the stage's embedded default runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    try:
        return Trainer(cfg, make_task(cfg)).fit()
    except (TrainingError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of `rank` from optimizer step `step` on: a resumed run draws what an
    uninterrupted one would, without storing every rank's RNG state."""
    return derive_seed(seed, rank, step, "train")


class Trainer:
    def __init__(self, cfg: Any, task: Task) -> None:
        self.cfg, self.task = cfg, task
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.accelerator = Accelerator(
            mixed_precision=cfg.run.mixed_precision, dynamo_backend="inductor" if cfg.run.compile else "no"
        )
        kind = self.accelerator.distributed_type
        if kind not in SUPPORTED:
            raise TrainingError(f"{kind.value} is not supported yet: the engine and its checkpoints are written "
                                "for DDP (one full model per process); launch with multi_gpu or a single process")
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher not in ("no", cfg.run.mixed_precision):  # "no" is also accelerate's silent default
            self.accelerator.print(f"warning: the launcher asked for {launcher} precision; run.mixed_precision="
                                   f"{cfg.run.mixed_precision} decides (set run.mixed_precision={launcher} for it)")
        d = cfg.data
        try:  # bad shards stop the run here, before any work, with one line
            self.stream = ShardStream(
                d.shards, task.transform, d.batch_size, rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes, num_workers=d.num_workers, seed=cfg.run.seed,
                epoch_samples=d.epoch_samples, labeled=task.labeled, shuffle_buffer=d.shuffle_buffer,
            )
        except FileNotFoundError as e:
            raise TrainingError(f"data.shards: {e} (write shards with `python -m vitcore.data.shards`, "
                                "or `make demo` for the default Imagenette ones)") from None
        except ValueError as e:
            raise TrainingError(f"data.shards: {e}") from None

    def fit(self) -> dict[str, Any]:
        cfg, acc, task = self.cfg, self.accelerator, self.task
        total, accum = cfg.run.steps, cfg.optim.accum_steps
        set_seed(cfg.run.seed)  # identical initialisation on every rank
        model = task.build_model()
        optimizer = build_optimizer(model, cfg.optim)
        resume_from = self._resume_point()
        self._check_not_behind(resume_from)
        step, samples = 0, 0
        if resume_from is not None:
            model.load_state_dict(checkpoint.load_weights(resume_from))
        model, optimizer = acc.prepare(model, optimizer)
        self.model = model  # kept for callers that inspect the trained model
        if resume_from is not None:
            state = checkpoint.load_train_state(resume_from)
            optimizer.optimizer.load_state_dict(state["optimizer"])
            ranks = state["data"]  # one stream position per rank: sample offsets and skip counts differ
            self.stream.load_state_dict(ranks[acc.process_index] if acc.process_index < len(ranks) else ranks[0])
            step, samples = state["step"], state["samples"]
            if acc.scaler is not None and "scaler" in state:  # fp16: resume with the loss scale reached
                acc.scaler.load_state_dict(state["scaler"])
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        monitor = Monitor(self.out_dir, total, step, enabled=acc.is_main_process)
        if resume_from is not None:
            monitor.message(f"resumed from {resume_from} at step {step}")
        torch.manual_seed(rank_seed(cfg.run.seed, acc.process_index, step))

        encoder = task.encoder(acc.unwrap_model(model))
        flops_per_sample = 3 * flops_per_image(encoder.cfg, (cfg.model.image_size,) * 2)  # fwd + bwd
        per_step = cfg.data.batch_size * accum * acc.num_processes
        batches = self._batches()
        zero = torch.zeros((), device=acc.device)
        sums: dict[str, torch.Tensor] = {}
        streak, max_streak, grad_norm_sum = zero.clone(), zero.clone(), zero.clone()
        nonfinite = zero + (state["nonfinite_steps"] if resume_from is not None else 0)
        window_start, wait, window_steps = time.perf_counter(), 0.0, 0
        start_step, start_time = step, time.perf_counter()

        model.train()
        while step < total:
            set_lr(optimizer, lr := lr_at(step, cfg.optim, total))
            for micro in range(accum):
                t = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t
                # gradients are all-reduced only on the last micro-batch of the accumulation;
                # prepare() already runs the model's forward under the mixed-precision autocast
                with acc.no_sync(model) if micro < accum - 1 else nullcontext():
                    loss, metrics = task.loss(model, batch)
                    acc.backward(loss / accum)
                for k, v in {"loss": loss.detach(), **metrics}.items():
                    sums[k] = sums.get(k, zero) + v.float() / accum
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            found_inf = (~torch.isfinite(grad_norm)).float()  # identical on all ranks: grads are reduced
            if acc.scaler is None:  # fp16's GradScaler skips non-finite steps itself
                skip_if_nonfinite(optimizer.optimizer, found_inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # fp16's scaler overflows and skips by design while it finds its scale: not a divergence
            streak = (streak + 1) * found_inf * (acc.scaler is None)
            max_streak, nonfinite = torch.maximum(max_streak, streak), nonfinite + found_inf
            grad_norm_sum += torch.nan_to_num(grad_norm.float(), nan=0.0, posinf=0.0)
            step, samples, window_steps = step + 1, samples + per_step, window_steps + 1
            monitor.step()

            if step % cfg.run.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                names = sorted(sums)
                means = acc.reduce(torch.stack([sums[k] for k in names]) / window_steps, "mean")
                extra = torch.stack([grad_norm_sum / window_steps, nonfinite, max_streak])
                *values, gnorm, n_nonfinite, worst_streak = torch.cat([means, extra]).tolist()  # the sync
                img_s = cfg.data.batch_size * accum * window_steps / elapsed
                scalars = dict(zip(names, values), lr=lr, grad_norm=gnorm, img_s=img_s * acc.num_processes,
                               img_s_per_rank=img_s, data_wait=wait / elapsed, nonfinite_steps=n_nonfinite,
                               skipped_samples=float(self.stream.skipped), tflops_per_rank=img_s * flops_per_sample / 1e12)
                peak = next((v for k, v in PEAK_FLOPS.items() if k in _device_name(acc.device)), None)
                if peak and cfg.run.mixed_precision != "no":
                    scalars["mfu"] = img_s * flops_per_sample / peak
                monitor.log(step, samples, scalars)
                if worst_streak >= cfg.run.max_nonfinite:
                    raise TrainingError(
                        f"{int(worst_streak)} non-finite losses in a row by step {step} (run.max_nonfinite="
                        f"{cfg.run.max_nonfinite}); try a lower optim.lr or mixed_precision=no. "
                        f"The last checkpoint is intact: {checkpoint.find_latest(self.ckpt_dir)}"
                    )
                sums, max_streak, grad_norm_sum = {}, zero.clone(), zero.clone()
                window_start, wait, window_steps = time.perf_counter(), 0.0, 0
            if cfg.run.image_every and step % cfg.run.image_every == 0 and acc.is_main_process:
                monitor.image(step, f"{task.name}/examples", task.visualize(acc.unwrap_model(model), batch))
            if step % cfg.run.ckpt_every == 0 or step == total:
                self._save(model, optimizer, step, samples, int(nonfinite.item()))
                torch.manual_seed(rank_seed(cfg.run.seed, acc.process_index, step))

        throughput = (step - start_step) * per_step / (time.perf_counter() - start_time)
        return monitor.close({"stage": task.name, "steps": step, "samples": samples,
                              "img_s": round(throughput, 2), "processes": acc.num_processes,
                              "nonfinite_steps": int(nonfinite.item()), "skipped_samples": self.stream.skipped,
                              "checkpoint": str(checkpoint.find_latest(self.ckpt_dir))})

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches on the device, epoch after epoch."""
        device = self.accelerator.device
        while True:
            for batch in self.stream:
                yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _resume_point(self) -> Path | None:
        resume = self.cfg.run.resume
        if resume == "never":
            return None
        if resume == "auto":
            return checkpoint.find_latest(self.ckpt_dir)
        return checkpoint.resolve(resume)

    def _check_not_behind(self, resume_from: Path | None) -> None:
        """Refuse to start behind the run directory's newest checkpoint: its later checkpoints,
        metrics and events would be overwritten or interleaved with the new ones."""
        newest = checkpoint.find_latest(self.ckpt_dir)
        if newest is None:
            return
        start = checkpoint.load_meta(resume_from)["step"] if resume_from is not None else 0
        if checkpoint.load_meta(newest)["step"] > start:
            where = f"step {start} of {resume_from}" if resume_from is not None else "scratch (run.resume=never)"
            raise TrainingError(
                f"run.out_dir: {self.out_dir} already holds checkpoints up to {newest.name}; starting from "
                f"{where} would overwrite them. Use a new run.out_dir (run.resume=<checkpoint> works there too)"
            )

    def _save(self, model: nn.Module, optimizer: Any, step: int, samples: int, nonfinite: int) -> None:
        acc = self.accelerator
        weights = acc.get_state_dict(model)  # a collective under sharding: every rank calls it
        data = gather_object([self.stream.state_dict()])  # every rank's position, in rank order
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            encoder = self.task.encoder(unwrapped)
            prefix = next(name for name, m in unwrapped.named_modules() if m is encoder)
            c = encoder.cfg
            meta = {
                "format": 1, "stage": self.task.name, "created": datetime.now(timezone.utc).isoformat(),
                "arch": {"variant": self.cfg.model.variant, "dim": c.dim, "depth": c.depth, "heads": c.heads,
                         "mlp_ratio": c.mlp_ratio, "patch_size": c.patch_size,
                         "image_size": list(c.image_size), "grid": list(c.grid)},
                "encoder_prefix": f"{prefix}." if prefix else "", "samples": samples,
                "config": to_dict(self.cfg),
            }
            state = {"optimizer": optimizer.optimizer.state_dict(), "step": step, "samples": samples,
                     "data": data, "nonfinite_steps": nonfinite}
            if acc.scaler is not None:
                state["scaler"] = acc.scaler.state_dict()
            checkpoint.save_checkpoint(self.ckpt_dir, step, weights, state, meta, self.cfg.run.keep_last)
        acc.wait_for_everyone()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
