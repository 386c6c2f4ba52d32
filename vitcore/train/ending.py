"""How a process of a run ends. Every ending leaves through `Ending`: it stops the run's
background work (data workers, the checkpoint writer), then destroys the process group, then
exits with the ending's status and one line on stderr:

    status  ending                                        line
    0       finished                                      (none)
    1       a TrainingError (every rank raises it)        error: ...
    2       a config error, before any step               config error: ...
    75      preempted (SIGTERM, SIGUSR1), after a checkpoint    preempted: ...
    130     Ctrl-C (SIGINT), after the checkpoint being written is complete    interrupted: ...

The launcher's death sends every worker SIGTERM (`exit_with_launcher`), so it ends as a
preemption would. Anything else (a bug) keeps its traceback, after the same teardown. A launched
process then leaves through `run_process`, which skips interpreter finalization.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import traceback
from types import TracebackType
from typing import Any, Callable, NoReturn, TypeVar

import torch.distributed as dist

from vitcore import interrupts
from vitcore.config import ConfigError
from vitcore.train.preemption import PREEMPTED_EXIT, Preempted
from vitcore.train.runstate import TrainingError

FAILED, CONFIG_ERROR, INTERRUPTED = 1, 2, 130  # and PREEMPTED_EXIT (75)
# exception types, exit status, the line's first word; the first match wins
ENDINGS: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
    ((KeyboardInterrupt,), INTERRUPTED, "interrupted"),
    ((ConfigError,), CONFIG_ERROR, "config error"),
    ((Preempted,), PREEMPTED_EXIT, "preempted"),
    ((TrainingError, FileNotFoundError), FAILED, "error"),
)

T = TypeVar("T")


class RunExit(SystemExit):
    """The process exits with `code`; `line` (already on stderr) is also its `str()`."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def run_process(entry: Callable[[], object]) -> NoReturn:
    """A launched process's whole life: `entry()` (a stage's `main`, inside its `Ending`), then the
    exit with its status, without interpreter finalization (`os._exit` once stdout and stderr are
    flushed). `end_process_group` destroys the group, but an object still referencing it (a DDP or
    FSDP model in a global, an exception's frames) frees it only during finalization, where gloo's
    threads abort the process as below: 2 of 20 two-process runs did with such a reference held.
    What must reach disk was closed by the `Ending` already; a bug prints its traceback first."""
    status = 0
    try:
        entry()
    except SystemExit as stop:  # RunExit: the line is on stderr already; sys.exit("message") too
        if isinstance(stop.code, str) and not isinstance(stop, RunExit):
            print(stop.code, file=sys.stderr)
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 (a bug, or Ctrl-C outside an Ending: the traceback, then status 1)
        traceback.print_exc()
        status = FAILED
    exit_now(status)


def exit_now(status: int = 0) -> NoReturn:
    """Exit with `status` at once, stdout and stderr flushed, without interpreter finalization
    (see `run_process`); for a script that ended its process group itself."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def end_process_group() -> None:
    """Destroy every process group while the interpreter is whole. Left to interpreter
    finalization, a gloo worker thread (`pt_gloo_runloop`) that drops its last reference to a
    finished collective frees tensors whose Python objects need the GIL; the finalizing interpreter
    ends that thread inside a noexcept destructor, and std::terminate aborts the process (SIGABRT,
    "terminate called without an active exception") after its work is done: 8 of 30 two-process
    gloo runs did. destroy_process_group joins those threads first."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Ending:
    """`with Ending() as end:` around a process's whole run. `end.closing(obj)` registers
    `obj.close()` to run on the way out, newest first, before the process group is destroyed.
    A first SIGINT raises KeyboardInterrupt (after the batch transfer it lands in: see
    `vitcore.interrupts`); later ones, and any during the teardown, are noted and ignored, so that a
    second Ctrl-C cannot break the teardown half-way."""

    def __init__(self) -> None:
        self.closers: list[Callable[[], None]] = []
        self.interrupted = False
        self.raising = True  # a SIGINT raises KeyboardInterrupt (until the teardown starts)
        self.previous: Any = None

    def closing(self, obj: T) -> T:
        self.closers.append(obj.close)  # type: ignore[attr-defined]
        return obj

    def __enter__(self) -> Ending:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _interrupt(self, signum: int, frame: Any) -> None:
        first, self.interrupted = not self.interrupted, True
        if not self.raising or first and interrupts.hold(KeyboardInterrupt("Ctrl-C (SIGINT)")):
            return  # tearing down already, or held until a batch's transfer is complete
        if first or interrupts.holding():  # a second Ctrl-C does not wait for a held first one
            raise KeyboardInterrupt("Ctrl-C (SIGINT)")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.raising = False
        try:
            for close in reversed(self.closers):
                try:
                    close()
                except Exception as late:  # e.g. the checkpoint writer's error: it ends the run if nothing else did
                    error = error or late
            end_process_group()
        finally:
            if self.previous is not None:
                signal.signal(signal.SIGINT, self.previous)
        if self.interrupted and not isinstance(error, KeyboardInterrupt):
            # a SIGINT that arrived while a collective failed (its peer was interrupted first) or during teardown
            error = KeyboardInterrupt(f"Ctrl-C (SIGINT){f'; then {error}' if error is not None else ''}")
        if error is None or isinstance(error, SystemExit):
            return None
        for types, status, word in ENDINGS:
            if isinstance(error, types):
                line = f"{word}: {error}"
                print(line, file=sys.stderr, flush=True)
                raise RunExit(status, line) from None
        if error is not None and kind is None:  # a closer's unexpected error, with nothing in flight
            raise error
        return None  # a bug: its traceback follows


def exit_with_launcher() -> None:
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
