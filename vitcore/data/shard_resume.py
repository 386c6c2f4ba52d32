"""The shard writer's progress file: what lets a killed writer resume where it stopped.

`.writer-progress.json` (beside the shards) holds the arguments that decide the output and, per
finished shard, its sample count, byte size, the range of source records it consumed (in the
seeded writing order, skipped images included) and the skipped images in that range:

    {"version": 1, "args": {"source": ..., "resize": 112, ..., "source_images": 9469},
     "shards": [{"name": "shard-000000.tar", "samples": 1000, "bytes": 11534848,
                 "records": [0, 1002], "skipped": ["n0144/x_JPEG\tOSError: ..."]}, ...]}

It is written atomically before the first shard and again after each shard is renamed into
place, so it never lists a shard that is not complete on disk. A rerun with the same arguments
keeps the listed shards that still check out, skips their records and writes the rest; since the
order is a function of the arguments and every shard's content a function of its records, the
result is the uninterrupted run's, byte for byte. `--workers` is not recorded: it changes no byte.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, TypedDict

from vitcore.atomic import atomic_write_text

PROGRESS_NAME = ".writer-progress.json"
VERSION = 1


class FinishedShard(TypedDict):
    """One finished shard in the progress file."""

    name: str
    samples: int
    bytes: int
    records: list[int]  # [start, end): positions in the writing order, skipped images included
    skipped: list[str]  # skipped.txt lines of the skipped images in that range


def _cli(name: str, value: Any) -> str:
    """An argument's value as the command line spells it, for the refusal message."""
    if name == "shuffle_seed":
        return "--no-shuffle" if value is None else f"--shuffle-seed {value}"
    if name == "labeled":
        return {False: "--unlabeled", None: "no --unlabeled", True: "labels required"}[value]
    if name == "source_images":
        return f"a source of {value} images"
    flag = "--" + name.replace("_", "-")
    return f"no {flag}" if value is None else f"{flag} {value}"


class Progress:
    """The finished shards of an output folder and the arguments they were written with."""

    def __init__(self, out: Path, args: dict[str, Any], shards: list[FinishedShard]) -> None:
        self.out, self.args, self.shards = out, args, shards

    @property
    def consumed(self) -> int:
        """Source records (in writing order) that the finished shards account for."""
        return self.shards[-1]["records"][1] if self.shards else 0

    @property
    def skipped(self) -> list[str]:
        return [line for shard in self.shards for line in shard["skipped"]]

    def add(self, shard: FinishedShard) -> None:
        """Record a shard that is already renamed into place (and so complete on disk)."""
        self.shards.append(shard)
        self.save()

    def save(self) -> None:
        body = {"version": VERSION, "args": self.args, "shards": self.shards}
        atomic_write_text(self.out / PROGRESS_NAME, json.dumps(body, indent=1) + "\n")


def open_progress(out: Path, args: dict[str, Any], overwrite: bool = False) -> Progress:
    """The progress to continue from in `out` (created if needed), written before anything else.

    Without a progress file (a new folder, or one from a writer that kept none) or with
    `overwrite`, it starts empty. A progress file with other arguments raises a one-line
    ValueError naming them, and nothing is touched. Its shards are kept up to the first one that
    is missing or has another size or sample count than recorded (e.g. a damaged disk).
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROGRESS_NAME
    previous = _load(path) if path.is_file() and not overwrite else None
    kept: list[FinishedShard] = []
    if previous is not None:
        old = previous.get("args", {})
        changed = [k for k in args if old.get(k) != args[k]] + [k for k in old if k not in args]
        if changed:
            was = " ".join(_cli(k, old.get(k)) for k in changed)
            now = " ".join(_cli(k, args.get(k)) for k in changed)
            raise ValueError(f"--out {out} was written with {was}, now {now}; use a new --out or the same "
                             "arguments (or --overwrite to start over)")
        for shard in previous.get("shards", []):
            if not _intact(out / shard["name"], shard):
                break  # later shards continue this one's records: rewrite from here
            kept.append(shard)
    progress = Progress(out, args, kept)
    progress.save()
    return progress


def _load(path: Path) -> dict[str, Any] | None:
    """A progress file's content; None when it is unreadable (then nothing can be trusted: start over)."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("version") == VERSION else None


def _intact(path: Path, shard: FinishedShard) -> bool:
    """Whether a finished shard is still on disk as recorded: its size and sample count."""
    try:
        if path.stat().st_size != shard["bytes"]:
            return False
        with tarfile.open(path, "r:") as tar:
            keys = {_sample_key(m.name) for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError, KeyError):
        return False
    return len(keys) == shard["samples"]


def _sample_key(name: str) -> str:
    """A member's sample key: its name up to the basename's first dot (webdataset's rule)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}"
