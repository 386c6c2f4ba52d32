"""The one training engine. A stage is a `Task` (`vitcore.train.task`) plus a config whose schema
extends `vitcore.config.StageConfig`; the engine knows nothing else of it.

Around the loop: `RunState` (lock, start, restore, save), `Window` (metrics and throughput),
`RunLogger` (bar, TensorBoard, metrics.jsonl, summary.json), the evaluation loop and the feature
monitor. Host syncs happen on logging, evaluation, image and checkpoint steps only: metrics
accumulate as device tensors, and a non-finite step is skipped on the device by the fused optimizer.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch.distributed.tensor import DTensor

from vitcore import checkpoint, sharding
from vitcore.config import ConfigError, load_config, to_dict
from vitcore.data import ShardStream
from vitcore.data.pipeline import BrokenData
from vitcore.data.classes import check_same_classes
from vitcore.data.plan import derive_seed
from vitcore.eval.loop import coverage_problem, eval_mode, evaluate, to_device
from vitcore.eval.monitor import FeatureMonitor
from vitcore.train.logger import RunLogger
from vitcore.train.metrics import Window
from vitcore.train.optim import lr_at, set_lr, skip_if_nonfinite
from vitcore.train.ending import Ending
from vitcore.train.preemption import Preempted, StopSignals
from vitcore.train.runstate import Progress, RunState, TrainingError, last_intact
from vitcore.train.task import Batch, Task

# DDP, one process, or FSDP2 (Accelerate's fsdp_version 2; FSDP1 and DeepSpeed are refused): the
# checkpoints hold full weights and the optimizer state by parameter name (`vitcore.sharding`).
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.FSDP)


def main(schema: type, make_task: Callable[[Any], Task], argv: list[str] | None = None,
         description: str | None = None) -> dict[str, Any]:
    """Entry point of a stage: `run.py [--config PATH] [key=value ...]`; `description` heads --help.
    Returns the summary; every other ending is a `RunExit` with its status (`vitcore.train.ending`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe; without it the stage's embedded default runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    with Ending() as end:
        cfg = load_config(schema, args.config, args.overrides)
        trainer = end.closing(Trainer(cfg, make_task(cfg)))
        return trainer.fit()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of `rank` for optimizer step `step` (0-based). Every step reseeds, so a run
    resumed at any step (a preemption's too) draws what an uninterrupted one would, without storing
    every rank's RNG state, and nothing between steps (evaluation, monitor, images) can shift it."""
    return derive_seed(seed, rank, step, "train")


class Trainer:
    def __init__(self, cfg: Any, task: Task) -> None:
        _exit_with_launcher()
        self.cfg, self.task = cfg, task
        self.accelerator = accel = Accelerator(
            mixed_precision=cfg.run.mixed_precision, dynamo_backend="inductor" if cfg.run.compile else "no",
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.collective_timeout_s))],
        )
        kind = accel.distributed_type
        if kind not in SUPPORTED or (kind == DistributedType.FSDP and not accel.is_fsdp2):
            name = "FSDP1" if kind == DistributedType.FSDP else kind.value
            raise TrainingError(f"{name} is not supported: the engine and its checkpoints are written for DDP and "
                                "FSDP2; launch with multi_gpu, launch/fsdp.yaml (fsdp_version: 2) or a single process")
        self.sharded = sharding.is_sharded(accel)  # FSDP: every rank runs the forwards of images and evaluation
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher not in ("no", cfg.run.mixed_precision):  # "no" is also accelerate's silent default
            accel.print(f"warning: the launcher asked for {launcher} precision; run.mixed_precision="
                        f"{cfg.run.mixed_precision} decides (set run.mixed_precision={launcher} for it)")
        d, e, pin = cfg.data, cfg.eval, accel.device.type == "cuda"  # pinned batches: copies overlap compute
        where = dict(rank=accel.process_index, world_size=accel.num_processes, seed=cfg.run.seed, pin_memory=pin)
        # Bad shards stop the run here, before any work, with one line naming the key.
        with _data_errors("data.shards"):
            self.stream = ShardStream(d.shards, task.transform, d.batch_size, num_workers=d.num_workers,
                                      epoch_samples=d.epoch_samples, labeled=task.labeled,
                                      shuffle_buffer=d.shuffle_buffer, **where)
        self.eval_stream: ShardStream | None = None
        self.fixed_batch: Batch | None = None  # validation images drawn at every image step
        if e.shards is not None:
            with _data_errors("eval.shards"):
                self.eval_stream = ShardStream.exactly_once(e.shards, task.eval_transform, e.batch_size,
                                                            num_workers=e.num_workers, labeled=task.labeled, **where)
                if task.labeled:
                    check_same_classes(self.stream.classes, self.eval_stream.classes, d.shards, e.shards)
                if accel.is_main_process:
                    first = ShardStream.exactly_once(e.shards, task.eval_transform, 8, num_workers=0,
                                                     labeled=task.labeled)
                    self.fixed_batch = to_device(next(iter(first)), accel.device)
        self.monitor: FeatureMonitor | None = None
        if cfg.monitor.enabled:
            with _data_errors(None):
                self.monitor = FeatureMonitor(cfg.monitor, accel, task.eval_transform, cfg.run.seed, pin, self.sharded)
        self.best_metric, self.best_mode = best_metric(cfg.run, task, self.eval_stream is not None,
                                                       self.monitor is not None)
        self.state = RunState(cfg, task, accel, self.stream)
        self._stream_batches: Iterator[Batch] | None = None  # the training batches, across epochs
        self._logger: RunLogger | None = None

    def close(self) -> None:
        """Close the bar and TensorBoard, stop every stream's data workers, wait for the checkpoint
        being written (raising its error); `vitcore.train.ending` then ends the process group."""
        if self._logger is not None:
            self._logger.close(None)  # after a finished run's close(summary): closes nothing twice
        if self._stream_batches is not None:
            self._stream_batches.close()  # drops the training stream's running iteration
        for stream in (self.stream, self.eval_stream, *(self.monitor.streams if self.monitor else [])):
            if stream is not None:
                stream.close()
        self.state.saver.wait()

    def fit(self) -> dict[str, Any]:
        """Train to run.steps, holding the run directory from before the first read to the end.
        Raises Preempted after saving a checkpoint when SIGTERM or SIGUSR1 arrives."""
        lock = self.state.lock()
        try:
            start = self.state.agree_on_start()
            if start.finished is not None:
                run = self.cfg.run
                self.accelerator.print(f"run.out_dir: {run.out_dir} is complete at step {start.step} (run.steps="
                                       f"{run.steps}); its summary.json is kept. Raise run.steps to train on")
                return start.finished
            with StopSignals(self.accelerator) as signals:
                return self._fit(start.checkpoint, signals)
        except KeyboardInterrupt as interrupt:
            self.state.saver.wait()  # the checkpoint being written is complete before the line names the last
            raise KeyboardInterrupt(f"{interrupt or 'Ctrl-C'}. {last_intact(self.state.ckpt_dir)}") from None
        finally:
            self.state.release(lock)

    def _fit(self, resume_from: str | None, signals: StopSignals) -> dict[str, Any]:
        cfg, accel, task = self.cfg, self.accelerator, self.task
        total = cfg.run.steps
        model, optimizer, progress = self.state.restore(Path(resume_from) if resume_from else None)
        self.model = model  # kept for callers that inspect the trained model
        log = self._logger = RunLogger(Path(cfg.run.out_dir), total, progress.step, accel.is_main_process,
                                       task.bar_keys, tuple(cfg.run.log_with), to_dict(cfg))
        for line in task.log_lines:
            log.message(line)
        if progress.step:
            log.message(f"resumed from {resume_from} at step {progress.step}")
        probe_every = cfg.monitor.every if self.monitor is not None else 0
        probe: dict[str, float] = {}
        if probe_every and progress.step == 0:  # the reference line: the randomly initialised encoder
            probe = progress.probe_start = self._probe(log, model, progress)
        per_step = cfg.data.batch_size * cfg.optim.accum_steps
        flops = task.train_flops(accel.unwrap_model(model), (cfg.model.image_size,) * 2)
        window = Window(accel.device, progress.nonfinite_steps)
        batches = self._stream_batches = _device_batches(self.stream, accel.device)
        start_step, start_time = progress.step, time.perf_counter()
        evaluation: dict[str, Any] = {}
        model.train()
        while progress.step < total:
            lr, batch = self._train_step(model, optimizer, batches, window, progress.step)
            progress.step, progress.samples = progress.step + 1, progress.samples + per_step * accel.num_processes
            log.step()
            step, last = progress.step, progress.step == total
            if step % cfg.run.log_every == 0 or last:
                self._log(log, window, progress, lr, per_step, flops)
            if cfg.run.image_every and step % cfg.run.image_every == 0 and (accel.is_main_process or self.sharded):
                self._draw(log, model, self.fixed_batch or batch, step)
            scores: dict[str, float] = {}  # this step's metrics that can pick the best checkpoint
            if probe_every and (step % probe_every == 0 or last):
                probe = self._probe(log, model, progress)
                scores.update({f"probe/{k}": v for k, v in probe.items()})
            if self.eval_stream is not None and ((cfg.run.eval_every and step % cfg.run.eval_every == 0) or last):
                evaluation = self._evaluate(log, model, progress, predictions=last)
                scores.update({f"val/{k}": v for k, v in evaluation.items()})
            is_best = self._improves(scores, progress)
            stop = signals.agreed()  # every rank stops at the same step, whichever got the signal
            if step % cfg.run.ckpt_every == 0 or last or is_best or stop:
                progress.nonfinite_steps = int(window.nonfinite.item())
                self.state.save(model, optimizer, progress, best=is_best)
            if stop and not last:  # release() waits for the checkpoint's write
                log.close(None)
                raise Preempted(f"{signal.Signals(signals.received or signal.SIGTERM).name}: saved a checkpoint at "
                                f"step {step} of {total}; run the same command again to continue")

        self.state.saver.wait()  # the last checkpoint is on disk before the summary names it
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        throughput = (progress.step - start_step) * per_step * accel.num_processes / elapsed
        return log.close(self._summary(progress, window, probe, evaluation, throughput, flops))

    def _summary(self, progress: Progress, window: Window, probe: dict[str, float], evaluation: dict[str, Any],
                 throughput: float, flops: int) -> dict[str, Any]:
        summary = {**self.task.declared(), "steps": progress.step, "samples": progress.samples,
                   "img_s": round(throughput, 2), "processes": self.accelerator.num_processes,
                   "train_flops": flops * progress.samples,  # the run's training compute, machine-independent
                   "nonfinite_steps": int(window.nonfinite.item()), "skipped_samples": self.stream.skipped,
                   "checkpoint": str(checkpoint.find_latest(self.state.ckpt_dir))}
        if probe:
            summary.update(probe=probe, probe_start=progress.probe_start, probe_seconds=round(self.monitor.seconds, 2))
        if evaluation:
            prefixes = list(self.task.eval_models(self.accelerator.unwrap_model(self.model)))
            summary["eval"] = {k: evaluation[k] for k in (*self.task.metrics, "count", "skipped")}
            summary.update({f"eval_{p.rstrip('_')}": {k: evaluation[p + k] for k in self.task.metrics if k != "loss"}
                            for p in prefixes if p})
        if progress.best_value is not None:
            best = checkpoint.find_best(self.state.ckpt_dir)
            metric = self.best_metric or ""  # the value under the metric's own name: "top1" for val/top1
            summary["best"] = {"step": progress.best_step, "metric": metric,
                               metric.partition("/")[2]: progress.best_value, "checkpoint": str(best) if best else None}
        return summary

    def _improves(self, scores: dict[str, float], progress: Progress) -> bool:
        """Whether this step's best metric beats the best so far (then it is the best)."""
        value, best = scores.get(self.best_metric) if self.best_metric else None, progress.best_value
        if value is None:
            return False
        if best is not None and not (value > best if self.best_mode == "max" else value < best):
            return False
        progress.best_value, progress.best_step = value, progress.step
        return True

    def _train_step(self, model: nn.Module, optimizer: Any, batches: Iterator[Batch], window: Window,
                    step: int) -> tuple[float, Batch]:
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

    def _log(self, log: RunLogger, window: Window, progress: Progress, lr: float, per_step: int, flops: int) -> None:
        """One logging step: the window's means over all ranks, in one host sync."""
        cfg = self.cfg
        scalars, worst_streak = window.scalars(self.accelerator, per_step, flops, cfg.run.mixed_precision != "no")
        log.log(progress.step, progress.samples, {**scalars, "lr": lr, "skipped_samples": float(self.stream.skipped)})
        if worst_streak >= cfg.run.max_nonfinite:
            raise TrainingError(
                f"{worst_streak} non-finite losses in a row by step {progress.step} (run.max_nonfinite="
                f"{cfg.run.max_nonfinite}); try a lower optim.lr or mixed_precision=no. "
                f"{last_intact(self.state.ckpt_dir)}"
            )
        window.reset()

    def _evaluate(self, log: RunLogger, model: nn.Module, progress: Progress, predictions: bool = False
                  ) -> dict[str, Any]:
        """Evaluate every weight set the task names (trained, EMA): the task's metrics, prefixed. With
        `predictions` (the final evaluation), the trained weights' per-image rows are written too."""
        accel, task = self.accelerator, self.task
        assert self.eval_stream is not None
        scalars: dict[str, float] = {}
        first: dict[str, Any] = {}
        # the unwrapped module: a DDP forward on ranks with fewer batches would hang. Under FSDP2 it is
        # the sharded module itself: every rank evaluates, with as many forwards as the others
        with eval_mode(accel.unwrap_model(model), model) as unwrapped, _data_errors("eval.shards", BrokenData):
            for prefix, weights in task.eval_models(unwrapped).items():
                result = evaluate(accel, lambda batch, m=weights: task.eval_sums(m, batch), self.eval_stream,
                                  desc=f"eval {prefix.rstrip('_') or 'model'}", rows=predictions and not prefix)
                scalars.update({f"{prefix}{k}": v for k, v in task.eval_metrics(result["sums"]).items()})
                if not prefix:
                    first = result
                    log.predictions(result.get("rows"))
                    for tag, image in task.eval_images(result["sums"]).items():
                        log.image(progress.step, tag, image)
        if problem := coverage_problem(first):
            log.message(problem)
        log.log_section("val", progress.step, progress.samples, {**scalars, "count": float(first["count"])},
                        first["count"])
        return {**scalars, "count": first["count"], "skipped": first["skipped"]}

    def _probe(self, log: RunLogger, model: nn.Module, progress: Progress) -> dict[str, float]:
        """The feature monitor's scores of the encoder (every rank takes part); the maps to TensorBoard."""
        assert self.monitor is not None
        scores, maps, warnings = self.monitor(self.task.encoder(self.accelerator.unwrap_model(model)), model)
        for line in warnings:
            log.message(line)
        for tag, image in maps.items():  # the logger writes on the main process only
            log.image(progress.step, f"probe/{tag}", image)
        log.log_section("probe", progress.step, progress.samples, scores, scores["images"])
        return {k: v for k, v in scores.items() if k not in ("seconds", "images")}

    def _draw(self, log: RunLogger, model: nn.Module, batch: Batch, step: int) -> None:
        # DDP: the unwrapped module on the main process only, since a DDP forward on one rank alone
        # could wait on collectives forever. FSDP: every rank runs the forward (it all-gathers the
        # parameters), on its own batch where it has no fixed one; the main process logs.
        with sharding.standalone_forwards(model):
            images = self.task.visualize(self.accelerator.unwrap_model(model), batch)
        for tag, image in images.items():
            log.image(step, tag, image)


def best_metric(run: Any, task: Task, evaluates: bool, monitors: bool) -> tuple[str | None, str]:
    """The metric that picks checkpoints/best and its better direction: run.best_metric (run.best_mode,
    or the task's direction), else the task's own metric when the run evaluates. A metric the run
    cannot produce is a ConfigError, before any work."""
    metric = run.best_metric or (f"val/{task.best_metric}" if evaluates else None)
    if metric is None:
        return None, "max"
    section, _, name = metric.partition("/")
    if section == "val" and (not evaluates or name.removeprefix("ema_") not in task.metrics):
        raise ConfigError(f"run.best_metric: {metric} needs eval.shards and one of the task's metrics: "
                          + ", ".join(f"val/{m}" for m in task.metrics))
    if section == "probe" and not monitors:
        raise ConfigError(f"run.best_metric: {metric} needs the monitor (monitor.train_shards)")
    direction = task.metrics.get(name.removeprefix("ema_"), "max") if section == "val" else "max"
    return metric, run.best_mode or direction


def _device_batches(stream: ShardStream, device: torch.device) -> Iterator[Batch]:
    """Batches on the device, epoch after epoch; a stream that cannot go on (its shards gone) as one line."""
    with _data_errors("data.shards", only=BrokenData):
        while True:
            for batch in stream:
                yield to_device(batch, device)


@contextmanager
def _data_errors(key: str | None, only: type[ValueError] = ValueError) -> Iterator[None]:
    """A stream's FileNotFoundError / ValueError as one TrainingError line naming `key`. Around a
    stream's iteration, `only=BrokenData`: a ValueError of the model's code keeps its traceback."""
    try:
        yield
    except FileNotFoundError as error:
        hint = " (write shards with `python -m vitcore.data.shards`, or `make demo` for the default Imagenette ones)"
        raise TrainingError(f"{key + ': ' if key else ''}{error}{hint}") from None
    except only as error:
        raise TrainingError(f"{key + ': ' if key else ''}{error}") from None


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
