"""Ctrl-C held off across an exchange that must not be cut half-way.

A batch crosses from a DataLoader worker as a file descriptor: the main process connects to the
worker's `multiprocessing.resource_sharer` thread and receives the descriptor. A KeyboardInterrupt
raised in between closes that connection under the worker, whose thread then prints a
ConnectionResetError traceback on stderr after the run's last line (about one Ctrl-C in nine in a
2-process run). Inside `held()` the SIGINT handler of `vitcore.train.ending.Ending` asks `hold()`
first: the KeyboardInterrupt is raised when the exchange is over; a second Ctrl-C while one is
held acts at once, so a stuck worker cannot make Ctrl-C useless.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # how many held() blocks the main thread is inside
_pending: BaseException | None = None  # the interrupt held until the outermost block ends


@contextmanager
def held() -> Iterator[None]:
    """An interrupt that `hold()` took inside this block is raised as it ends. If the block ends by
    an exception, that one goes on instead (the `Ending` counts the SIGINT all the same)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():  # signals are handled there only
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        error = _pending if _depth == 0 else None
        if error is not None:
            _pending = None
    if error is not None:
        raise error


def hold(error: BaseException) -> bool:
    """Hold `error` until the open `held()` block ends: False (raise it now) outside one, or when an
    interrupt is held already."""
    global _pending
    if _depth == 0 or _pending is not None:
        return False
    _pending = error
    return True


def holding() -> bool:
    """Whether an interrupt is held now."""
    return _pending is not None
