"""Planning an epoch: which shards, which sample ranges and how many batches each stream gets.

Pure arithmetic on shard sizes, seeds and the position; nothing here reads a sample. The worker
side that carries a plan out is `vitcore.data.pipeline`; `vitcore.data.stream` ties them together.

1. Shards [`resolve_shards`]: a shard folder's index.json (`vitcore.data.index`) gives the shard
   files, their sample counts and the classes; the counts give the epoch length. Local paths, brace
   patterns and `pipe:`/http URLs are accepted too (then `epoch_samples` gives the length).
2. Split over ranks and workers [`ShardStream._plans`]: every rank runs max(num_workers, 1)
   streams, one per DataLoader worker (num_workers=0: one, in this process), each with its own plan
   [`StreamPlan`]: a seed derived from (seed, epoch, rank, stream) [`derive_seed`], what to read,
   and how many batches to deliver.
   Training (`resampled=True`): every rank gets total // (world_size * batch_size) batches, spread
   over its streams (the first ones take one more when it does not divide) [`part_size`]. With
   index.json's sample counts, each epoch is a permutation, as timm's sampler makes it: the world's
   streams divide the epoch's samples, in a new seeded shard order every epoch, into contiguous
   runs of near-equal length (below), each read through the stream's shuffle buffer; a stream that
   runs short of its batches (skipped samples, rounding) tops up with shards drawn with replacement
   [`resampled_shards`], and draws alone feed shards without sample counts (`pipe:` URLs) and the
   rest of an epoch resumed on another layout. Drawing every shard with replacement (this code's way until
   issue 22) left about a third of the images out of each epoch on Imagenette's 10 shards; its cost
   in top-1 was within noise at 500 steps (docs/benchmarks.md).
   Evaluation (`resampled=False`): the world's streams divide the epoch into sample ranges, every
   sample exactly once (see below) [`exactly_once_ranges`]. The main process posts the plans on a
   shared board [`PlanBoard`].

Exactly-once (evaluation) streams divide the epoch into sample ranges `(shard, start, stop)`,
computed from index.json's per-shard sample counts, the seed and the epoch only, so that every
rank derives the same division. The world's world_size x num_workers streams (num_workers=0 is
one stream) are numbered worker-major, worker * world_size + rank, so that work spreads over the
ranks first. With at least as many non-empty shards as streams, each stream reads whole shards:
the largest first, each to the stream with the fewest samples so far. With fewer (8 validation
shards on 64 GPUs), the shards, concatenated in the epoch's seeded order, are cut into one
contiguous run per stream, the runs differing in length by at most one sample, so a shard may be
shared by consecutive streams. A stream reads only its ranges: it passes over the samples before
`start` by their tar headers (seeking over their data in a local file, never decoding them) and
stops at `stop`. With more streams than samples, the streams past the last sample get no range:
their ranks yield no batch, and `len()` says so. A corrupt sample counts one skip in `skipped`,
and so does a range that breaks off or ends before `stop`.

DataLoader workers persist across epochs (forked once, not every epoch). A worker's copy of the
dataset never sees attributes the main process sets later, so each epoch's plans reach the workers
through shared memory, the `PlanBoard`, posted before the epoch's first request.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand

from vitcore.data.index import index_path, is_remote, read_index
from vitcore.data.shard_resume import unfinished

ShardRange = tuple[int, int, int]  # (shard index, first sample, stop): samples start..stop-1 of that shard


def resolve_shards(urls: str | list[str]) -> tuple[list[str], list[int] | None, dict[str, Any] | None]:
    """Shard URLs, their sample counts when an index knows them, and that index.

    Accepts a shard folder or index.json path, local paths, brace patterns (`a-{000..009}.tar`)
    and `pipe:`/http(s) URLs, as a string or a list. Local shards must exist.
    """
    specs = [urls] if isinstance(urls, str) else list(urls)
    if len(specs) == 1 and not is_remote(specs[0]) and (Path(specs[0]).is_dir() or specs[0].endswith(".json")):
        path = index_path(specs[0])
        if not path.exists() and (why := unfinished(path.parent)):  # tasks of a shard writer still running
            raise FileNotFoundError(why)
        index = read_index(path)  # refuses shard names that are not plain files beside it
        folder = path.parent.resolve()  # absolute, which also keeps gopen local
        shards = index["shards"]
        return [str(folder / s["name"]) for s in shards], [s["samples"] for s in shards], index
    expanded = [url for spec in specs for url in braceexpand(spec)]
    if not expanded:
        raise ValueError("no shards given")
    local = [Path(u) for u in expanded if not is_remote(u)]
    missing = [str(p) for p in local if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    # Local shards from one folder: take their sizes from the index beside them, if it lists them all.
    folders = {p.parent for p in local}
    if len(local) == len(expanded) and len(folders) == 1 and index_path(folders.pop()).is_file():
        index = read_index(local[0].parent)
        sizes = {s["name"]: s["samples"] for s in index["shards"]}
        if all(p.name in sizes for p in local):
            return expanded, [sizes[p.name] for p in local], index
    return expanded, None, None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and Python runs."""
    # Not hash(): that is salted per process, and workers and resumed runs must agree on seeds.
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def part_size(total: int, parts: int, i: int) -> int:
    """The size of part i when `total` is split into `parts` near-equal parts, the first ones larger.

    Also the number of batches stream i delivered among the first `total`, since the DataLoader
    takes the streams' batches round-robin.
    """
    return total // parts + (i < total % parts)


@dataclass(frozen=True)
class StreamPlan:
    """What one stream (one DataLoader worker's, or the in-process one) delivers this epoch."""

    seed: int  # seeds shard draws, sample shuffling and per-sample augmentation
    ranges: list[ShardRange] | None  # to read in order (training: then shards drawn with replacement)
    consumed: int  # post-shuffle samples consumed before a resume: dropped undecoded
    batches: int | None  # batches to deliver; None = until the ranges run out


class PlanBoard:
    """The current epoch's plans in shared memory, where DataLoader workers read them.

    Persistent workers are forked once, with a copy of the dataset that never sees attributes the
    main process sets later; this tensor is shared instead of copied. The main process posts only
    while no worker runs a stream (before a loader's first iteration, or after an iteration that ran
    to its end), so a worker never reads a half-written board. Layout, int64: first_stream; per
    stream: seed, consumed, batches (-1: None), range count (-1: resampled); then the ranges'
    (shard, start, stop) triples, stream after stream.
    """

    def __init__(self, streams: int, max_ranges: int) -> None:
        self.streams = streams
        # (1 + 4 * streams + 3 * max_ranges,) int64: sized once, as shared memory cannot grow.
        self.values = torch.zeros(1 + 4 * streams + 3 * max_ranges, dtype=torch.int64).share_memory_()

    def post(self, first_stream: int, plans: list[StreamPlan]) -> None:
        header, ranges = [first_stream], []
        for plan in plans:
            header += [plan.seed, plan.consumed, -1 if plan.batches is None else plan.batches,
                       -1 if plan.ranges is None else len(plan.ranges)]
            ranges += [n for shard_range in plan.ranges or [] for n in shard_range]
        self.values[:len(header) + len(ranges)] = torch.tensor(header + ranges, dtype=torch.int64)

    def read(self, loader_worker: int) -> tuple[int, StreamPlan]:
        """The stream that DataLoader worker `loader_worker` (0 in process) runs, and its plan.

        The DataLoader polls its workers round-robin from worker 0; an epoch resumed mid-way must
        start with the stream whose turn is next, so loader worker i runs stream first_stream + i.
        """
        values = self.values.tolist()
        stream = (values[0] + loader_worker) % self.streams
        seed, consumed, batches, range_count = values[1 + 4 * stream:5 + 4 * stream]
        start = 1 + 4 * self.streams + 3 * sum(max(values[4 + 4 * s], 0) for s in range(stream))
        ranges = None if range_count < 0 else [
            (values[k], values[k + 1], values[k + 2]) for k in range(start, start + 3 * range_count, 3)]
        return stream, StreamPlan(seed, ranges, consumed, None if batches < 0 else batches)


def resampled_shards(urls: list[str], sizes: list[int] | None, rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement, in proportion to their sample counts when the index gives
    them, so that a short last shard's samples are not drawn more often than the others'."""
    while True:
        yield from rng.choices(urls, weights=sizes, k=64)


def exactly_once_ranges(sizes: list[int], order: list[int], parts: int,
                         whole_shards: bool = True) -> list[list[ShardRange]]:
    """Every sample once, divided among `parts` streams as (shard, start, stop) ranges per stream.

    Whole shards when `whole_shards` and there are at least as many non-empty shards as streams
    (largest first, each to the stream with the fewest samples so far); otherwise the shards,
    concatenated in `order`, cut into `parts` contiguous runs of near-equal length (what training
    wants: equal shares for equal batch counts). Depends only on its arguments, so that every rank
    computes the same division without talking to the others.
    """
    nonempty = [i for i in order if sizes[i] > 0]
    ranges: list[list[ShardRange]] = [[] for _ in range(parts)]
    if whole_shards and len(nonempty) >= parts:
        loads = [(0, p) for p in range(parts)]  # a heap of (samples so far, stream)
        for i in sorted(nonempty, key=lambda i: -sizes[i]):  # stable: ties keep the epoch's order
            load, p = heapq.heappop(loads)
            ranges[p].append((i, 0, sizes[i]))
            heapq.heappush(loads, (load + sizes[i], p))
        place_in_order = {i: n for n, i in enumerate(nonempty)}
        return [sorted(r, key=lambda r: place_in_order[r[0]]) for r in ranges]
    total = sum(sizes[i] for i in nonempty)
    bounds = [p * (total // parts) + min(p, total % parts) for p in range(parts + 1)]  # part_size() summed
    shard_start = 0  # the shard's first sample, in the concatenation
    for i in nonempty:
        shard_end = shard_start + sizes[i]
        for p in range(parts):
            start, stop = max(bounds[p], shard_start), min(bounds[p + 1], shard_end)
            if start < stop:
                ranges[p].append((i, start - shard_start, stop - shard_start))
        shard_start = shard_end
    return ranges
