"""The one training engine. A stage is a task object plus a config; the engine knows neither MPP
nor classification, only the `Task` interface below.

Host syncs happen on logging, evaluation, image and checkpoint steps only: metrics accumulate as
device tensors, and a non-finite step is skipped on the device by the fused optimizer.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from torch.distributed.tensor import DTensor

from vitcore import checkpoint, sharding
from vitcore.report.attention import attention_maps
from vitcore.config import ConfigError, load_config, save_config, to_dict
from vitcore.data import ShardStream
from vitcore.data.sources import check_same_classes
from vitcore.data.stream import derive_seed
from vitcore.eval.loop import coverage_problem, evaluate, to_device
from vitcore.train.logger import Monitor
from vitcore.train.optim import build_optimizer, lr_at, set_lr, skip_if_nonfinite
from vitcore.train.preemption import PREEMPTED_EXIT, Preempted, StopSignals
from vitcore.eval.probes import extract_features, probe_scores
from vitcore.model.vit import ViT, flops_per_image

# Dense bf16/fp16 tensor-core peak FLOP/s by device name (the first name contained in the device's
# wins, so variants come before their family), for model FLOPs utilisation under mixed precision;
# fp32 runs and unknown devices log TFLOP/s only.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10G": 125e12}
# DDP, one process, or FSDP2 (Accelerate's fsdp_version 2; FSDP1 and DeepSpeed are refused): the
# checkpoints hold full weights and the optimizer state by parameter name (`vitcore.sharding`).
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.FSDP)
# train_state.pt's "optimizer_format": "by_name", `sharding.optimizer_state`'s layout, loadable by any
# launch; without the key (older checkpoints), `optimizer.state_dict()`'s, keyed by parameter index
OPTIMIZER_BY_NAME = "by_name"


class Task:
    """What a stage is to the engine. A subclass sets `name` ("pretrain" | "finetune", recorded in
    checkpoints), `labeled` (samples must carry a class label), `transform` and `eval_transform`
    (PIL image -> uint8 (3, H, W), run in data workers) and implements the methods that raise."""

    name: str
    labeled: bool
    transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]
    bar_keys: tuple[str, ...] = ("loss", "img_s")  # training scalars shown in the progress bar
    # (column, summary key, format) for `python -m vitcore.report`; keys of summary["final"] or
    # "eval.<key>" for the final evaluation
    report_columns: tuple[tuple[str, str, str], ...] = (("loss", "loss", "{:.3f}"),)
    class_names: list[str] | None = None  # set: evaluation also draws a confusion matrix
    log_lines: Sequence[str] = ()  # printed when training starts (build_model may set them: what it loaded)

    def build_model(self) -> nn.Module:
        """The whole trainable module."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, {name: detached 0-d tensor}); batch["image"] is uint8 (B, 3, H, W)."""
        raise NotImplementedError

    def encoder(self, model: nn.Module) -> ViT:
        """The ViT inside an unwrapped model."""
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: (logits (M, C), targets (M,)) of an unwrapped model in eval() mode, without
        touching the global RNG."""
        raise NotImplementedError

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

    def visualize(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        """A (3, H, W) image in [0, 1] for TensorBoard every run.image_every steps, or None."""
        return None


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass
class Start:
    """Where a run starts, as rank 0 decided it (sent to every rank)."""

    checkpoint: str | None  # the checkpoint directory to resume from; None: from scratch
    step: int
    finished: dict[str, Any] | None  # the summary of a run already complete at that step


def main(schema: type, make_task: Callable[[Any], Task], argv: list[str] | None = None,
         description: str | None = None) -> dict[str, Any]:
    """Entry point of a stage: `run.py [--config PATH] [key=value ...]`; `description` heads --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe; without it the stage's embedded default runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        task = make_task(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    try:
        return Trainer(cfg, task).fit()
    except ConfigError as e:  # found while building the model (init_from's architecture), before any step
        raise SystemExit(f"config error: {e}") from None
    except (TrainingError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTED_EXIT) from None


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of `rank` for optimizer step `step` (0-based). Every step reseeds, so a run
    resumed at any step (a preemption's too) draws what an uninterrupted one would, without storing
    every rank's RNG state, and nothing between steps (evaluation, monitor, images) can shift it."""
    return derive_seed(seed, rank, step, "train")


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's training state."""

    step: int = 0
    samples: int = 0
    nonfinite_steps: int = 0
    best_value: float | None = None  # of run.best_metric, at the step that reached it; None: none yet
    best_step: int = 0
    probe_start: dict[str, float] = field(default_factory=dict)  # the monitor's scores at step 0


class Window:
    """Training metrics of one logging window, accumulated on the device (no host sync)."""

    def __init__(self, device: torch.device, nonfinite: int = 0) -> None:
        self.zero = torch.zeros((), device=device)
        self.nonfinite = self.zero + nonfinite  # run total, never reset
        self.streak = self.zero.clone()  # non-finite steps in a row, carried across windows
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.max_streak, self.grad_norm = self.zero.clone(), self.zero.clone()
        self.start, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def add(self, metrics: dict[str, torch.Tensor], weight: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, self.zero) + v.float() * weight

    def step_done(self, grad_norm: torch.Tensor, found_inf: torch.Tensor, counts_streak: bool) -> None:
        self.streak = (self.streak + 1) * found_inf * counts_streak
        self.max_streak = torch.maximum(self.max_streak, self.streak)
        self.nonfinite = self.nonfinite + found_inf
        self.grad_norm += torch.nan_to_num(grad_norm.float(), nan=0.0, posinf=0.0)
        self.steps += 1


class Trainer:
    def __init__(self, cfg: Any, task: Task) -> None:
        _exit_with_launcher()
        self.cfg, self.task = cfg, task
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.accelerator = Accelerator(
            mixed_precision=cfg.run.mixed_precision, dynamo_backend="inductor" if cfg.run.compile else "no",
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.collective_timeout_s))],
        )
        self.saver = checkpoint.BackgroundSaver()
        self._pin = self.accelerator.device.type == "cuda"  # pinned host batches: copies overlap compute
        kind = self.accelerator.distributed_type
        if kind not in SUPPORTED or (kind == DistributedType.FSDP and not self.accelerator.is_fsdp2):
            name = "FSDP1" if kind == DistributedType.FSDP else kind.value
            raise TrainingError(f"{name} is not supported: the engine and its checkpoints are written for DDP and "
                                "FSDP2; launch with multi_gpu, launch/fsdp.yaml (fsdp_version: 2) or a single process")
        self.sharded = sharding.is_sharded(self.accelerator)
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher not in ("no", cfg.run.mixed_precision):  # "no" is also accelerate's silent default
            self.accelerator.print(f"warning: the launcher asked for {launcher} precision; run.mixed_precision="
                                   f"{cfg.run.mixed_precision} decides (set run.mixed_precision={launcher} for it)")
        d, e = cfg.data, cfg.eval
        # Bad shards stop the run here, before any work, with one line naming the key.
        with _data_errors("data.shards"):
            self.stream = ShardStream(
                d.shards, task.transform, d.batch_size, rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes, num_workers=d.num_workers, seed=cfg.run.seed,
                epoch_samples=d.epoch_samples, labeled=task.labeled, shuffle_buffer=d.shuffle_buffer,
                pin_memory=self._pin,
            )
        self.eval_stream: ShardStream | None = None
        self.fixed_batch: dict[str, Any] | None = None  # validation images drawn at every evaluation
        if e.shards is not None:
            with _data_errors("eval.shards"):
                self.eval_stream = self._exactly_once(e.shards, e.batch_size, e.num_workers, task.labeled)
                if task.labeled:
                    check_same_classes(self.stream.classes, self.eval_stream.classes, d.shards, e.shards)
                if self.accelerator.is_main_process:
                    self.fixed_batch = self._to_device(self._first_batch(e.shards, 8, task.labeled))
        self.probe_streams: tuple[ShardStream, ShardStream] | None = None  # monitor: (train subset, val)
        self.probe_images: torch.Tensor | None = None  # validation images for the attention maps
        self._probe_seconds = 0.0  # time spent monitoring, reported in summary.json
        monitor = getattr(cfg, "monitor", None)
        if monitor is not None and monitor.enabled:
            self._build_probe_streams(monitor)
        self.best_metric = cfg.run.best_metric or ("val/top1" if self.eval_stream is not None else None)
        section = (cfg.run.best_metric or "").partition("/")[0]
        if (section == "val" and self.eval_stream is None) or (section == "probe" and self.probe_streams is None):
            raise ConfigError(f"run.best_metric: {cfg.run.best_metric} needs "
                              f"{'eval.shards' if section == 'val' else 'the monitor (monitor.train_shards)'}")

    def _build_probe_streams(self, m: Any) -> None:
        """Exactly-once labelled streams for the monitor's probes; bad shards stop here, before any work."""
        streams = []
        for key in ("train_shards", "val_shards"):
            with _data_errors(f"monitor.{key}"):
                streams.append(self._exactly_once(getattr(m, key), m.batch_size, m.num_workers, labeled=True))
        with _data_errors("monitor.val_shards"):
            check_same_classes(streams[0].classes, streams[1].classes, f"monitor.train_shards: {m.train_shards}",
                               f"monitor.val_shards: {m.val_shards}")
        self.probe_streams = (streams[0], streams[1])
        if m.images and (self.accelerator.is_main_process or self.sharded):  # FSDP: every rank runs the forward
            self.probe_images = self._first_batch(m.val_shards, m.images, labeled=True)["image"].to(self.accelerator.device)

    def _exactly_once(self, shards: str, batch_size: int, num_workers: int, labeled: bool) -> ShardStream:
        """A stream for evaluation: each sample once over all ranks, in index order, no sample dropped."""
        return ShardStream.exactly_once(shards, self.task.eval_transform, batch_size,
                                        rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
                                        num_workers=num_workers, seed=self.cfg.run.seed, labeled=labeled,
                                        pin_memory=self._pin)

    def _first_batch(self, shards: str, size: int, labeled: bool) -> dict[str, Any]:
        """The first `size` samples of `shards` in index order: the fixed images drawn at every evaluation."""
        first = ShardStream.exactly_once(shards, self.task.eval_transform, size, num_workers=0, labeled=labeled)
        return next(iter(first))

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to run.steps, holding the run directory from before the first read to the end.
        Raises Preempted after saving a checkpoint when SIGTERM or SIGUSR1 arrives."""
        lock = self._lock_run_dir()
        try:
            start = self._agree_on_start()
            if start.finished is not None:
                self.accelerator.print(f"run.out_dir: {self.out_dir} is complete at step {start.step} (run.steps="
                                       f"{self.cfg.run.steps}); its summary.json is kept. Raise run.steps to train on")
                return start.finished
            with StopSignals(self.accelerator) as signals:
                return self._fit(start.checkpoint, signals)
        finally:
            self.saver.wait()  # a checkpoint being written in the background is complete before we return
            if lock is not None:
                checkpoint.unlock_run_dir(lock)

    def _lock_run_dir(self) -> Any:
        """One run per directory: rank 0 takes the lock, and every rank stops if it is taken."""
        lock, problem = None, [None]
        if self.accelerator.is_main_process:
            try:
                lock = checkpoint.lock_run_dir(self.out_dir)
            except checkpoint.RunDirInUse as e:
                problem = [str(e)]
        broadcast_object_list(problem)
        if problem[0]:
            raise TrainingError(problem[0])
        return lock

    def _agree_on_start(self) -> Start:
        """Where the run starts, decided by rank 0 alone and broadcast: with node-local disks or a
        stale NFS cache, ranks reading `latest` themselves could resume from different steps and
        hang or silently diverge. Every rank then checks that it sees that very checkpoint; if any
        does not, all stop with one line."""
        accel, decided = self.accelerator, [None]
        if accel.is_main_process:
            try:
                decided = [self._decide_start()]
            except TrainingError as e:
                decided = [str(e)]
        broadcast_object_list(decided)
        if isinstance(decided[0], str):
            raise TrainingError(decided[0])
        start: Start = decided[0]
        problem = None
        if start.checkpoint is not None:
            try:
                seen = checkpoint.load_meta(start.checkpoint)["step"]
            except (OSError, ValueError) as e:
                seen = f"unreadable ({e})"
            if seen != start.step:
                problem = (f"rank {accel.process_index} sees step {seen} at {start.checkpoint}, rank 0 step "
                           f"{start.step}: every node must see run.out_dir on one shared filesystem")
        problems = [p for p in gather_object([problem]) if p]
        if problems:
            raise TrainingError(f"cannot resume: {problems[0]}")
        return start

    def _decide_start(self) -> Start:
        """Rank 0: the checkpoint to resume from (run.resume), and the summary if the run is complete."""
        resume_from = self._resume_point()
        self._check_not_behind(resume_from)
        step = checkpoint.load_meta(resume_from)["step"] if resume_from is not None else 0
        path = self.out_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        finished = summary if step >= self.cfg.run.steps and summary.get("steps") == step else None
        return Start(str(resume_from) if resume_from is not None else None, step, finished)

    def _fit(self, resume_from: str | None, signals: StopSignals) -> dict[str, Any]:
        cfg, accel, task = self.cfg, self.accelerator, self.task
        total = cfg.run.steps
        model, optimizer, progress = self._restore(Path(resume_from) if resume_from else None)
        self.model = model  # kept for callers that inspect the trained model
        monitor = Monitor(self.out_dir, total, progress.step, enabled=accel.is_main_process, bar_keys=task.bar_keys)
        for line in task.log_lines:
            monitor.message(line)
        if progress.step:
            monitor.message(f"resumed from {resume_from} at step {progress.step}")
        probe_every = cfg.monitor.every if self.probe_streams is not None else 0
        probe: dict[str, float] = {}
        if probe_every and progress.step == 0:  # the reference line: the randomly initialised encoder
            probe = progress.probe_start = self._probe(monitor, model, progress)
        per_step = cfg.data.batch_size * cfg.optim.accum_steps * accel.num_processes
        flops = task.train_flops(accel.unwrap_model(model), (cfg.model.image_size,) * 2)
        window = Window(accel.device, progress.nonfinite_steps)
        batches = self._batches()
        start_step, start_time = progress.step, time.perf_counter()
        evaluation: dict[str, Any] = {}

        model.train()
        while progress.step < total:
            lr, batch = self._train_step(model, optimizer, batches, window, progress.step)
            progress.step, progress.samples = progress.step + 1, progress.samples + per_step
            monitor.step()
            step, last = progress.step, progress.step == total
            if step % cfg.run.log_every == 0 or last:
                self._log(monitor, window, progress, lr, flops)
            if cfg.run.image_every and step % cfg.run.image_every == 0 and (accel.is_main_process or self.sharded):
                self._draw(monitor, model, self.fixed_batch or batch, step)
            scores: dict[str, float] = {}  # this step's metrics that can pick the best checkpoint
            if probe_every and (step % probe_every == 0 or last):
                probe = self._probe(monitor, model, progress)
                scores.update({f"probe/{k}": v for k, v in probe.items()})
            if self.eval_stream is not None and ((cfg.run.eval_every and step % cfg.run.eval_every == 0) or last):
                evaluation = self._evaluate(monitor, model, progress)
                scores.update({f"val/{k}": v for k, v in evaluation.items() if isinstance(v, float)})
            is_best = self._improves(scores, progress)
            stop = signals.agreed()  # every rank stops at the same step, whichever got the signal
            if step % cfg.run.ckpt_every == 0 or last or is_best or stop:
                progress.nonfinite_steps = int(window.nonfinite.item())
                self._save(model, optimizer, progress, best=is_best)
            if stop and not last:
                self.saver.wait()
                monitor.close(None)
                raise Preempted(f"{signal.Signals(signals.received or signal.SIGTERM).name}: saved a checkpoint at "
                                f"step {step} of {total}; run the same command again to continue")

        self.saver.wait()  # the last checkpoint is on disk before the summary names it
        throughput = (progress.step - start_step) * per_step / max(time.perf_counter() - start_time, 1e-9)
        summary = {"stage": task.name, "steps": progress.step, "samples": progress.samples,
                   "img_s": round(throughput, 2), "processes": accel.num_processes,
                   "train_flops": flops * progress.samples,  # the run's training compute, machine-independent
                   "nonfinite_steps": int(window.nonfinite.item()), "skipped_samples": self.stream.skipped,
                   "checkpoint": str(checkpoint.find_latest(self.ckpt_dir)), "columns": task.report_columns}
        if probe:
            summary["probe"] = probe
            summary["probe_start"] = progress.probe_start
            summary["probe_seconds"] = round(self._probe_seconds, 2)
        if evaluation:
            summary["eval"] = {k: evaluation[k] for k in ("top1", "top5", "count", "loss", "skipped")}
            summary.update({f"eval_{p.rstrip('_')}": {"top1": evaluation[f"{p}top1"], "top5": evaluation[f"{p}top5"]}
                            for p in self._eval_prefixes() if p})
        if progress.best_value is not None:
            best = checkpoint.find_best(self.ckpt_dir)
            metric = self.best_metric or ""  # the value under the metric's own name: "top1" for val/top1
            summary["best"] = {"step": progress.best_step, "metric": metric,
                               metric.partition("/")[2]: progress.best_value, "checkpoint": str(best) if best else None}
        return monitor.close(summary)

    def _improves(self, scores: dict[str, float], progress: Progress) -> bool:
        """Whether this step's `run.best_metric` beats the best so far (then it is the best)."""
        metric, best = self.best_metric, progress.best_value
        value = scores.get(metric) if metric else None
        if value is None:
            return False
        if best is not None and not (value > best if self.cfg.run.best_mode == "max" else value < best):
            return False
        progress.best_value, progress.best_step = value, progress.step
        return True

    def _train_step(self, model: nn.Module, optimizer: Any, batches: Iterator[dict[str, Any]], window: Window,
                    step: int) -> tuple[float, dict[str, Any]]:
        """One optimizer step over `optim.accum_steps` micro-batches; returns its lr and last batch."""
        cfg, accel = self.cfg, self.accelerator
        accum = cfg.optim.accum_steps
        set_lr(optimizer, lr := lr_at(step, cfg.optim, cfg.run.steps))
        torch.manual_seed(rank_seed(cfg.run.seed, accel.process_index, step))
        for micro in range(accum):
            t = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - t
            # gradients are all-reduced only on the last micro-batch of the accumulation;
            # prepare() already runs the model's forward under the mixed-precision autocast
            with accel.no_sync(model) if micro < accum - 1 else nullcontext():
                loss, metrics = self.task.loss(model, batch)
                accel.backward(loss / accum)
            window.add({"loss": loss.detach(), **metrics}, 1 / accum)
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
        window.step_done(grad_norm, found_inf, counts_streak=accel.scaler is None)
        return lr, batch

    def _log(self, monitor: Monitor, window: Window, progress: Progress, lr: float, flops: int) -> None:
        """One logging step: the window's means over all ranks, in one host sync."""
        cfg, accel = self.cfg, self.accelerator
        elapsed = time.perf_counter() - window.start
        names = sorted(window.sums)
        means = accel.reduce(torch.stack([window.sums[k] for k in names]) / window.steps, "mean")
        extra = torch.stack([window.grad_norm / window.steps, window.nonfinite, window.max_streak])
        *values, gnorm, n_nonfinite, worst_streak = torch.cat([means, extra]).tolist()  # the sync
        img_s = cfg.data.batch_size * cfg.optim.accum_steps * window.steps / elapsed
        scalars = dict(zip(names, values), lr=lr, grad_norm=gnorm, img_s=img_s * accel.num_processes,
                       img_s_per_rank=img_s, data_wait=window.wait / elapsed, nonfinite_steps=n_nonfinite,
                       skipped_samples=float(self.stream.skipped), tflops_per_rank=img_s * flops / 1e12)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in _device_name(accel.device)), None)
        if peak and cfg.run.mixed_precision != "no":
            scalars["mfu"] = img_s * flops / peak
        monitor.log(progress.step, progress.samples, scalars)
        if worst_streak >= cfg.run.max_nonfinite:
            raise TrainingError(
                f"{int(worst_streak)} non-finite losses in a row by step {progress.step} (run.max_nonfinite="
                f"{cfg.run.max_nonfinite}); try a lower optim.lr or mixed_precision=no. "
                f"The last checkpoint is intact: {checkpoint.find_latest(self.ckpt_dir)}"
            )
        window.reset()

    def _eval_prefixes(self) -> list[str]:
        return list(self.task.eval_models(self.accelerator.unwrap_model(self.model)))

    def _evaluate(self, monitor: Monitor, model: nn.Module, progress: Progress) -> dict[str, Any]:
        """Evaluate every weight set the task names (trained, EMA) on the validation shards."""
        accel, task = self.accelerator, self.task
        assert self.eval_stream is not None
        # the unwrapped module: a DDP forward on ranks with fewer batches would hang. Under FSDP2 it is
        # the sharded module itself: every rank evaluates, with as many forwards as the others
        unwrapped = accel.unwrap_model(model)
        unwrapped.eval()
        scalars: dict[str, float] = {}
        first: dict[str, Any] = {}
        with sharding.standalone_forwards(model):
            for prefix, weights in task.eval_models(unwrapped).items():
                result = evaluate(accel, lambda batch, m=weights: task.predict(m, batch), self.eval_stream,
                                  len(task.class_names) if task.class_names else None,
                                  desc=f"eval {prefix.rstrip('_') or 'model'}")
                first = first or result
                scalars.update({f"{prefix}{k}": result[k] for k in ("top1", "top5", "loss")})
                if "confusion" in result and not prefix:
                    monitor.confusion(progress.step, result["confusion"])
        unwrapped.train()
        problem = coverage_problem(first)
        if problem:
            monitor.message(problem)
        monitor.log_eval(progress.step, progress.samples, {**scalars, "count": float(first["count"])})
        return {**first, **scalars}

    def _probe(self, monitor: Monitor, model: nn.Module, progress: Progress) -> dict[str, float]:
        """The monitor: kNN and linear-probe top-1 of the encoder's features, and its attention maps.
        Every rank extracts its share of the features; all ranks score the gathered ones identically."""
        accel, m = self.accelerator, self.cfg.monitor
        assert self.probe_streams is not None
        start = time.perf_counter()
        vit = self.task.encoder(accel.unwrap_model(model))
        was_training = vit.training
        vit.eval()
        with sharding.standalone_forwards(model):  # under FSDP every rank runs both extractions and the maps
            train, val = (extract_features(accel, vit, stream, desc=f"monitor {name}")
                          for name, stream in zip(("train", "val"), self.probe_streams))
            maps = attention_maps(vit, self.probe_images) if self.probe_images is not None else {}
        for name, features in (("train", train), ("val", val)):
            if problem := features.coverage_problem(name):
                monitor.message(problem)
        classes = self.probe_streams[0].classes
        assert classes is not None  # labeled streams
        scores = probe_scores(train, val, len(classes), m.knn_k, m.knn_temperature, m.probe_steps)
        for tag, image in maps.items():  # the monitor writes on the main process only
            monitor.image(progress.step, f"probe/{tag}", image)
        vit.train(was_training)
        seconds = time.perf_counter() - start
        self._probe_seconds += seconds
        monitor.log_probe(progress.step, progress.samples, {**scores, "seconds": seconds,
                                                            "images": float(len(val.keys))})
        return scores

    def _draw(self, monitor: Monitor, model: nn.Module, batch: dict[str, Any], step: int) -> None:
        # DDP: the unwrapped module on the main process only, since a DDP forward on one rank alone
        # could wait on collectives forever. FSDP: every rank runs the forward (it all-gathers the
        # parameters), on its own batch where it has no fixed one; the main process logs.
        with sharding.standalone_forwards(model):
            image = self.task.visualize(self.accelerator.unwrap_model(model), batch)
        if image is not None and self.accelerator.is_main_process:
            monitor.image(step, f"{self.task.name}/examples", image)

    # -- state: restore and save ------------------------------------------------------------------

    def _restore(self, resume_from: Path | None) -> tuple[nn.Module, Any, Progress]:
        """Build model and optimizer; load the checkpoint to resume from (rank 0's choice), if any."""
        cfg, accel = self.cfg, self.accelerator
        set_seed(cfg.run.seed)  # identical initialisation on every rank
        model = self.task.build_model()
        optimizer = build_optimizer(model, cfg.optim)
        progress = Progress()
        if resume_from is not None:
            model.load_state_dict(checkpoint.load_weights(resume_from))
        model, optimizer = accel.prepare(model, optimizer)
        if resume_from is not None:
            # mapped, not read, on the other ranks: they take rank 0's optimizer state through the
            # process group, and read only the small entries (data positions, progress)
            state = checkpoint.load_train_state(resume_from, mmap=not accel.is_main_process)
            if state.get("optimizer_format") == OPTIMIZER_BY_NAME:
                sharding.load_optimizer_state(model, optimizer, state["optimizer"] if accel.is_main_process else None)
            elif self.sharded:
                raise TrainingError(f"{resume_from}: its optimizer state is keyed by parameter index (saved before "
                                    "FSDP support); resume it under DDP or in one process, and its next checkpoint "
                                    "will load under FSDP")
            else:
                optimizer.optimizer.load_state_dict(state["optimizer"])
            ranks = state["data"]  # one stream position per rank: sample offsets and skip counts differ
            self.stream.load_state_dict(ranks[accel.process_index] if accel.process_index < len(ranks) else ranks[0])
            progress = Progress(**{k: state[k] for k in Progress.__dataclass_fields__ if k in state})
            if accel.scaler is not None and "scaler" in state:  # fp16: resume with the loss scale reached
                accel.scaler.load_state_dict(state["scaler"])
        if accel.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        return model, optimizer, progress

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Batches on the device, epoch after epoch."""
        while True:
            for batch in self.stream:
                yield self._to_device(batch)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return to_device(batch, self.accelerator.device)

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

    def _save(self, model: nn.Module, optimizer: Any, progress: Progress, best: bool) -> None:
        accel = self.accelerator
        # Collectives, in this order on every rank: rank 0 receives the full weights and optimizer state
        # (keyed by parameter name) as host snapshots that training no longer changes; the others None.
        weights = sharding.full_model_state(model, accel)
        optimizer_state = sharding.optimizer_state(model, optimizer)
        problem: list[str | None] = [None]
        if weights is not None:
            try:
                checkpoint.check_finite(weights)
            except checkpoint.NonFiniteWeights as e:
                problem = [str(e)]
        broadcast_object_list(problem)  # rank 0 alone holds the weights: all ranks stop together
        if problem[0]:
            raise TrainingError(f"step {progress.step}: the weights were not saved: {problem[0]}. The last "
                                f"checkpoint is intact: {checkpoint.find_latest(self.ckpt_dir)}")
        data = gather_object([self.stream.state_dict()])  # every rank's position, in rank order
        self.saver.wait()  # the previous write is complete (and its errors raised) before the next
        if accel.is_main_process:
            unwrapped = accel.unwrap_model(model)
            encoder = self.task.encoder(unwrapped)
            prefix = next(name for name, m in unwrapped.named_modules() if m is encoder)
            c = encoder.cfg
            meta = {
                "format": 1, "stage": self.task.name, "created": datetime.now(timezone.utc).isoformat(),
                "arch": {"variant": self.cfg.model.variant, "dim": c.dim, "depth": c.depth, "heads": c.heads,
                         "mlp_ratio": c.mlp_ratio, "patch_size": c.patch_size,
                         "image_size": list(c.image_size), "grid": list(c.grid)},
                "encoder_prefix": f"{prefix}." if prefix else "", "samples": progress.samples,
                **self.task.meta(), "config": to_dict(self.cfg),
            }
            state = {"data": data, **{k: getattr(progress, k) for k in Progress.__dataclass_fields__}}
            if accel.scaler is not None:
                state["scaler"] = accel.scaler.state_dict()
            # Copied to host memory now (training goes on changing the live tensors; weights and optimizer
            # state are snapshots already); written to disk in the background, so that no rank waits on a
            # slow filesystem for longer than the copy.
            state = {**checkpoint.host_copy(state), "optimizer": optimizer_state,
                     "optimizer_format": OPTIMIZER_BY_NAME}
            self.saver.submit(self.ckpt_dir, progress.step, weights, state, meta, self.cfg.run.keep_last, best=best)


class _data_errors:
    """Turn a stream's FileNotFoundError / ValueError into one TrainingError line naming `key`."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if isinstance(error, FileNotFoundError):
            hint = (" (write shards with `python -m vitcore.data.shards`, or `make demo` for the default Imagenette "
                    "ones)")
            raise TrainingError(f"{self.key}: {error}{hint}") from None
        if isinstance(error, ValueError):
            raise TrainingError(f"{self.key}: {error}") from None
        return False


def _exit_with_launcher() -> None:
    """Under torch's elastic agent (`accelerate launch` with several processes) each worker has a
    session of its own, so killing the launcher's process group misses it: ask the kernel for SIGTERM
    when the parent, the launcher, dies (prctl rather than a thread polling getppid: nothing runs,
    and the signal is immediate). A run started by hand is left alone, so nohup keeps working."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the request: no signal would come
        raise SystemExit("error: the launcher exited before training started")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
