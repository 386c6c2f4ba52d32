"""The shard writer's progress: what lets a killed writer, or one task among many, resume and finish.

`.writer-progress/` (beside the shards) holds `plan.json`, the arguments that decide the output
and what they imply (the number of source records to write, the classes), and one record per
finished shard, `shard-000012.json`: its sample count, byte size, the range of source records it
consumed (in the seeded writing order, skipped images included), the skipped images in that range,
the time it finished and the plan it belongs to:

    plan.json:           {"version": 2, "args": {"source": ..., "resize": 112, ...}, "id": "3f0c...",
                          "records": 9469, "classes": [...], "source": "imagenette2-224.tar", ...}
    shard-000000.json:   {"plan": "3f0c...", "name": "shard-000000.tar", "samples": 1000,
                          "bytes": 11534848, "records": [0, 1000], "skipped": [], "finished": "..."}

A shard's record is written (atomically) after the shard is renamed into place, so it never
describes a shard that is not complete on disk; one file per shard, so that any number of tasks
write their shards' records side by side without sharing a file. A rerun keeps the shards whose
record belongs to the current plan and whose file still has the recorded size and sample count.
The folder is finished when the records cover every source record of the plan, in order: then
`finish` writes skipped.txt and index.json, whose `created` time is the newest shard's finishing
time, so that two tasks finishing at once write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any, TypedDict

from vitcore.atomic import atomic_write_text
from vitcore.data.index import INDEX_NAME, write_index

PROGRESS_DIR = ".writer-progress"
PLAN_NAME = "plan.json"
SKIPPED_NAME = "skipped.txt"
SHARD_NAME = "shard-{:06d}.tar"
RECORD_NAME = "shard-{:06d}.json"  # in PROGRESS_DIR
VERSION = 2


class FinishedShard(TypedDict):
    """One finished shard's record."""

    name: str
    samples: int
    bytes: int
    records: list[int]  # [start, end): positions in the writing order, skipped images included
    skipped: list[str]  # skipped.txt lines of the skipped images in that range
    finished: str  # ISO time the shard was renamed into place


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


def shard_number(name: str) -> int | None:
    """The number in a shard file's name (`shard-000012.tar`, or its `.tar.tmp`), else None."""
    stem = name.removesuffix(".tmp").removesuffix(".tar")
    number = stem.removeprefix("shard-")
    return int(number) if stem.startswith("shard-") and number.isdigit() else None


def task_shards(shards: int, tasks: int, task: int) -> list[int]:
    """The shard numbers task `task` of `tasks` writes: the task-th of `tasks` contiguous, near-equal
    blocks of `shards` (contiguous, so that a task reading a stream reads one run of it)."""
    return list(range(shards * task // tasks, shards * (task + 1) // tasks))


class Progress:
    """An output folder's plan and its finished shards' records."""

    def __init__(self, out: Path, plan: dict[str, Any]) -> None:
        self.out, self.plan = out, plan
        self.dir = out / PROGRESS_DIR

    @property
    def records(self) -> int:
        """Source records the plan writes, in all."""
        return self.plan["records"]

    def finished(self) -> dict[int, FinishedShard]:
        """The records of this plan's finished shards, by shard number (files not checked)."""
        shards = {}
        for path in self.dir.glob("shard-*.json"):
            number = shard_number(path.stem)
            record = _load(path)
            if number is not None and record is not None and record.get("plan") == self.plan["id"]:
                record.pop("plan")
                shards[number] = record
        return shards

    def intact(self, number: int, shard: FinishedShard) -> bool:
        """Whether a finished shard is still on disk as recorded: its size and sample count."""
        path = self.out / SHARD_NAME.format(number)
        try:
            if path.stat().st_size != shard["bytes"]:
                return False
            with tarfile.open(path, "r:") as tar:
                keys = {_sample_key(m.name) for m in tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError, KeyError):
            return False
        return len(keys) == shard["samples"]

    def add(self, number: int, shard: FinishedShard) -> None:
        """Record a shard that is already renamed into place (and so complete on disk)."""
        body = {"plan": self.plan["id"], **shard}
        atomic_write_text(self.dir / RECORD_NAME.format(number), json.dumps(body, indent=1) + "\n")

    def covered(self) -> tuple[list[FinishedShard] | None, list[int]]:
        """The finished shards in order when they cover every source record of the plan, else None,
        and the numbers of the missing shards (known when the plan's shards are fixed-size)."""
        shards = self.finished()
        per_shard = self.plan["args"]["samples_per_shard"]
        if per_shard is not None:
            count = -(-self.records // per_shard)
            missing = [k for k in range(count) if k not in shards]
            return (None if missing else [shards[k] for k in range(count)]), missing
        ordered, end = [], 0
        for k in range(len(shards)):  # byte-cut shards: a chain, each starting where the last ended
            if k not in shards or shards[k]["records"][0] != end:
                return None, []
            ordered.append(shards[k])
            end = shards[k]["records"][1]
        return (ordered if end == self.records else None), []

    def finish(self) -> dict[str, Any] | None:
        """Write skipped.txt and index.json when every shard is finished, and return the index;
        None (and nothing written) while shards are missing. Shard files past the plan's last (a
        previous, larger run's) are deleted first."""
        shards, _ = self.covered()
        if shards is None:
            return None
        names = {s["name"] for s in shards}
        for stale in self.out.glob("shard-*.tar*"):
            if stale.name not in names:
                stale.unlink(missing_ok=True)
        skipped = [line for s in shards for line in s["skipped"]]
        path = self.out / SKIPPED_NAME
        if skipped:
            atomic_write_text(path, "\n".join(skipped) + "\n")
        else:
            path.unlink(missing_ok=True)
        args = self.plan["args"]
        return write_index(self.out, [{"name": s["name"], "samples": s["samples"]} for s in shards],
                           self.plan["classes"], source=self.plan["source"], split=args["split"],
                           resize=args["resize"], quality=args["quality"], seed=args["shuffle_seed"],
                           skipped=len(skipped), limit=args["limit"], offset=args["offset"],
                           per_class=args["per_class"], created=max(s["finished"] for s in shards))


def open_progress(out: Path, args: dict[str, Any], facts: dict[str, Any], overwrite: bool = False,
                  shards: list[int] | None = None) -> Progress:
    """The progress to continue from in `out` (created if needed), its plan written before anything else.

    `args` decide the output; `facts` are what they imply (`records`, `classes`) and how the
    first writer named the source (`source`). A plan with other arguments raises a one-line
    ValueError naming them, and nothing is touched, unless `overwrite`: then the new plan replaces
    it and the records of `shards` (this task's; None: all) are discarded, so they are written anew.
    """
    out.mkdir(parents=True, exist_ok=True)
    folder = out / PROGRESS_DIR
    previous = _load(folder / PLAN_NAME)
    if previous is not None and previous.get("args") != args and not overwrite:
        old = previous.get("args", {})
        changed = [k for k in args if old.get(k) != args[k]] + [k for k in old if k not in args]
        was = " ".join(_cli(k, old.get(k)) for k in changed)
        now = " ".join(_cli(k, args.get(k)) for k in changed)
        raise ValueError(f"--out {out} was written with {was}, now {now}; use a new --out or the same "
                         "arguments (or --overwrite to start over)")
    (out / ".writer-progress.json").unlink(missing_ok=True)  # version 1's single file: its shards are rewritten
    folder.mkdir(exist_ok=True)
    if previous is not None and previous.get("args") == args:
        plan = previous  # another task's: the same arguments, and its name for the source
    else:
        plan_id = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
        plan = {"version": VERSION, "args": args, "id": plan_id, **facts}
        atomic_write_text(folder / PLAN_NAME, json.dumps(plan, indent=1) + "\n")
    progress = Progress(out, plan)
    if overwrite:
        for path in folder.glob("shard-*.json"):
            if shards is None or shard_number(path.stem) in shards:
                path.unlink(missing_ok=True)
    return progress


def read_progress(out: Path) -> Progress | None:
    """A folder's progress as its plan describes it, or None when it has no (readable) plan."""
    plan = _load(out / PROGRESS_DIR / PLAN_NAME)
    return Progress(out, plan) if plan is not None else None


def unfinished(folder: Path) -> str | None:
    """One line on why a shard folder with a writer's plan has no index.json yet (shards missing,
    and which tasks write them), or None when it has no plan or all its shards are there."""
    progress = read_progress(folder)
    if progress is None or (folder / INDEX_NAME).exists():
        return None
    shards, missing = progress.covered()
    if shards is not None:
        return (f"{folder} has every shard but no {INDEX_NAME}: write it with "
                f"`python -m vitcore.data.shards --out {folder} --merge`")
    if not missing:
        return f"{folder} is not finished (its writer stopped part-way): run the same command again to finish it"
    tasks = progress.plan.get("num_tasks", 1)
    count = -(-progress.records // progress.plan["args"]["samples_per_shard"])
    late = [t for t in range(tasks) if not set(task_shards(count, tasks, t)).isdisjoint(missing)]
    names = ", ".join(map(str, late[:8])) + (f" and {len(late) - 8} more" if len(late) > 8 else "")
    return (f"{folder} is not finished: {len(missing)} of {count} shards are missing (first {SHARD_NAME.format(missing[0])}), to be written by task(s) {names} of "
            f"{tasks}; run them (or the same command again), and the last to finish writes {INDEX_NAME}")


def _load(path: Path) -> dict[str, Any] | None:
    """A progress file's content; None when it is missing or unreadable (then nothing in it can be trusted)."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("version", VERSION) == VERSION else None


def _sample_key(name: str) -> str:
    """A member's sample key: its name up to the basename's first dot (webdataset's rule)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}"
