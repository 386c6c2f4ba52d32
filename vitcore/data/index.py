"""index.json, the file that describes a shard folder: its format, written and read only here.

    {"shards": [{"name": "shard-000000.tar", "samples": 1000}, ...],  # in writing order
     "total": 9469,                     # the shards' samples summed: the epoch length
     "classes": ["tench", ...] | null,  # label i is classes[i]; null: the shards carry no labels
     "source": ..., "split": ..., "resize": ..., "quality": ..., "seed": ..., "skipped": ...,
     "created": "2024-05-01T12:00:00+00:00"}  # how they were made (`vitcore.data.shards`)

Only `shards`, `total` and `classes` are required, so that a hand-written index works too. An index
is data, not a command: a shard name is a plain file name in the index's folder, never a path that
leaves it nor a `pipe:` or URL that webdataset's gopen would run or fetch.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from vitcore.atomic import atomic_write_text

INDEX_NAME = "index.json"  # beside the shards
REQUIRED_FIELDS = ("shards", "total", "classes")


class ShardEntry(TypedDict):
    """One element of the index's `shards` list."""

    name: str  # a file name in the index's folder
    samples: int


def index_path(folder_or_file: str | Path) -> Path:
    """The index of a shard folder, or `folder_or_file` itself when it is not a folder."""
    path = Path(folder_or_file)
    return path / INDEX_NAME if path.is_dir() else path


def is_remote(url: str) -> bool:
    """Whether gopen would run (`pipe:`) or fetch (`scheme://`) `url` rather than open a local file."""
    return url.startswith("pipe:") or "://" in url


def write_index(folder: Path, shards: list[ShardEntry], classes: list[str] | None, created: str | None = None,
                **provenance: Any) -> dict[str, Any]:
    """Write the index of the `shards` in `folder` atomically and return it; `provenance` (how the
    shards were made) is stored beside the required fields, followed by `created` (default: now)."""
    index = {
        "shards": shards,
        "total": sum(s["samples"] for s in shards),
        "classes": classes,
        **provenance,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return index


def remove_index(folder: Path) -> None:
    """Delete a folder's index, so that readers find none while its shards are rewritten."""
    (folder / INDEX_NAME).unlink(missing_ok=True)


def read_index(folder_or_file: str | Path) -> dict[str, Any]:
    """The index of a shard folder (or at that path), checked: a ValueError names the file when it
    is not JSON, lacks a required field, or lists a shard that is not a file name in its folder."""
    path = index_path(folder_or_file)
    if not path.is_file():
        raise FileNotFoundError(f"shard index not found: {path}")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}); write the shards again with "
                         "`python -m vitcore.data.shards`") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} is not a shard index (a JSON object)")
    missing = set(REQUIRED_FIELDS) - index.keys()
    if missing:
        raise ValueError(f"{path} is not a shard index (missing {sorted(missing)})")
    entries = index["shards"]
    if not isinstance(entries, list) or not all(isinstance(s, dict) and {"name", "samples"} <= s.keys()
                                                for s in entries):
        raise ValueError(f"{path} is not a shard index (shards must be a list of "
                         "{\"name\": ..., \"samples\": ...} objects)")
    # Absolute paths and `..` would leave the folder; `pipe:` and URLs would run or fetch something.
    bad = next((n for n in (s["name"] for s in entries) if not isinstance(n, str) or Path(n).name != n
                or is_remote(n)), None)
    if bad is not None:
        raise ValueError(f"{path.resolve()}: shard name {bad!r} is not a file name in that folder")
    return index
