"""Streaming WebDataset shards into uint8 batches: the same number of batches on every rank.

The plan, step by step in the order the code runs (the function doing each step in brackets):

1. Shards [`resolve_shards`]: a shard folder's index.json (`vitcore.data.index`) gives the shard
   files, their sample counts and the classes; the counts give the epoch length. Local paths, brace
   patterns and `pipe:`/http URLs are accepted too (then `epoch_samples` gives the length).
2. Split over ranks and workers [`ShardStream._plans`]: every rank runs max(num_workers, 1)
   streams, one per DataLoader worker (num_workers=0: one, in this process), each with its own plan:
   a seed derived from (seed, epoch, rank, stream), what to read, and how many batches to deliver.
   Training (`resampled=True`): each stream draws shards with replacement [`_resampled`], and every
   rank gets total // (world_size * batch_size) batches, spread over its streams (the first ones
   take one more when it does not divide) [`_part_size`]. Evaluation (`resampled=False`): the
   world's streams divide the epoch into sample ranges, every sample exactly once (see below)
   [`_exactly_once_ranges`]. The main process posts the plans on a shared board [`_PlanBoard`];
   each stream reads its raw samples [`_read_shards`] through a seeded shuffle buffer [`_shuffled`].
3. Skip what was consumed (resume) [`_drop_consumed`]: a resumed stream drops, undecoded, the
   samples the interrupted run had taken; shuffle and draws are seeded, so these are the same ones.
4. Decode [`_EpochStream._decoded`]: image and label, augmented with torch's RNG seeded by the
   sample's position in its stream, so that a resumed run draws the same crops and flips.
5. Batch [`_EpochStream._batched`]: batch_size samples stacked; the DataLoader takes the streams'
   batches round-robin, each with its stream's counters, so the main process always knows how many
   samples every stream has consumed and skipped [`ShardStream.__iter__`].

Corrupt samples and broken shards are skipped and counted; only data broken throughout stops the
stream with an error (FAILED_SAMPLES_IN_A_ROW failed samples in a row, or BARREN_SHARDS_PER_URL x
len(urls) shards in a row that give no sample).

Resume is exact: after `load_state_dict` the stream yields the very batches an uninterrupted run
would have, corrupt samples included, provided rank, world_size and num_workers are unchanged.
With the state of another rank (same topology) it is exact when no corrupt sample was met. After a
topology change the rest of the epoch is a fresh resampled stream seeded by the resume position:
statistically equivalent, never a replay of the epoch's beginning.

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
through shared memory, the `_PlanBoard`, posted before the epoch's first request.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import logging
import random
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from vitcore.data.index import index_path, is_remote, read_index
from vitcore.data.tar import iter_tar_samples
from vitcore.data.transforms import DECODE_ERRORS, open_image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SAMPLE_ERRORS = (KeyError, *DECODE_ERRORS)
SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)
# A resampled stream whose shards all fail would spin forever; give up after this many in a row.
BARREN_SHARDS_PER_URL = 10
# Likewise for samples: this many failures in a row means the data, not a sample, is broken.
FAILED_SAMPLES_IN_A_ROW = 1000

Batch = dict[str, Any]
_Decoded = tuple[str, Tensor, int | None]  # (key, uint8 (3, H, W) image, label)


def resolve_shards(urls: str | list[str]) -> tuple[list[str], list[int] | None, dict[str, Any] | None]:
    """Shard URLs, their sample counts when an index knows them, and that index.

    Accepts a shard folder or index.json path, local paths, brace patterns (`a-{000..009}.tar`)
    and `pipe:`/http(s) URLs, as a string or a list. Local shards must exist.
    """
    specs = [urls] if isinstance(urls, str) else list(urls)
    if len(specs) == 1 and not is_remote(specs[0]) and (Path(specs[0]).is_dir() or specs[0].endswith(".json")):
        path = index_path(specs[0])
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
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _part_size(total: int, parts: int, i: int) -> int:
    """The size of part i when `total` is split into `parts` near-equal parts, the first ones larger.

    Also the number of batches stream i delivered among the first `total`, since the DataLoader
    takes the streams' batches round-robin.
    """
    return total // parts + (i < total % parts)


@dataclass(frozen=True)
class _StreamPlan:
    """What one stream (one DataLoader worker's, or the in-process one) delivers this epoch."""

    seed: int  # seeds shard draws, sample shuffling and per-sample augmentation
    ranges: list[tuple[int, int, int]] | None  # (shard index, start, stop) to read in order; None = resampled
    consumed: int  # post-shuffle samples consumed before a resume: dropped undecoded
    batches: int | None  # batches to deliver; None = until the ranges run out


@dataclass
class _StreamStats:
    """Per-stream counters, reported with every batch so the main process always has exact totals."""

    stream: int
    consumed: int  # post-shuffle raw samples taken, delivered or skipped
    skipped: int = 0

    def report(self) -> dict[str, int]:
        return {"stream": self.stream, "consumed": self.consumed, "skipped": self.skipped}


class _PlanBoard:
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
        self.values = torch.zeros(1 + 4 * streams + 3 * max_ranges, dtype=torch.int64).share_memory_()

    def post(self, first_stream: int, plans: list[_StreamPlan]) -> None:
        header, ranges = [first_stream], []
        for plan in plans:
            header += [plan.seed, plan.consumed, -1 if plan.batches is None else plan.batches,
                       -1 if plan.ranges is None else len(plan.ranges)]
            ranges += [n for shard_range in plan.ranges or [] for n in shard_range]
        self.values[:len(header) + len(ranges)] = torch.tensor(header + ranges, dtype=torch.int64)

    def read(self, loader_worker: int) -> tuple[int, _StreamPlan]:
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
        return stream, _StreamPlan(seed, ranges, consumed, None if batches < 0 else batches)


def _resampled(urls: list[str], sizes: list[int] | None, rng: random.Random) -> Iterator[str]:
    """Shards drawn with replacement, in proportion to their sample counts when the index gives
    them, so that a short last shard's samples are not drawn more often than the others'."""
    while True:
        yield from rng.choices(urls, weights=sizes, k=64)


def _exactly_once_ranges(sizes: list[int], order: list[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """Every sample once, divided among `parts` streams as (shard, start, stop) ranges per stream.

    Whole shards when there are at least as many non-empty shards as streams (largest first, each
    to the stream with the fewest samples so far); otherwise the shards, concatenated in `order`,
    cut into `parts` contiguous runs of near-equal length. Depends only on its arguments.
    """
    nonempty = [i for i in order if sizes[i] > 0]
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    if len(nonempty) >= parts:
        loads = [(0, p) for p in range(parts)]  # a heap of (samples so far, stream)
        for i in sorted(nonempty, key=lambda i: -sizes[i]):  # stable: ties keep the epoch's order
            load, p = heapq.heappop(loads)
            ranges[p].append((i, 0, sizes[i]))
            heapq.heappush(loads, (load + sizes[i], p))
        place_in_order = {i: n for n, i in enumerate(nonempty)}
        return [sorted(r, key=lambda r: place_in_order[r[0]]) for r in ranges]
    total = sum(sizes[i] for i in nonempty)
    bounds = [p * (total // parts) + min(p, total % parts) for p in range(parts + 1)]  # _part_size() summed
    shard_start = 0  # the shard's first sample, in the concatenation
    for i in nonempty:
        shard_end = shard_start + sizes[i]
        for p in range(parts):
            start, stop = max(bounds[p], shard_start), min(bounds[p + 1], shard_end)
            if start < stop:
                ranges[p].append((i, start - shard_start, stop - shard_start))
        shard_start = shard_end
    return ranges


def _read_shards(ranges: Iterable[tuple[str, int, int | None]], stats: _StreamStats,
                 barren_limit: int) -> Iterator[dict[str, Any]]:
    """Raw samples start..stop-1 of each (url, start, stop) shard range in turn (stop None: to the
    end). A range that fails to open, breaks off or ends before `stop` counts one skip."""
    barren_in_a_row = 0  # ranges that gave no sample
    for url, start, stop in ranges:
        produced = 0
        wanted = None if stop is None else stop - start
        try:
            with gopen(url) as tar_bytes:
                for sample in islice(iter_tar_samples(tar_bytes, skip=start), wanted):
                    produced += 1
                    sample["__url__"] = url
                    yield sample
        except SHARD_ERRORS as exc:
            if produced == wanted:  # a pipe closed before its end may complain: the range is whole
                log.debug("shard %s closed after samples %d..%d: %s", url, start, stop, exc)
            else:
                stats.skipped += 1
                log.warning("skipping the rest of shard %s: %s", url, exc)
        else:
            if wanted is not None and produced < wanted:
                stats.skipped += 1
                log.warning("shard %s ended after %d of its samples %d..%d that the index lists",
                            url, produced, start, stop - 1)
        barren_in_a_row = 0 if produced else barren_in_a_row + 1
        if barren_in_a_row >= barren_limit:
            raise RuntimeError(f"{barren_in_a_row} shards in a row gave no sample (last: {url})")


def _shuffled(samples: Iterator[Any], bufsize: int, rng: random.Random, initial: int = 100) -> Iterator[Any]:
    """The samples in a seeded random order, through a buffer of `bufsize`: the first is yielded
    once min(initial, bufsize) are buffered. The same draws as webdataset's `shuffle` stage (1.0.2),
    so a stream resumes exactly across the switch to this copy."""
    samples, initial, buf = iter(samples), min(initial, bufsize), []
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            buf.extend(islice(samples, 1))  # fill twice as fast as we drain
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list[Any], rng: random.Random) -> Any:
    """Remove and return a random element of `buf` (the last one takes its place)."""
    k = rng.randint(0, len(buf) - 1)
    sample, buf[k] = buf[k], buf[-1]
    buf.pop()
    return sample


def _drop_consumed(samples: Iterator[dict[str, Any]], count: int, stats: _StreamStats) -> Iterator[dict[str, Any]]:
    """Drop the samples a resumed run already consumed, without decoding them."""
    deque(islice(samples, count), maxlen=0)
    # Shard errors met while replaying were already counted in the checkpointed total.
    stats.skipped = 0
    yield from samples


def _collate(samples: list[_Decoded], labeled: bool) -> Batch:
    keys, images, labels = zip(*samples)
    return {
        "image": torch.stack(images),  # (B, 3, H, W) uint8
        "label": torch.tensor(labels, dtype=torch.int64) if labeled else None,
        "key": list(keys),
    }


class _EpochStream(IterableDataset):
    """The streams of one rank; each iteration (one per DataLoader worker, or one in the main
    process) runs one epoch of the stream its worker is given on the board."""

    def __init__(self, board: _PlanBoard, urls: list[str], sizes: list[int] | None, transform: Callable,
                 batch_size: int, labeled: bool, shuffle_buffer: int, drop_last: bool) -> None:
        super().__init__()
        self.board, self.urls, self.sizes, self.transform = board, urls, sizes, transform
        self.batch_size, self.labeled = batch_size, labeled
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last

    def __iter__(self) -> Iterator[Batch]:
        # A generator: the board is read at the first request of the iteration, after it was posted.
        worker_info = get_worker_info()
        stream, plan = self.board.read(0 if worker_info is None else worker_info.id)
        batches = self._stream_batches(stream, plan)
        if worker_info is not None:
            yield from batches
            return
        # In-process: per-sample seeding must not disturb the caller's RNG (dropout, masking).
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _stream_batches(self, stream: int, plan: _StreamPlan) -> Iterator[Batch]:
        stats = _StreamStats(stream, consumed=plan.consumed)
        ranges: Iterable[tuple[str, int, int | None]]
        if plan.ranges is None:
            draws = _resampled(self.urls, self.sizes, random.Random(derive_seed(plan.seed, "shards")))
            ranges = ((url, 0, None) for url in draws)
        else:
            ranges = ((self.urls[shard], start, stop) for shard, start, stop in plan.ranges)
        samples = _read_shards(ranges, stats, barren_limit=BARREN_SHARDS_PER_URL * len(self.urls))
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(derive_seed(plan.seed, "samples")))
        samples = _drop_consumed(samples, plan.consumed, stats)
        batches = self._batched(self._decoded(samples, stats, derive_seed(plan.seed, "augment")))
        for batch in islice(batches, plan.batches):
            yield batch | stats.report()
        yield stats.report()  # end marker: counts the skips after the last batch

    def _decoded(self, samples: Iterator[dict[str, Any]], stats: _StreamStats, seed: int) -> Iterator[_Decoded]:
        failed_in_a_row = 0
        for sample in samples:
            position = stats.consumed
            stats.consumed += 1
            try:
                data = sample[next((k for k in IMAGE_KEYS if k in sample), "jpg")]  # KeyError: no image
                label = int(sample["cls"]) if self.labeled else None
                image = open_image(data)  # header only: the transform decodes, inside this guard
                # Seeding by stream position makes a resumed run draw the same crops and flips.
                torch.default_generator.manual_seed((seed + position) % (1 << 63))
                decoded = sample["__key__"], self.transform(image), label
            except SAMPLE_ERRORS as exc:
                stats.skipped, failed_in_a_row = stats.skipped + 1, failed_in_a_row + 1
                log.warning("skipping sample %s from %s: %r", sample.get("__key__"), sample.get("__url__"), exc)
                if failed_in_a_row >= FAILED_SAMPLES_IN_A_ROW:
                    raise RuntimeError(f"{failed_in_a_row} samples in a row failed (last: {sample.get('__key__')} "
                                       f"from {sample.get('__url__')}: {exc!r}); are these the right shards?") from None
                continue
            failed_in_a_row = 0
            yield decoded

    def _batched(self, samples: Iterator[_Decoded]) -> Iterator[Batch]:
        while True:
            chunk = list(islice(samples, self.batch_size))
            if chunk and (len(chunk) == self.batch_size or not self.drop_last):
                yield _collate(chunk, self.labeled)
            if len(chunk) < self.batch_size:
                return


@contextmanager
def _gc_frozen_for_fork() -> Iterator[None]:
    """Hide this process's objects from the garbage collector of workers forked inside the block.

    A worker inherits the whole heap (torch, the trainer); one full collection there walks all of
    it and copies every page it touches: ~0.3 s per worker started. The parent unfreezes at once.
    """
    if gc.get_freeze_count():  # someone froze objects on purpose: leave their choice alone
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class ShardStream:
    """Batches of uint8 images from WebDataset shards for one process (rank), one epoch per `iter()`.

    Yields {"image": uint8 (B, 3, H, W), "label": int64 (B,) or None, "key": list[str]}.
    `resampled=True` (training): every (rank, worker) draws shards with replacement and every rank
    gets exactly `len(self)` batches. `resampled=False` (evaluation): each sample exactly once per
    epoch across all ranks, divided in sample ranges (module docstring); ranks may then get
    different batch counts, none when there are more streams than samples.
    `transform` maps a PIL image to a uint8 (3, H, W) tensor. It gets the image as `Image.open` left
    it, header read and pixels not decoded (any mode), so that it can pick a JPEG draft scale for
    its crop (see `vitcore.data.transforms`); decode errors it raises count as skipped samples.
    `pin_memory=True` (pass it when training on CUDA) yields batches in page-locked memory, so that
    `.to(device, non_blocking=True)` copies overlap with compute. DataLoader workers are started at
    the first `iter()` and kept for the following epochs.
    """

    def __init__(
        self,
        urls: str | list[str],
        transform: Callable,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        epoch_samples: int | None = None,
        labeled: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        resampled: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad stream layout: batch_size={batch_size} num_workers={num_workers} "
                             f"rank={rank} world_size={world_size}")
        self.urls, self._shard_samples, index = resolve_shards(urls)
        self.classes: list[str] | None = index["classes"] if index else None
        if labeled and index is not None and self.classes is None:
            raise ValueError(f"{urls}: the shards have no labels (index classes is null); pass labeled=False")
        self.epoch_samples = epoch_samples or (sum(self._shard_samples) if self._shard_samples else None)
        if self.epoch_samples is None:
            raise ValueError(f"{urls}: no index.json gives the epoch length; pass epoch_samples")
        if not resampled and self._shard_samples is None:
            raise ValueError(f"{urls}: an exactly-once stream needs index.json (samples per shard)")
        self.transform, self.batch_size, self.labeled = transform, batch_size, labeled
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, seed
        self.shuffle_buffer, self.drop_last, self.resampled = shuffle_buffer, drop_last, resampled
        self.pin_memory = pin_memory
        self._num_streams = max(num_workers, 1)  # num_workers=0 runs one stream in this process
        # The position: epoch, batches yielded in it, and what each stream consumed.
        self.epoch = 0
        self._batches_done = 0  # yielded in this epoch
        self._plans_start = 0  # batch of the epoch where the current plans began (non-zero after a topology change)
        self._stream_consumed: list[int] | None = None  # raw samples each stream consumed since _plans_start
        self._skipped = 0  # skips folded in from finished iterations or checkpoints
        self._stream_skipped = [0] * self._num_streams  # skips reported by the running streams
        self._division_key: tuple[int, int] | None = None  # (seed, epoch) of the cached exactly-once division
        self._division: list[list[tuple[int, int, int]]] = []
        self._loader: DataLoader | None = None  # kept across epochs with its workers
        self._board: _PlanBoard | None = None  # where that loader's workers read their plans
        self._loader_busy = False  # an iteration over it has begun and not run to its end
        if resampled and len(self) == 0:
            raise ValueError(f"{self.epoch_samples} samples make no batch of {batch_size} on {world_size} ranks")

    @property
    def skipped(self) -> int:
        """Corrupt samples and broken shards skipped so far on this rank."""
        return self._skipped + sum(self._stream_skipped)

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch."""
        if self.resampled:
            return self._batch_count(self.epoch_samples // self.world_size)
        return sum(self._batch_count(sum(stop - start for _, start, stop in ranges)) for ranges in self._rank_ranges())

    def _batch_count(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _epoch_shard_order(self) -> list[int]:
        """Exactly-once mode: all shard indices in this epoch's order, identical on every rank."""
        order = list(range(len(self.urls)))
        random.Random(derive_seed(self.seed, self.epoch, "shard-order")).shuffle(order)
        return order

    def _rank_ranges(self) -> list[list[tuple[int, int, int]]]:
        """Exactly-once mode: the (shard, start, stop) ranges of each of this rank's streams this epoch."""
        key = (self.seed, self.epoch)
        if self._division_key != key:  # the division of the whole world, the same on every rank
            self._division = _exactly_once_ranges(self._shard_samples, self._epoch_shard_order(),
                                                  self.world_size * self._num_streams)
            self._division_key = key
        # Streams are numbered worker-major, so that small epochs spread over the ranks first.
        return [self._division[s * self.world_size + self.rank] for s in range(self._num_streams)]

    def _plans(self) -> list[_StreamPlan]:
        """Each stream's plan for the rest of this epoch, from the position."""
        streams = self._num_streams
        delivered = self._batches_done - self._plans_start  # batches the current plans' streams delivered
        consumed = self._stream_consumed or [_part_size(delivered, streams, s) * self.batch_size
                                             for s in range(streams)]
        plans_batches = len(self) - self._plans_start  # batches the current plans deliver in all
        rank_ranges = self._rank_ranges() if not self.resampled else []
        plans = []
        for s in range(streams):
            seed = derive_seed(self.seed, self.epoch, self.rank, s, self._plans_start)
            if self.resampled:
                batches = _part_size(plans_batches, streams, s) - _part_size(delivered, streams, s)
                plans.append(_StreamPlan(seed, None, consumed[s], batches))
            else:
                plans.append(_StreamPlan(seed, rank_ranges[s], consumed[s], None))
        return plans

    def _new_loader(self) -> tuple[DataLoader, _PlanBoard]:
        """A DataLoader over this rank's streams, with the board its workers read their plans from."""
        # Exactly-once ranges: at most one per shard, plus one per cut between two streams.
        max_ranges = 0 if self.resampled else len(self.urls) + self.world_size * self._num_streams
        board = _PlanBoard(self._num_streams, max_ranges)
        dataset = _EpochStream(board, self.urls, self._shard_samples, self.transform, self.batch_size,
                               self.labeled, self.shuffle_buffer, self.drop_last)
        # A private generator: creating the loader's iterator would otherwise draw its base seed
        # from the global RNG, shifting the training RNG (MPP masking) by where iteration began.
        # (That seed reaches no sample: streams seed their own RNGs from their plans.)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, "loader"))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=self.num_workers > 0, generator=generator)
        return loader, board

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (or its rest, after a resume or an interrupted iteration); then the next epoch."""
        plans = self._plans()
        self._stream_consumed = [p.consumed for p in plans]
        self._skipped, self._stream_skipped = self.skipped, [0] * self._num_streams
        if self._loader is None or self._board is None or self._loader_busy:
            # After an iteration broken off mid-epoch, a worker may yet start its stream and read
            # the board: posting on it now could hand that worker a half-written plan. Its output is
            # discarded, but a new loader (new workers, new board) is the simple safe course.
            self._loader, self._board = self._new_loader()
        self._board.post((self._batches_done - self._plans_start) % self._num_streams, plans)
        self._loader_busy = True
        with _gc_frozen_for_fork():
            messages = iter(self._loader)  # forks the workers on a new loader's first iteration
        for message in messages:  # a batch with its stream's counters, or the counters alone
            stream = message.pop("stream")
            self._stream_consumed[stream] = message.pop("consumed")
            self._stream_skipped[stream] = message.pop("skipped")
            if "image" in message:
                self._batches_done += 1
                yield message
        self._loader_busy = False
        self._skipped, self._stream_skipped = self.skipped, [0] * self._num_streams
        self.epoch, self._batches_done, self._plans_start, self._stream_consumed = self.epoch + 1, 0, 0, None

    def state_dict(self) -> dict[str, Any]:
        """The stream position as plain ints (JSON- and weights_only-safe)."""
        return {
            "epoch": self.epoch,
            "batches": self._batches_done,
            "seed": self.seed,
            "skipped": self.skipped,
            "segment": self._plans_start,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self._num_streams,
            "batch_size": self.batch_size,
            "epoch_samples": self.epoch_samples,
            "offsets": list(self._stream_consumed) if self._stream_consumed is not None else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` position: the next `iter()` yields the batches after it."""
        self.seed, self.epoch, self._batches_done = int(state["seed"]), int(state["epoch"]), int(state["batches"])
        self._skipped, self._stream_skipped = int(state["skipped"]), [0] * self._num_streams
        layout = ("world_size", "num_workers", "batch_size", "epoch_samples")
        same_layout = [state[k] for k in layout] == [self.world_size, self._num_streams, self.batch_size,
                                                     self.epoch_samples]
        consumed = [int(o) for o in state.get("offsets", [])]
        if same_layout:
            self._plans_start = int(state.get("segment", 0))
            # Consumed counts are this rank's own; another rank's state only gives the batch count.
            own = state.get("rank") == self.rank and len(consumed) == self._num_streams
            self._stream_consumed = consumed if own else None
            return
        if not self.resampled:
            raise ValueError("an exactly-once stream resumes only with the same world_size, num_workers, "
                             "batch_size and epoch_samples")
        # Samples all ranks consumed this epoch, in batches of the new layout (rounded up: no replay).
        samples = int(state["batches"]) * int(state["batch_size"]) * int(state["world_size"])
        self._batches_done = min(len(self), -(-samples // (self.batch_size * self.world_size)))
        log.warning("data stream resumed with a different world_size/num_workers/batch_size/epoch_samples: the "
                    "rest of epoch %d is freshly resampled from batch %d", self.epoch, self._batches_done)
        self._plans_start, self._stream_consumed = self._batches_done, None
