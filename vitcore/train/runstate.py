"""A run's state on disk, across ranks: one run per directory (the lock), where a run starts
(decided by rank 0, checked by every rank), restoring model, optimizer, data position and progress
from a checkpoint, and saving them (the way timm keeps `CheckpointSaver` apart from its training
loop). `vitcore.checkpoint` holds the on-disk format; the engine calls `RunState`.

Faults on disk end the run with one TrainingError line on every rank: a run directory it cannot
write (before any step), a checkpoint write that fails (a full disk), a checkpoint to resume from
that is damaged with none intact before it. A damaged newest checkpoint under run.resume=auto is
set aside, and the run resumes from the newest intact one.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors import SafetensorError

from vitcore import checkpoint, rundir, sharding
from vitcore.config import save_config, to_dict
from vitcore.data import ShardStream
from vitcore.train.optim import build_optimizer
from vitcore.train.task import Task

# train_state.pt's "optimizer_format": `sharding.optimizer_state`'s layout, keyed by parameter name and
# loadable by any launch (one process, DDP, FSDP2)
OPTIMIZER_BY_NAME = "by_name"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


def last_intact(ckpt_dir: Path) -> str:
    """The end of a line saying why the run stopped: where it can go on from."""
    latest = checkpoint.find_latest(ckpt_dir)
    return f"The last checkpoint is intact: {latest}" if latest is not None else "No checkpoint was written yet"


class Saver(checkpoint.BackgroundSaver):
    """The background checkpoint writer, whose failed write (a full disk) every `wait()` raises as
    one TrainingError line, whoever waits (the save step, the run's end, its teardown)."""

    def __init__(self, ckpt_dir: Path) -> None:
        super().__init__()
        self.ckpt_dir = ckpt_dir

    def wait(self) -> None:
        try:
            super().wait()
        except checkpoint.CheckpointNotWritten as e:
            raise TrainingError(f"{e}. {last_intact(self.ckpt_dir)}") from None


@dataclass
class Start:
    """Where a run starts, as rank 0 decided it (sent to every rank)."""

    checkpoint: str | None  # the checkpoint directory to resume from; None: from scratch
    step: int
    finished: dict[str, Any] | None  # the summary of a run already complete at that step


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's training state."""

    step: int = 0
    samples: int = 0
    nonfinite_steps: int = 0
    best_value: float | None = None  # of run.best_metric, at the step that reached it; None: none yet
    best_step: int = 0
    probe_start: dict[str, float] = field(default_factory=dict)  # the monitor's scores at step 0


class RunState:
    """`cfg` is a `vitcore.config.StageConfig`; `stream` the training stream whose position is saved."""

    def __init__(self, cfg: Any, task: Task, accelerator: Accelerator, stream: ShardStream) -> None:
        self.cfg, self.task, self.accelerator, self.stream = cfg, task, accelerator, stream
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.sharded = sharding.is_sharded(accelerator)
        self.saver = Saver(self.ckpt_dir)

    # -- where the run starts -------------------------------------------------------------------

    def lock(self) -> Any:
        """One run per directory: rank 0 takes the lock, and every rank stops if it is taken."""
        lock, problem = None, [None]
        if self.accelerator.is_main_process:
            try:
                lock = checkpoint.lock_run_dir(self.out_dir)
            except (checkpoint.RunDirInUse, checkpoint.RunDirNotWritable) as e:
                problem = [str(e)]
        broadcast_object_list(problem)
        if problem[0]:
            raise TrainingError(problem[0])
        return lock

    def release(self, lock: Any) -> None:
        """Wait for a checkpoint being written in the background, then give the directory up."""
        self.saver.wait()
        if lock is not None:
            checkpoint.unlock_run_dir(lock)

    def agree_on_start(self) -> Start:
        """Where the run starts, decided by rank 0 alone and broadcast: with node-local disks or a
        stale NFS cache, ranks reading `latest` themselves could resume from different steps and
        hang or silently diverge. Every rank then checks that it sees that very checkpoint; if any
        does not, all stop with one line."""
        accel, decided = self.accelerator, [None]
        if accel.is_main_process:
            try:
                decided = [self._decide_start()]
            except (TrainingError, OSError, ValueError) as e:  # as one line on every rank: none waits on rank 0
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
        try:
            summary = rundir.read_summary(self.out_dir)
        except FileNotFoundError:
            summary = {}
        finished = summary if step >= self.cfg.run.steps and summary.get("steps") == step else None
        return Start(str(resume_from) if resume_from is not None else None, step, finished)

    def _resume_point(self) -> Path | None:
        resume = self.cfg.run.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self._newest_intact()
        chosen = checkpoint.resolve(resume)
        try:
            checkpoint.check_intact(chosen)
        except checkpoint.DamagedCheckpoint as e:
            raise TrainingError(f"run.resume: {e}") from None
        return chosen

    def _newest_intact(self) -> Path | None:
        """run.resume=auto: the newest intact checkpoint. Newer, damaged ones (a file cut short or
        missing) are set aside as `damaged-<name>`, with a warning, and `latest` is pointed at the
        intact one: the run goes on unattended (a requeued job, say) losing at most run.ckpt_every
        steps, and its later saves, pruning and resumes never meet the damaged ones. With no intact
        checkpoint to fall back to, it refuses rather than start over."""
        intact, damaged = checkpoint.find_intact(self.ckpt_dir)
        if not damaged:
            return intact
        if intact is None:
            raise TrainingError(f"cannot resume: {damaged[0]}, and no intact checkpoint precedes it. Move it away "
                                "to start over, or use a new run.out_dir")
        for problem, aside in zip(damaged, checkpoint.set_aside(damaged, intact)):
            self.accelerator.print(f"warning: checkpoint {problem}; set aside as {aside.name}, resuming from {intact}")
        return intact

    def _check_not_behind(self, resume_from: Path | None) -> None:
        """Refuse to start behind the run directory's newest checkpoint: its later checkpoints,
        metrics and events would be overwritten or interleaved with the new ones."""
        newest = checkpoint.find_latest(self.ckpt_dir)
        if newest is None:
            return
        start = checkpoint.load_meta(resume_from)["step"] if resume_from is not None else 0
        if checkpoint.load_meta(newest)["step"] > start:
            where = f"step {start} of {resume_from}" if resume_from is not None else "step 0 (run.resume=never)"
            raise TrainingError(
                f"run.out_dir: {self.out_dir} already holds checkpoints up to {newest.name}; starting from "
                f"{where} would overwrite them. Use a new run.out_dir (run.resume=<checkpoint> works there too)"
            )

    # -- restore and save -----------------------------------------------------------------------

    def restore(self, resume_from: Path | None) -> tuple[nn.Module, Any, Progress, list[str]]:
        """Build model and optimizer; load the checkpoint to resume from (rank 0's choice), if any.
        Returns them prepared, the progress, and the lines the task's `build_model` wants printed."""
        cfg, accel = self.cfg, self.accelerator
        set_seed(cfg.run.seed)  # identical initialisation on every rank
        model, lines = self.task.build_model()
        optimizer = build_optimizer(model, cfg.optim)
        progress = Progress()
        if resume_from is not None:
            with _loading(resume_from, checkpoint.WEIGHTS):
                weights = checkpoint.load_weights(resume_from)
            model.load_state_dict(weights)
        model, optimizer = accel.prepare(model, optimizer)
        if resume_from is not None:
            # mapped, not read, on the other ranks: they take rank 0's optimizer state through the
            # process group, and read only the small entries (data positions, progress)
            with _loading(resume_from, checkpoint.STATE):
                state = checkpoint.load_train_state(resume_from, mmap=not accel.is_main_process)
            if state.get("optimizer_format") != OPTIMIZER_BY_NAME:
                raise TrainingError(f"{resume_from}: its optimizer state is not keyed by parameter name (an earlier "
                                    "version's format, which that version resumes)")
            sharding.load_optimizer_state(model, optimizer, state["optimizer"] if accel.is_main_process else None)
            ranks = state["data"]  # one stream position per rank: sample offsets and skip counts differ
            self.stream.load_state_dict(ranks[accel.process_index] if accel.process_index < len(ranks) else ranks[0])
            progress = Progress(**{k: state[k] for k in Progress.__dataclass_fields__ if k in state})
            if accel.scaler is not None and "scaler" in state:  # fp16: resume with the loss scale reached
                accel.scaler.load_state_dict(state["scaler"])
        if accel.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / rundir.CONFIG)
        return model, optimizer, progress, lines

    def save(self, model: nn.Module, optimizer: Any, progress: Progress, best: bool) -> None:
        accel = self.accelerator
        # Collectives, in this order on every rank: rank 0 receives the full weights and optimizer state
        # (keyed by parameter name) as host snapshots that training no longer changes; the others None.
        weights = sharding.full_model_state(model, accel)
        optimizer_state = sharding.optimizer_state(model, optimizer)
        problem: list[str | None] = [None]
        if weights is not None:
            problem = [self._unsaveable(weights, progress)]
        broadcast_object_list(problem)  # rank 0 alone holds the weights and writes: all ranks stop together
        if problem[0]:
            raise TrainingError(problem[0])
        data = gather_object([self.stream.state_dict()])  # every rank's position, in rank order
        if accel.is_main_process:
            state = {"data": data, **{k: getattr(progress, k) for k in Progress.__dataclass_fields__}}
            if accel.scaler is not None:
                state["scaler"] = accel.scaler.state_dict()
            # Copied to host memory now (training goes on changing the live tensors; weights and optimizer
            # state are snapshots already); written to disk in the background, so that no rank waits on a
            # slow filesystem for longer than the copy.
            state = {**checkpoint.host_copy(state), "optimizer": optimizer_state,
                     "optimizer_format": OPTIMIZER_BY_NAME}
            self.saver.submit(self.ckpt_dir, progress.step, weights, state, self._meta(model, progress),
                              self.cfg.run.keep_last, best=best)

    def _unsaveable(self, weights: dict[str, Any], progress: Progress) -> str | None:
        """Rank 0: why this save cannot go ahead (the previous write failed, or the weights are not
        finite), as the line every rank stops with; None: it can."""
        try:
            self.saver.wait()  # the previous write is complete, and its error known, before the next
            checkpoint.check_finite(weights)
        except TrainingError as e:
            return str(e)
        except checkpoint.NonFiniteWeights as e:
            return f"step {progress.step}: the weights were not saved: {e}. {last_intact(self.ckpt_dir)}"
        return None

    def _meta(self, model: nn.Module, progress: Progress) -> dict[str, Any]:
        """meta.json: the architecture, where the encoder sits in the weights, the task's own entries, the config."""
        unwrapped = self.accelerator.unwrap_model(model)
        encoder = self.task.encoder(unwrapped)
        prefix = next(name for name, m in unwrapped.named_modules() if m is encoder)
        c = encoder.cfg
        return {
            "format": 1, "stage": self.task.name, "created": datetime.now(timezone.utc).isoformat(),
            "arch": {"variant": self.cfg.model.variant, "dim": c.dim, "depth": c.depth, "heads": c.heads,
                     "mlp_ratio": c.mlp_ratio, "patch_size": c.patch_size,
                     "image_size": list(c.image_size), "grid": list(c.grid)},
            "encoder_prefix": f"{prefix}." if prefix else "", "samples": progress.samples,
            **self.task.meta(), "config": to_dict(self.cfg),
        }


@contextmanager
def _loading(ckpt: Path, name: str) -> Iterator[None]:
    """The checkpoint's file `name` failing to load, though whole by the checks at the start (corrupt
    inside, say), as one TrainingError line naming it."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        # the first sentence: torch's next ones suggest weights_only=False, which would run the file's code
        line = (str(e).strip().splitlines() or [""])[0]
        first = re.split(r"(?<=\.)\s", line, maxsplit=1)[0].rstrip(".")
        raise TrainingError(f"cannot resume from {ckpt}: its {name} does not load ({type(e).__name__}: {first}). "
                            f"Set it aside (rename it {checkpoint.DAMAGED}{Path(ckpt).name}) to resume from the "
                            "checkpoint before it") from None
