"""Files that survive a crash: a reader sees the old content or the new, never a part of it.

The one recipe, used for every file a run or a shard build must not lose (index.json,
metrics.jsonl rewrites, summary.json, config.yaml, downloads, checkpoints): write under a
temporary name in the same directory, flush and fsync it, rename it over the target
(`os.replace`, atomic on POSIX), then fsync the directory so that the rename itself is on disk.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably; on any error the old file is untouched
    and no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": never another writer's temporary file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def commit(tmp: str | Path, path: str | Path) -> None:
    """Move a finished file (written under the temporary name `tmp`, in `path`'s directory) into
    place durably: its data reaches the disk before the rename, and the rename before we return."""
    fsync(tmp)
    os.replace(tmp, path)
    fsync(Path(path).parent)


def fsync(path: str | Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
