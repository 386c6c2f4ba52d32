"""The one training engine. A stage is a `Task` (`vitcore.train.task`) plus a config whose schema
extends `vitcore.config.StageConfig`; the engine knows nothing else of it.

Around the loop: `RunState` (lock, start, restore, save), `TrainStep` (one optimizer step),
`TrainMeter` (metrics and throughput), `RunLogger` (bar, sinks, summary.json), the evaluation loop
and the feature monitor; `Loop` is what the loop carries from step to step. Host syncs happen on
logging, evaluation, image and checkpoint steps only: metrics accumulate as device tensors, and a
non-finite step is skipped on the device by the fused optimizer.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from vitcore import checkpoint, sharding
from vitcore.config import ConfigError, load_config, to_dict
from vitcore.data import ShardStream
from vitcore.data.classes import check_same_classes
from vitcore.data.pipeline import BrokenData
from vitcore.data.stream import first_batch, naming
from vitcore.eval.loop import coverage_problem, eval_mode, evaluate, to_device
from vitcore.eval.monitor import FeatureMonitor
from vitcore.train.ending import Ending, exit_with_launcher
from vitcore.train.logger import RunLogger
from vitcore.train.meter import TrainMeter
from vitcore.train.preemption import Preempted, StopSignals
from vitcore.train.runstate import Progress, RunState, TrainingError, last_intact
from vitcore.train.step import TrainStep
from vitcore.train.task import TRAINED, Batch, Task, metric_key

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


@dataclass
class Loop:
    """What the training loop carries from step to step."""

    model: nn.Module  # prepared (DDP, FSDP2 or as built)
    optimizer: Any
    progress: Progress
    meter: TrainMeter
    log: RunLogger
    probe: dict[str, float] = field(default_factory=dict)  # the monitor's latest scores
    evaluation: dict[str, Any] = field(default_factory=dict)  # the latest evaluation


class Trainer:
    def __init__(self, cfg: Any, task: Task) -> None:
        exit_with_launcher()
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
        data, evaluation, pin = cfg.data, cfg.eval, accel.device.type == "cuda"  # pinned: copies overlap compute
        placement = dict(rank=accel.process_index, world_size=accel.num_processes, seed=cfg.run.seed, pin_memory=pin)
        # Bad shards stop the run here, before any work, with one line naming the key.
        with _data_errors("data.shards"):
            self.stream = ShardStream(data.shards, task.transform, data.batch_size, num_workers=data.num_workers,
                                      epoch_samples=data.epoch_samples, labeled=task.labeled,
                                      shuffle_buffer=data.shuffle_buffer, **placement)
        self.eval_stream: ShardStream | None = None
        if evaluation.shards is not None:
            with _data_errors("eval.shards"):
                self.eval_stream = ShardStream.exactly_once(evaluation.shards, task.eval_transform,
                                                            evaluation.batch_size, num_workers=evaluation.num_workers,
                                                            labeled=task.labeled, **placement)
                if task.labeled:
                    check_same_classes(self.stream.classes, self.eval_stream.classes, data.shards, evaluation.shards)
        # the images drawn every run.image_every steps: the first of the validation shards, else of the
        # training ones (by the main process; under FSDP every rank runs the forward)
        self.fixed_batch: Batch | None = None
        if cfg.run.image_every and (accel.is_main_process or self.sharded):
            key = "eval.shards" if evaluation.shards is not None else "data.shards"
            with _data_errors(key):
                batch = first_batch(evaluation.shards or data.shards, task.eval_transform, 8, task.labeled)
            self.fixed_batch = to_device(batch, accel.device)
        self.monitor: FeatureMonitor | None = None
        if cfg.monitor.enabled:
            with _data_errors(None):
                self.monitor = FeatureMonitor(cfg.monitor, accel, task.eval_transform, cfg.run.seed, pin, self.sharded)
        self.best_metric, self.best_mode = best_metric(cfg.run, task, self.eval_stream is not None,
                                                       self.monitor is not None)
        self.state = RunState(cfg, task, accel, self.stream)
        self.train_step = TrainStep(cfg, task, accel)
        self.loop: Loop | None = None  # from the first step on
        self._stream_batches: Iterator[Batch] | None = None  # the training batches, across epochs

    def close(self) -> None:
        """Close the bar and the sinks, stop every stream's data workers, wait for the checkpoint
        being written (raising its error); `vitcore.train.ending` then ends the process group."""
        if self.loop is not None:
            self.loop.log.close(None)  # after a finished run's close(summary): closes nothing twice
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
        cfg, accel = self.cfg, self.accelerator
        run, total = cfg.run, cfg.run.steps
        loop = self.loop = self._start(resume_from)
        progress, log = loop.progress, loop.log
        per_step = cfg.data.batch_size * cfg.optim.accum_steps  # one rank's samples per optimizer step
        flops = self.task.train_flops(accel.unwrap_model(loop.model), (cfg.model.image_size,) * 2)
        probe_every = cfg.monitor.every if self.monitor is not None else 0
        if probe_every and progress.step == 0:  # the reference line: the randomly initialised encoder
            progress.probe_start = self._probe(loop)
        batches = self._stream_batches = _device_batches(self.stream, accel.device)
        start_step, start_time = progress.step, time.perf_counter()
        loop.model.train()
        while progress.step < total:
            lr = self.train_step(loop.model, loop.optimizer, batches, loop.meter, progress.step)
            progress.step, progress.samples = progress.step + 1, progress.samples + per_step * accel.num_processes
            log.step()
            step, last = progress.step, progress.step == total
            if step % run.log_every == 0 or last:
                self._log(loop, lr, per_step, flops)
            if self.fixed_batch is not None and (step % run.image_every == 0 or last):
                self._draw(loop)
            scores: dict[str, float] = {}  # this step's metrics that can pick the best checkpoint
            if probe_every and (step % probe_every == 0 or last):
                scores.update({f"probe/{k}": v for k, v in self._probe(loop).items()})
            if self.eval_stream is not None and ((run.eval_every and step % run.eval_every == 0) or last):
                scores.update({f"val/{k}": v for k, v in self._evaluate(loop, predictions=last).items()})
            is_best = self._improves(scores, progress)
            stop = signals.agreed()  # every rank stops at the same step, whichever got the signal
            if step % run.ckpt_every == 0 or last or is_best or stop:
                progress.nonfinite_steps = int(loop.meter.nonfinite.item())
                self.state.save(loop.model, loop.optimizer, progress, best=is_best)
            if stop and not last:  # release() waits for the checkpoint's write
                log.close(None)
                raise Preempted(f"{signal.Signals(signals.received or signal.SIGTERM).name}: saved a checkpoint at "
                                f"step {step} of {total}; run the same command again to continue")

        self.state.saver.wait()  # the last checkpoint is on disk before the summary names it
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        throughput = (progress.step - start_step) * per_step * accel.num_processes / elapsed
        return log.close(self._summary(loop, throughput, flops))

    def _start(self, resume_from: str | None) -> Loop:
        """The loop's state at its first step: the model, optimizer and progress restored (or built),
        the logger open, what the task loaded said."""
        cfg, accel = self.cfg, self.accelerator
        model, optimizer, progress, lines = self.state.restore(Path(resume_from) if resume_from else None)
        log = RunLogger(Path(cfg.run.out_dir), cfg.run.steps, progress.step, accel.is_main_process,
                        self.task.presentation.bar_keys, tuple(cfg.run.log_with), to_dict(cfg))
        for line in lines:
            log.message(line)
        if progress.step:
            log.message(f"resumed from {resume_from} at step {progress.step}")
        return Loop(model, optimizer, progress, TrainMeter(accel.device, progress.nonfinite_steps), log)

    def _summary(self, loop: Loop, throughput: float, flops: int) -> dict[str, Any]:
        progress, meter, task = loop.progress, loop.meter, self.task
        summary = {**task.declared(), "steps": progress.step, "samples": progress.samples,
                   "img_s": round(throughput, 2), "processes": self.accelerator.num_processes,
                   "train_flops": flops * progress.samples,  # the run's training compute, machine-independent
                   "nonfinite_steps": int(meter.nonfinite.item()), "skipped_samples": self.stream.skipped,
                   "checkpoint": str(checkpoint.find_latest(self.state.ckpt_dir))}
        if loop.probe:
            summary.update(probe=loop.probe, probe_start=progress.probe_start,
                           probe_seconds=round(self.monitor.seconds, 2))
        if loop.evaluation:
            for name in task.evaluated:  # "eval" for the trained weights, "eval_ema" for an EMA's
                section = "eval" if name == TRAINED else f"eval_{name}"
                summary[section] = {k: loop.evaluation[metric_key(name, k)] for k in task.metrics}
            summary["eval"].update(count=loop.evaluation["count"], skipped=loop.evaluation["skipped"])
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

    def _log(self, loop: Loop, lr: float, per_step: int, flops: int) -> None:
        """One logging step: the meter's means over all ranks, in one host sync."""
        cfg, progress = self.cfg, loop.progress
        scalars, worst_streak = loop.meter.scalars(self.accelerator, per_step, flops, cfg.run.mixed_precision != "no")
        loop.log.log(progress.step, progress.samples,
                     {**scalars, "lr": lr, "skipped_samples": float(self.stream.skipped)})
        if worst_streak >= cfg.run.max_nonfinite:
            raise TrainingError(
                f"{worst_streak} non-finite losses in a row by step {progress.step} (run.max_nonfinite="
                f"{cfg.run.max_nonfinite}); try a lower optim.lr or mixed_precision=no. "
                f"{last_intact(self.state.ckpt_dir)}"
            )
        loop.meter.reset()

    def _evaluate(self, loop: Loop, predictions: bool = False) -> dict[str, Any]:
        """Evaluate every weight set the task names (trained, EMA): the task's metrics under
        `metric_key`. With `predictions` (the final evaluation), the trained weights' per-image rows
        are written too."""
        accel, task, log, progress = self.accelerator, self.task, loop.log, loop.progress
        assert self.eval_stream is not None
        scalars: dict[str, float] = {}
        first: dict[str, Any] = {}
        # the unwrapped module: a DDP forward on ranks with fewer batches would hang. Under FSDP2 it is
        # the sharded module itself: every rank evaluates, with as many forwards as the others
        with eval_mode(accel.unwrap_model(loop.model), loop.model) as unwrapped, \
                _data_errors("eval.shards", BrokenData):
            models = task.eval_models(unwrapped)
            assert tuple(models) == task.evaluated, (tuple(models), task.evaluated)
            for name, weights in models.items():
                trained = name == TRAINED
                result = evaluate(accel, lambda batch, m=weights: task.eval_sums(m, batch), self.eval_stream,
                                  desc=f"eval {name}", rows=predictions and trained)
                scalars.update({metric_key(name, k): v for k, v in task.eval_metrics(result["sums"]).items()})
                if trained:
                    first = result
                    log.predictions(result.get("rows"))
                    for tag, image in task.eval_images(result["sums"]).items():
                        log.image(progress.step, tag, image)
        if problem := coverage_problem(first):
            log.message(problem)
        log.log_section("val", progress.step, progress.samples, {**scalars, "count": float(first["count"])},
                        first["count"])
        loop.evaluation = {**scalars, "count": first["count"], "skipped": first["skipped"]}
        return scalars

    def _probe(self, loop: Loop) -> dict[str, float]:
        """The feature monitor's scores of the encoder (every rank takes part); the maps to the sinks."""
        assert self.monitor is not None
        accel, log, progress = self.accelerator, loop.log, loop.progress
        scores, maps, warnings = self.monitor(self.task.encoder(accel.unwrap_model(loop.model)), loop.model)
        for line in warnings:
            log.message(line)
        for tag, image in maps.items():  # the logger writes on the main process only
            log.image(progress.step, f"probe/{tag}", image)
        log.log_section("probe", progress.step, progress.samples, scores, scores["images"])
        loop.probe = {k: v for k, v in scores.items() if k not in ("seconds", "images")}
        return loop.probe

    def _draw(self, loop: Loop) -> None:
        # DDP: the unwrapped module on the main process only, since a DDP forward on one rank alone
        # could wait on collectives forever. FSDP: every rank runs the forward (it all-gathers the
        # parameters); the main process logs.
        assert self.fixed_batch is not None
        with sharding.standalone_forwards(loop.model):
            images = self.task.visualize(self.accelerator.unwrap_model(loop.model), self.fixed_batch)
        for tag, image in images.items():
            loop.log.image(loop.progress.step, tag, image)

def best_metric(run: Any, task: Task, evaluates: bool, monitors: bool) -> tuple[str | None, str]:
    """The metric that picks checkpoints/best and its better direction: run.best_metric (run.best_mode,
    or the task's direction), else the task's own metric when the run evaluates. A metric the run
    cannot produce is a ConfigError, before any work."""
    metric = run.best_metric or (f"val/{task.best_metric}" if evaluates else None)
    if metric is None:
        return None, "max"
    section, _, name = metric.partition("/")
    directions = {metric_key(model, m): better for model in task.evaluated for m, better in task.metrics.items()}
    if section == "val" and (not evaluates or name not in directions):
        raise ConfigError(f"run.best_metric: {metric} needs eval.shards and one of the task's metrics: "
                          + ", ".join(f"val/{m}" for m in directions))
    if section == "probe" and not monitors:
        raise ConfigError(f"run.best_metric: {metric} needs the monitor (monitor.train_shards)")
    return metric, run.best_mode or (directions[name] if section == "val" else "max")


def _device_batches(stream: ShardStream, device: torch.device) -> Iterator[Batch]:
    """Batches on the device, epoch after epoch; a stream that cannot go on (its shards gone) as one line."""
    with _data_errors("data.shards", only=BrokenData):
        while True:
            for batch in stream:
                yield to_device(batch, device)


@contextmanager
def _data_errors(key: str | None, only: type[ValueError] = ValueError) -> Iterator[None]:
    """A shard set's error (`vitcore.data.stream.naming`: led by `key`) as one TrainingError line.
    Around a stream's iteration, `only=BrokenData`: a ValueError of the model's code keeps its traceback."""
    try:
        with naming(key, only):
            yield
    except FileNotFoundError as error:
        hint = " (write shards with `python -m vitcore.data.shards`, or `make demo` for the default Imagenette ones)"
        raise TrainingError(f"{error}{hint}") from None
    except only as error:
        raise TrainingError(str(error)) from None

