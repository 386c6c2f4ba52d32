"""Preemption: SIGTERM and SIGUSR1 stop a run at a step boundary, every rank at the same step,
after a checkpoint; the process then exits with PREEMPTED_EXIT so that a scheduler requeues it."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

# sysexits.h EX_TEMPFAIL: "try again later". A preempted run exits with it after its checkpoint, so
# that a scheduler (launch/slurm.sh) requeues the job, and run.resume=auto continues it.
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived: a checkpoint was saved and training stopped early."""


class StopSignals:
    """SIGTERM and SIGUSR1 (SLURM's warning before a time limit, with `--signal`) ask the run to
    checkpoint and stop at the next step boundary. Repeats change nothing (a scheduler may signal
    every process of the job and relay the signal too); SIGKILL or Ctrl-C stop at once, and the last
    complete checkpoint is intact then. Ranks may receive the signal at different steps, so they
    agree through an all-reduce each step: on the CPU over gloo, so it never waits on the GPU,
    started after one step and read after the next, so its latency hides behind a step's work."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, accelerator: Accelerator) -> None:
        self.received = 0  # the first signal's number
        self.pid = os.getpid()  # data-loader workers forked later inherit the handler: they ignore it
        self.distributed = accelerator.num_processes > 1
        self.group: Any = None
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # a collective: every rank creates it here
        self.pending: tuple[Any, torch.Tensor] | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.pending is not None:
            self.pending[0].wait()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() == self.pid and not self.received:
            self.received = signum  # nothing else here: printing could re-enter a stream being written

    def agreed(self) -> bool:
        """Whether every rank stops now: one rank's signal stops all, one step after it arrived."""
        if not self.distributed:
            return bool(self.received)
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([self.received], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop
