"""Checkpoints that survive a crash at any instant and load without unpickling code.

Layout of one checkpoint, `<run>/checkpoints/step-00001000/`:
    model.safetensors   the trained module's weights (the encoder under `meta["encoder_prefix"]`)
    train_state.pt      optimizer state, step, samples, data position: tensors and plain
                        Python values only, so `torch.load(..., weights_only=True)` reads it
    meta.json           architecture, patch size, image size, grid, stage, step, config
`<run>/checkpoints/latest` is a symlink to the newest complete checkpoint, `best` (runs that
evaluate or monitor) to the one with the best `run.best_metric`; pruning keeps both.

Atomicity: a checkpoint is written into a temporary directory that is renamed into place
only once every file is on disk, then `latest` is swapped by renaming a new symlink over it.
A crash at any moment leaves `latest` pointing at a complete checkpoint, and only finite weights
are ever saved.

Writes can run in the background (`BackgroundSaver`, which the engine uses): training goes on
from a host copy of the state while the files are written, with the same guarantees.

One writer: a run holds `<run>/.lock` (`lock_run_dir`) for its life, so no second run resumes
from, writes into or prunes the temporary files of a live one.

Faults: a write that fails (a full disk) removes its temporary directory and raises
CheckpointNotWritten, naming the free space; `latest` stays where it was. A checkpoint damaged
after it was written (a file cut short or missing) is found by `check_intact` without reading
its tensors; `find_intact` walks back from `latest` to the newest intact one, and `set_aside`
moves the damaged ones out of the way, under names no search or pruning matches, never deleting
them, and points `latest` at the intact one.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vitcore.atomic import fsync

WEIGHTS, STATE, META = "model.safetensors", "train_state.pt", "meta.json"
PREFIX, TMP, DAMAGED = "step-", ".tmp-", "damaged-"
# What a failed write raises: the writers do not all keep the OSError of a full disk (safetensors
# raises SafetensorError "I/O error: No space left on device", torch.save a RuntimeError "unexpected pos")
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory."""


class RunDirNotWritable(RuntimeError):
    """The run directory cannot be created or written (a read-only or full filesystem, permissions)."""


class NonFiniteWeights(ValueError):
    """Weights holding a NaN or an infinity: never saved as a checkpoint."""


class CheckpointNotWritten(OSError):
    """A checkpoint write failed (a full disk, say); its temporary directory is gone, `latest` unmoved."""


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are missing, cut short or unreadable."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} is damaged: {why}")
        self.path, self.why = path, why


def lock_run_dir(out_dir: str | Path) -> Any:
    """Hold `<out_dir>/.lock` until the returned file is closed (`unlock_run_dir`) or this process
    dies: the kernel drops a dead process's lock, so a killed run never blocks the next start.
    Taking it is the run's first write, so a directory it cannot write is refused here, before any
    work (RunDirNotWritable), rather than at the first checkpoint, hours later."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a+")
    except OSError as e:
        raise _not_writable(out_dir, e) from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "starting"
        lock.close()
        raise RunDirInUse(f"run.out_dir: {out_dir} is in use by another run ({holder}); use another run.out_dir")
    try:
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        lock.flush()
    except OSError as e:  # a full disk fails here: a few bytes, where a checkpoint needs far more
        lock.close()
        raise _not_writable(out_dir, e) from e
    return lock


def _not_writable(out_dir: Path, error: OSError) -> RunDirNotWritable:
    return RunDirNotWritable(f"run.out_dir: {out_dir} is not writable ({error.strerror or error})")


def unlock_run_dir(lock: Any) -> None:
    # LOCK_UN first: data workers forked while it was held share the lock until they exit
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()


def check_finite(weights: dict[str, torch.Tensor]) -> None:
    """Raise NonFiniteWeights naming the first tensor that holds a NaN or an infinity."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeights(f"{name} holds non-finite values")


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    best: bool = False,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` (and `best` if `best`) at it and keep the
    newest `keep_last` besides the one `best` points at. Non-finite weights raise NonFiniteWeights
    before anything is written."""
    check_finite(weights)
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    # Only an orphan may be replaced: a save that crashed after its rename but before the
    # `latest` swap, re-made by the resumed run. Replacing what `latest` points at could
    # leave no checkpoint at all if we crashed between the delete and the rename.
    if final.exists() and (ckpt_dir / "latest").resolve() == final.resolve():
        raise FileExistsError(f"{final} is the latest checkpoint; refusing to replace it")
    tmp = ckpt_dir / f"{TMP}{final.name}-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
        save_file({k: v.detach().contiguous().to("cpu", copy=True) for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save(train_state, tmp / STATE)
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
        for f in [*tmp.iterdir(), tmp]:
            fsync(f)
        if final.exists():  # the orphan
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(ckpt_dir)
        for name in ("latest", "best") if best else ("latest",):
            point(ckpt_dir, name, final)
        fsync(ckpt_dir)  # the new links are durable before pruning deletes anything
    except Exception as e:
        # An error the process outlives (a full disk) leaves no partial directory to fill the disk
        # further; a kill mid-write leaves it to the next run's pruning.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WRITE_ERRORS):
            # the free space explains the writers' errors that do not say "No space left on device"
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            needs = sum(t.nbytes for t in (*weights.values(), *_tensors(train_state)))
            raise CheckpointNotWritten(f"cannot write checkpoint {final.name} in {ckpt_dir}: {why} (it needs "
                                       f"{_human(needs)}, {_human(_free_space(ckpt_dir))} free there)") from e
        raise
    _prune(ckpt_dir, keep_last)
    return final


def point(ckpt_dir: Path, name: str, target: Path) -> None:
    """Point the link `ckpt_dir/name` (`latest`, `best`) at checkpoint `target`, atomically: a new
    link is renamed over the old one, so a reader sees the old target or the new, never none."""
    link = ckpt_dir / f"{TMP}{name}-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(target.name)
    os.replace(link, ckpt_dir / name)


def _free_space(path: Path) -> int | None:
    """Bytes free on the filesystem of `path` (or of its nearest existing parent); None: unknown."""
    try:
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _human(size: int | None) -> str:
    """A byte count for a human: "12.3 MB"."""
    if size is None:
        return "unknown"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in `obj` (nested dicts, lists, tuples)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a path to one, to `latest`, or to a run's `checkpoints/` or run dir."""
    path = Path(path)
    for candidate in (path, path / "latest", path / "checkpoints" / "latest"):
        if (candidate / META).is_file() and (candidate / WEIGHTS).is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no complete checkpoint at {path} (expected {META} and {WEIGHTS})")


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `ckpt_dir`, or None; temporary leftovers are ignored."""
    ckpt_dir = Path(ckpt_dir)
    try:
        return resolve(ckpt_dir / "latest")
    except FileNotFoundError:
        complete = [p for p in _checkpoints(ckpt_dir) if (p / META).is_file()]
        return complete[-1] if complete else None


def check_intact(ckpt: Path) -> None:
    """Raise DamagedCheckpoint saying what is wrong with checkpoint directory `ckpt`, if anything.
    Cheap, so that the run's start can afford it: meta.json is parsed, the weights' header is read
    and checked against the file's length (safetensors refuses a file its header does not cover
    exactly), and the training state's zip directory, stored at its end, is opened; no tensor is read."""
    missing = [name for name in (WEIGHTS, STATE, META) if not (ckpt / name).is_file()]
    if missing:
        raise DamagedCheckpoint(ckpt, f"{' and '.join(missing)} missing")
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(ckpt, f"{META} is unreadable ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise DamagedCheckpoint(ckpt, f"{META} holds no step")
    try:
        with safe_open(ckpt / WEIGHTS, framework="pt"):
            pass
    except (OSError, SafetensorError) as e:
        size = (ckpt / WEIGHTS).stat().st_size
        raise DamagedCheckpoint(ckpt, f"{WEIGHTS} is cut short or corrupt ({size} bytes: {e})") from None
    try:
        zipfile.ZipFile(ckpt / STATE).close()  # torch.save's format: a zip, its directory at the end
    except (OSError, zipfile.BadZipFile) as e:
        size = (ckpt / STATE).stat().st_size
        raise DamagedCheckpoint(ckpt, f"{STATE} is cut short or corrupt ({size} bytes: {e})") from None


def find_intact(ckpt_dir: str | Path) -> tuple[Path | None, list[DamagedCheckpoint]]:
    """The newest intact checkpoint under `ckpt_dir` (None: none) and what `check_intact` found
    wrong with each newer one, newest first. The search starts at the checkpoint `latest` points
    at and walks back; one newer than `latest` (a save that crashed before its swap) is an orphan
    the resumed run writes again, no candidate, as in `find_latest`."""
    ckpt_dir = Path(ckpt_dir)
    link = ckpt_dir / "latest"
    newest = Path(os.readlink(link)).name if link.is_symlink() else None
    damaged = []
    for candidate in reversed(_checkpoints(ckpt_dir)):
        if newest is not None and candidate.name > newest:
            continue
        try:
            check_intact(candidate)
        except DamagedCheckpoint as e:
            damaged.append(e)
            continue
        return candidate.resolve(), damaged
    return None, damaged


def set_aside(damaged: list[DamagedCheckpoint], intact: Path) -> list[Path]:
    """Rename each damaged checkpoint `damaged-<name>` beside it (numbered, if taken), then point
    `latest` at `intact`, the one to go on from; returns the new names. Out of every search for
    checkpoints and of pruning, the damaged ones are kept for a look, never deleted."""
    moved = []
    for problem in damaged:
        for n in itertools.count():
            target = problem.path.with_name(f"{DAMAGED}{problem.path.name}" + (f"-{n}" if n else ""))
            if not target.exists():
                break
        os.rename(problem.path, target)
        moved.append(target)
    point(intact.parent, "latest", intact)
    fsync(intact.parent)
    return moved


def find_best(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint `best` points at, or None."""
    try:
        return resolve(Path(ckpt_dir) / "best")
    except FileNotFoundError:
        return None


def load_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    return load_file(resolve(ckpt) / WEIGHTS)


def load_meta(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((resolve(ckpt) / META).read_text())


def load_train_state(ckpt: str | Path, mmap: bool = False) -> dict[str, Any]:
    """`mmap`: tensors are mapped from the file (copy-on-write), read from disk only where touched,
    for a process that needs the small entries but not the optimizer state."""
    # weights_only: tensors and plain containers only; a tampered file cannot run code.
    return torch.load(resolve(ckpt) / STATE, map_location="cpu", weights_only=True, mmap=mmap)


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob(f"{PREFIX}*") if p.is_dir())


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    linked = {(ckpt_dir / name).resolve() for name in ("latest", "best")}
    for old in _checkpoints(ckpt_dir)[:-keep_last]:
        if old.resolve() not in linked:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in ckpt_dir.glob(f"{TMP}*"):  # from a save that crashed before its rename
        if leftover.name.endswith(f"-{os.getpid()}"):
            continue
        if leftover.is_symlink():  # a `latest` link that was never swapped in
            leftover.unlink(missing_ok=True)
        elif leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def host_copy(obj: Any) -> Any:
    """`obj` (nested dicts, lists, tuples) with every tensor copied to host memory: a snapshot that
    training can no longer change while a background thread writes it."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class BackgroundSaver:
    """Runs `save_checkpoint` in one background thread, one checkpoint at a time, so that training
    (and the other ranks) need not wait for the filesystem. The write keeps every guarantee of
    `save_checkpoint`: a crash mid-write leaves the previous `latest` intact. `wait()` returns once
    the write in flight is complete and raises its error, if it failed."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, *args: Any, **kwargs: Any) -> None:
        """`save_checkpoint(*args, **kwargs)` in the background; the tensors must be host copies."""
        self.wait()

        def write() -> None:
            try:
                save_checkpoint(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 (re-raised in the training thread by wait())
                self._error = e

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
