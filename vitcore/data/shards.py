"""The shard writer: any image source -> WebDataset tar shards (`jpg` + `cls`) plus `index.json`.

    python -m vitcore.data.shards --source imagenette2-224.tar --split train --out shards/train --resize 80
    vit-shards --source torchvision:CIFAR10 --out shards/cifar10-train --samples-per-shard 5000

Samples are shuffled (by index, before anything is decoded) so each shard mixes classes, and every
image is re-encoded as an RGB JPEG. Unreadable images are skipped and listed in `skipped.txt`; a
shard holds the readable images among its `--samples-per-shard` source records, so a skipped image
leaves its shard one sample short and moves no other shard.

`--workers N` (default: the CPUs this process may use) decodes, resizes and re-encodes in N
processes; the parent reads the source and writes the shards in the seeded order, so every output
byte (shards, skipped.txt, index.json but for its `created` time) is the same for any N, with
`--max-bytes` too: a byte limit is decided in the parent from the encoded sizes, in order.
About one shard's samples (at most 2 x 16 records per worker) are in flight at any time.

Several machines: `--num-tasks N --task-index I` writes only task I's shards (the I-th of N
contiguous blocks of them), reading only their source records; without the flags a SLURM array
(`SLURM_ARRAY_TASK_ID`) or one process per rank (`RANK`/`WORLD_SIZE`, under accelerate launch or
torchrun) names the task. Which
records go into which shard depends on the source and the arguments alone, so N tasks write the
same bytes as one process. The task that finishes the last shard writes index.json; until then
the folder has none and training refuses it, naming the tasks still missing. `--merge` writes the
index of a folder whose tasks have all finished (if the last one died before it could).
`--streaming` reads parquet data (a hub dataset, local files) as a stream, each task from the file
holding its first record to its last (`vitcore.data.parquet_stream`).

A killed writer (or task) resumes: run it again with the same arguments (any `--workers`) and it
keeps the shards it finished (checked against their recorded size and sample count) and writes the
rest; `.writer-progress/` records how (see `vitcore.data.shard_resume`). Other arguments are refused
with one line naming them, and nothing is touched; `--overwrite` writes the task's shards anew.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitcore.atomic import commit
from vitcore.data.index import remove_index
from vitcore.data.shard_resume import (PROGRESS_DIR, SHARD_NAME, SKIPPED_NAME, FinishedShard, Progress,
                                       open_progress, read_progress, task_shards, unfinished)
from vitcore.data.shard_workers import chunk_size, default_workers, encode_jpeg, encode_records, task_from_env
from vitcore.data.sources import Source, open_source
from vitcore.data.tar import TAR_BLOCK

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 1000
__all__ = ["encode_jpeg", "shuffled_order", "write_shards", "merge", "task_from_env", "main"]


def shuffled_order(n: int, seed: int | None, limit: int | None, offset: int = 0,
                   per_class: int | None = None, labels: Sequence[int | None] | None = None) -> list[int]:
    """The source positions to write, in writing order: a seeded permutation; with `per_class`, only
    the first `per_class` positions of each label in it (a class-balanced subset); then the first
    `offset` dropped and the rest cut to `limit`. The same seed gives the same permutation, so
    `--limit K` and `--offset K` split a source into two disjoint parts."""
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    if per_class is not None:
        assert labels is not None
        taken: Counter[int] = Counter()
        balanced = []
        for i in order:
            label = labels[i]
            if label is not None and taken[label] < per_class:
                taken[label] += 1
                balanced.append(i)
        order = balanced
    order = order[offset:]
    return order[:limit] if limit is not None else order


class _ShardFile:
    """One shard being written: a tar under a temporary name, renamed into place when finished."""

    def __init__(self, out_dir: Path, number: int, start: int) -> None:
        self.name = SHARD_NAME.format(number)
        self.path = out_dir / self.name
        self.start = start  # the first source record (in writing order) it consumes
        self.samples, self.skipped = 0, []
        self.tar = tarfile.open(out_dir / f"{self.name}.tmp", "w")

    def add(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")  # mtime, uid, ... stay 0: the bytes depend on the data only
            info.size, info.mode = len(data), 0o444
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def fits(self, files: dict[str, bytes], max_bytes: int) -> bool:
        """Whether a sample of these files keeps the shard within `max_bytes` (a first sample always does)."""
        size = sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in files.values())
        return self.samples == 0 or self.tar.offset + size <= max_bytes

    def finish(self, end: int) -> FinishedShard:
        """Close it and move it into place; it consumed the records before `end`."""
        self.tar.close()
        commit(self.path.with_name(f"{self.name}.tmp"), self.path)  # on disk before its record lists it
        return {"name": self.name, "samples": self.samples, "bytes": self.path.stat().st_size,
                "records": [self.start, end], "skipped": self.skipped,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_shards(
    source: str,
    out_dir: str | Path,
    *,
    split: str | None = None,
    resize: int | None = None,
    quality: int = 90,
    samples_per_shard: int | None = None,
    max_bytes: int | None = None,
    shuffle_seed: int | None = 0,
    limit: int | None = None,
    offset: int = 0,
    per_class: int | None = None,
    labeled: bool | None = None,
    download_dir: str | Path = "data",
    progress: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
    num_tasks: int = 1,
    task_index: int = 0,
    streaming: bool = False,
) -> dict[str, Any] | None:
    """Write `source` (see `open_source`) as shards into `out_dir`; return the index when the
    folder is finished, None while other tasks' shards are missing.

    Shard k holds the readable images among source records [k * samples_per_shard, (k + 1) *
    samples_per_shard) of the writing order (default 1000 per shard), so an unreadable image
    leaves its shard one sample short instead of moving every later shard's boundary; or shards
    roll over before exceeding `max_bytes` (one task only: where a shard ends depends on the bytes
    of every shard before it). `shuffle_seed=None` keeps the source order. `per_class`, `offset`
    and `limit` select from that order (see `shuffled_order`). Task `task_index` of `num_tasks`
    writes a contiguous block of the shards (`task_shards`), reading only their records; whichever
    task finishes the last shard writes the index. `streaming` reads parquet data as stored (see
    `vitcore.data.parquet_stream`): it needs `shuffle_seed=None`. `workers` processes encode
    (default: the CPUs this process may use). The output is the same for any `num_tasks` and
    `workers`. A folder a killed writer left is resumed; one written with other arguments raises
    ValueError unless `overwrite` (see the module docstring). Raises FileNotFoundError for a
    missing source and ValueError for an empty one or bad options.
    """
    if max_bytes is None and samples_per_shard is None:
        samples_per_shard = DEFAULT_SAMPLES_PER_SHARD
    workers = default_workers() if workers is None else workers
    _check_options(samples_per_shard=samples_per_shard, max_bytes=max_bytes, resize=resize, limit=limit,
                   per_class=per_class, workers=workers, num_tasks=num_tasks, offset=offset, quality=quality,
                   task_index=task_index)

    out = Path(out_dir)
    with open_source(source, split=split, labeled=labeled, download_dir=download_dir, streaming=streaming) as src:
        if src.sequential and shuffle_seed is not None:
            raise ValueError(f"{source} is streamed in its stored order, and a shuffled order would restart the "
                             "stream at every image: add --no-shuffle (and shuffle the rows when the files are made)")
        if per_class is not None and src.classes is None:
            raise ValueError(f"per_class needs labels, and {source} has none")
        labels = src.labels() if per_class is not None else None
        order = shuffled_order(len(src), shuffle_seed, limit, offset, per_class, labels)
        if not order:
            raise ValueError(f"nothing to write: {source} has {len(src)} samples and the selection "
                             f"(offset {offset}, limit {limit}, per_class {per_class}) keeps none")
        # Everything that decides the output (not `workers`, the tasks or `download_dir`), and the
        # source's size: the same arguments over a folder with new images give another order.
        args = {"source": _source_id(source), "split": split, "resize": resize, "quality": quality,
                "samples_per_shard": samples_per_shard, "max_bytes": max_bytes, "shuffle_seed": shuffle_seed,
                "limit": limit, "offset": offset, "per_class": per_class, "labeled": labeled,
                "source_images": len(src)}
        facts = {"records": len(order), "classes": src.classes, "source": source, "num_tasks": num_tasks}
        mine = None if samples_per_shard is None else task_shards(-(-len(order) // samples_per_shard), num_tasks,
                                                                  task_index)
        state = open_progress(out, args, facts, overwrite, mine)  # refuses other arguments before touching anything
        # Until the new index is written, no index: a crash mid-rewrite must not leave an old
        # index describing a mix of old and new shards.
        remove_index(out)
        plan, total = _unfinished(state, len(order), samples_per_shard, mine)
        todo = sum(stop - start for _, start, stop in plan)
        if total > todo:
            log.info("resuming %s: %d of %d records already in finished shards%s", out, total - todo, total,
                     "; nothing left to write" if not todo else "")
        task = f" (task {task_index} of {num_tasks})" if num_tasks > 1 else ""
        _write(src, order, plan, state, total, workers=workers, resize=resize, quality=quality,
               samples_per_shard=samples_per_shard, max_bytes=max_bytes,
               bar={"desc": f"shards -> {out}{task}", "disable": not progress})
    index = state.finish()
    if index is not None and not index["total"]:
        raise ValueError(f"no readable images in {source}; see {out / SKIPPED_NAME}")
    if index is not None and index["skipped"]:
        log.warning("skipped %d unreadable images, listed in %s", index["skipped"], out / SKIPPED_NAME)
    return index


def _check_options(*, samples_per_shard: int | None, max_bytes: int | None, offset: int, quality: int,
                   num_tasks: int, task_index: int, **sizes: int | None) -> None:
    """ValueError naming the first impossible option (`sizes`: the ones that must be positive)."""
    if samples_per_shard is not None and max_bytes is not None:
        raise ValueError("give samples_per_shard or max_bytes, not both")
    sizes |= {"samples_per_shard": samples_per_shard, "max_bytes": max_bytes, "num_tasks": num_tasks}
    for name, value in sizes.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is not one of the {num_tasks} tasks (0..{num_tasks - 1})")
    if max_bytes is not None and num_tasks > 1:
        raise ValueError(f"--max-bytes cuts each shard where the bytes of the shards before it end, so one task "
                         f"writes them all, not {num_tasks}; use --samples-per-shard with several tasks")


def _write(src: Source, order: list[int], plan: list[tuple[int, int, int]], state: Progress, total: int, *,
           workers: int, resize: int | None, quality: int, samples_per_shard: int | None, max_bytes: int | None,
           bar: dict[str, Any]) -> None:
    """Encode the records of `plan`'s shards (see `_unfinished`) and write each shard, recording it
    in `state` once it is in place; byte-cut shards roll over where `max_bytes` says."""
    todo = sum(stop - start for _, start, stop in plan)
    # No more processes than there are chunks to encode: a small folder needs no pool of 64.
    chunk = chunk_size(workers, samples_per_shard)
    procs = max(1, min(workers, -(-todo // chunk)))
    records = src.read(order[r] for _, start, stop in plan for r in range(start, stop))
    encoded = encode_records(records, resize, quality, procs, chunk)
    with closing(encoded), tqdm(encoded, total=total, initial=total - todo, unit="img", smoothing=0.1,
                                **bar) as progress:  # an error (a full disk) stops the workers now, not at exit
        samples = iter(progress)
        for number, start, stop in plan:
            shard = _ShardFile(state.out, number, start)
            for record in range(start, stop):
                sample = next(samples)
                if sample.files is None:
                    shard.skipped.append(f"{sample.key}\t{sample.error}")
                    continue
                if max_bytes is not None and not shard.fits(sample.files, max_bytes):
                    state.add(number, shard.finish(record))
                    number += 1
                    shard = _ShardFile(state.out, number, record)
                shard.add(sample.key, sample.files)
            state.add(number, shard.finish(stop))


def _unfinished(state: Progress, records: int, samples_per_shard: int | None,
                mine: list[int] | None) -> tuple[list[tuple[int, int, int]], int]:
    """What is left to write: (shard number, first record, end record) for each shard of this task's
    that is not finished and intact (byte-cut shards: one entry, from the end of the intact ones
    on, numbers counting up as they are cut), and the records this task's shards hold in all."""
    finished = state.finished()  # every task's; only this task's own are checked on disk

    def done(k: int) -> bool:
        return k in finished and state.intact(k, finished[k])

    if samples_per_shard is not None:
        ranges = [(k, k * samples_per_shard, min(records, (k + 1) * samples_per_shard)) for k in mine]
        return [r for r in ranges if not done(r[0])], sum(stop - start for _, start, stop in ranges)
    kept = 0  # byte-cut shards continue each other: keep the intact ones up to the first that is not
    while done(kept) and finished[kept]["records"][0] == (finished[kept - 1]["records"][1] if kept else 0):
        kept += 1
    first = finished[kept - 1]["records"][1] if kept else 0
    return ([(kept, first, records)] if first < records else []), records


def merge(out_dir: str | Path) -> dict[str, Any]:
    """Write the index.json of a folder whose tasks have all finished (the last task does it itself;
    this is for a folder whose last task died between its last shard and the index). Raises
    ValueError naming the missing shards and tasks while some are."""
    out = Path(out_dir)
    state = read_progress(out)
    if state is None:
        raise ValueError(f"{out} has no shard writer's plan ({PROGRESS_DIR}/plan.json): nothing to merge")
    index = state.finish()
    if index is None:
        raise ValueError(unfinished(out))
    return index


def _source_id(source: str) -> str:
    """A local source by its absolute path, so that a rerun from another folder is the same source
    (and the same relative name from another folder is not); other specs as given."""
    path = Path(source)
    return str(path.resolve()) if ":" not in source and path.exists() else source


def _byte_size(text: str) -> int:
    """Parse a size such as 500000000, 512M or 1G."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    suffix = text[-1:].lower()
    return int(float(text[:-1]) * units[suffix]) if suffix in units else int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vit-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="folder, tar archive, data file, hf:NAME or torchvision:NAME")
    p.add_argument("--out", required=True, help="output folder for shard-*.tar and index.json")
    p.add_argument("--split", help="folder inside the source (e.g. train), or the dataset split")
    p.add_argument("--resize", type=int, help="shrink the shorter side to this many pixels, keeping aspect")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help=f"samples per shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    size.add_argument("--max-bytes", type=_byte_size,
                      help="maximum shard size, e.g. 512M; cut in order in the parent, so the same for any --workers")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0, help="seed of the shuffle before writing (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--limit", type=int, help="write only the first N samples (after shuffling)")
    p.add_argument("--offset", type=int, default=0,
                   help="skip the first N samples (after shuffling): --limit N and --offset N split a source in two")
    p.add_argument("--per-class", type=int,
                   help="only the first N samples of each class (after shuffling): a class-balanced subset")
    p.add_argument("--unlabeled", action="store_true", help="ignore class folders; write images only")
    p.add_argument("--streaming", action="store_true",
                   help="read parquet data (hf:NAME, a .parquet file or a folder of them) as a stream, never "
                        "materialised; needs --no-shuffle")
    p.add_argument("--download-dir", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that decode and encode (default: the CPUs this process may use, shared among "
                        "a launch's local processes); the output is the same for any N")
    p.add_argument("--overwrite", action="store_true",
                   help="write the folder (this task's shards) anew even if written or begun with other arguments")
    p.add_argument("--num-tasks", type=int,
                   help="split the work into N tasks (default: a SLURM array's size, WORLD_SIZE, or 1)")
    p.add_argument("--task-index", type=int, help="which task this is, 0..N-1 (default: from SLURM or RANK)")
    p.add_argument("--merge", action="store_true",
                   help="only write the index of --out, whose tasks have all finished (the last task does it itself)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`vit-shards`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.merge:
        try:
            index = merge(args.out)
        except ValueError as exc:
            raise SystemExit(f"vit-shards: error: {exc}") from None
        print(f"wrote {args.out}/index.json: {index['total']} samples in {len(index['shards'])} shards")
        return
    if args.source is None:
        parser.error("--source is required (except with --merge)")
    if (args.num_tasks is None) != (args.task_index is None):
        parser.error("give --num-tasks and --task-index together")
    num_tasks, task_index = task_from_env() if args.num_tasks is None else (args.num_tasks, args.task_index)
    try:
        index = write_shards(
            args.source,
            args.out,
            split=args.split,
            resize=args.resize,
            quality=args.quality,
            samples_per_shard=args.samples_per_shard,
            max_bytes=args.max_bytes,
            shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
            limit=args.limit,
            offset=args.offset,
            per_class=args.per_class,
            labeled=False if args.unlabeled else None,
            download_dir=args.download_dir,
            workers=args.workers,
            overwrite=args.overwrite,
            num_tasks=num_tasks,
            task_index=task_index,
            streaming=args.streaming,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"vit-shards: error: {exc}") from None
    if index is None:
        print(f"task {task_index} of {num_tasks} wrote its shards to {args.out}; the task that finishes last "
              f"writes index.json")
        return
    classes = index["classes"]
    print(
        f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.out}"
        f" ({len(classes) if classes else 'no'} classes, {index['skipped']} skipped)"
    )


if __name__ == "__main__":
    main()
