"""The worker side of a stream: one plan in, raw shard bytes through to uint8 batches out.

Each DataLoader worker (or the main process, num_workers=0) iterates `RankStreamDataset`, reads
its stream's plan from the board (`vitcore.data.plan`) and runs these steps, in this order (the
function doing each step in brackets):

1. Read [`_read_shards`]: the stream's shards, drawn with replacement or its exactly-once ranges,
   as raw samples, through a seeded shuffle buffer [`_shuffled`].
2. Skip what was consumed (resume) [`_drop_consumed`]: a resumed stream drops, undecoded, the
   samples the interrupted run had taken; shuffle and draws are seeded, so these are the same ones.
3. Decode [`RankStreamDataset._decoded`]: image and label, augmented with torch's RNG seeded by the
   sample's position in its stream, so that a resumed run draws the same crops and flips.
4. Batch [`RankStreamDataset._batched`]: batch_size samples stacked; each batch goes out with its
   stream's counters [`StreamStats`], so that the main process (`ShardStream.__iter__`) always
   knows how many samples every stream has consumed and skipped.

Corrupt samples and broken shards are skipped and counted; only data broken throughout stops the
stream with an error (FAILED_SAMPLES_IN_A_ROW failed samples in a row, or BARREN_SHARDS_PER_URL x
len(urls) shards in a row that give no sample).
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen

from vitcore.data.plan import PlanBoard, StreamPlan, derive_seed, resampled_shards
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

Batch = dict[str, Any]  # {"image": uint8 (B, 3, H, W), "label": int64 (B,) or None, "key": list[str]}
Sample = dict[str, Any]  # one raw tar sample: {"__key__": str, "__url__": str, ext: bytes, ...}
Transform = Callable[[Image.Image], Tensor]  # an opened, undecoded image -> uint8 (3, H, W)
UrlRange = tuple[str, int, int | None]  # (shard url, first sample, stop or None: to the shard's end)
_Decoded = tuple[str, Tensor, int | None]  # (key, uint8 (3, H, W) image, label)
_T = TypeVar("_T")


class BrokenData(ValueError):
    """The stream cannot go on: no shard gives a sample (they vanished), or every sample fails."""


@dataclass
class StreamStats:
    """Per-stream counters, reported with every batch so the main process always has exact totals."""

    stream: int
    consumed: int  # post-shuffle raw samples taken, delivered or skipped
    skipped: int = 0

    def report(self) -> dict[str, int]:
        return {"stream": self.stream, "consumed": self.consumed, "skipped": self.skipped}


def _read_shards(ranges: Iterable[UrlRange], stats: StreamStats, barren_limit: int) -> Iterator[Sample]:
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
            raise BrokenData(f"{barren_in_a_row} shards in a row gave no sample (last: {url})")


def _shuffled(samples: Iterable[_T], bufsize: int, rng: random.Random, initial: int = 100) -> Iterator[_T]:
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


def _pick(buf: list[_T], rng: random.Random) -> _T:
    """Remove and return a random element of `buf` (the last one takes its place: O(1), no shift)."""
    k = rng.randint(0, len(buf) - 1)
    sample, buf[k] = buf[k], buf[-1]
    buf.pop()
    return sample


def _drop_consumed(samples: Iterator[Sample], count: int, stats: StreamStats) -> Iterator[Sample]:
    """Drop the samples a resumed run already consumed, without decoding them."""
    deque(islice(samples, count), maxlen=0)
    # Shard errors met while replaying were already counted in the checkpointed total.
    stats.skipped = 0
    yield from samples


def _collate(samples: list[_Decoded], labeled: bool) -> Batch:
    keys, images, labels = zip(*samples)
    return {
        "image": torch.stack(images),  # B x (3, H, W) -> (B, 3, H, W) uint8
        "label": torch.tensor(labels, dtype=torch.int64) if labeled else None,  # (B,)
        "key": list(keys),
    }


class RankStreamDataset(IterableDataset):
    """One rank's streams as a DataLoader dataset: each iteration (one per DataLoader worker, or
    one in the main process) runs one epoch of the stream the board assigns to its worker."""

    def __init__(self, board: PlanBoard, urls: list[str], sizes: list[int] | None, transform: Transform,
                 batch_size: int, labeled: bool, shuffle_buffer: int, drop_last: bool) -> None:
        super().__init__()
        self.board, self.urls, self.sizes, self.transform = board, urls, sizes, transform
        self.batch_size, self.labeled = batch_size, labeled
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches, each merged with its stream's counters, then the counters alone (end marker)."""
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

    def _stream_batches(self, stream: int, plan: StreamPlan) -> Iterator[dict[str, Any]]:
        stats = StreamStats(stream, consumed=plan.consumed)
        samples = self._shuffled_read(((self.urls[shard], start, stop) for shard, start, stop in plan.ranges or []),
                                      stats, derive_seed(plan.seed, "samples"))
        if plan.batches is not None:  # training: after its share of the epoch (if any), shards drawn with replacement
            draws = resampled_shards(self.urls, self.sizes, random.Random(derive_seed(plan.seed, "shards")))
            # shuffled apart: mixed into the share's buffer, draws would crowd out the share's last samples
            samples = chain(samples, self._shuffled_read(((url, 0, None) for url in draws), stats,
                                                         derive_seed(plan.seed, "draws")))
        samples = _drop_consumed(samples, plan.consumed, stats)
        batches = self._batched(self._decoded(samples, stats, derive_seed(plan.seed, "augment")))
        try:
            for batch in islice(batches, plan.batches):
                yield batch | stats.report()
        except BrokenData as e:  # as data: it leaves a DataLoader worker as its one line, not a traceback
            yield {"error": str(e)} | stats.report()
            return
        yield stats.report()  # end marker: counts the skips after the last batch

    def _shuffled_read(self, ranges: Iterable[UrlRange], stats: StreamStats, seed: int) -> Iterator[Sample]:
        samples = _read_shards(ranges, stats, barren_limit=BARREN_SHARDS_PER_URL * len(self.urls))
        if self.shuffle_buffer > 1:  # a buffer of one would keep the order: skip its RNG draws
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(seed))
        return samples

    def _decoded(self, samples: Iterator[Sample], stats: StreamStats, seed: int) -> Iterator[_Decoded]:
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
                decoded = sample["__key__"], self.transform(image), label  # image: uint8 (3, H, W)
            except SAMPLE_ERRORS as exc:
                stats.skipped, failed_in_a_row = stats.skipped + 1, failed_in_a_row + 1
                log.warning("skipping sample %s from %s: %r", sample.get("__key__"), sample.get("__url__"), exc)
                if failed_in_a_row >= FAILED_SAMPLES_IN_A_ROW:
                    raise BrokenData(f"{failed_in_a_row} samples in a row failed (last: {sample.get('__key__')} "
                                       f"from {sample.get('__url__')}: {exc!r}); are these the right shards?") from None
                continue
            failed_in_a_row = 0
            yield decoded

    def _batched(self, samples: Iterator[_Decoded]) -> Iterator[Batch]:
        while True:
            chunk = list(islice(samples, self.batch_size))
            # A short last chunk is an epoch's tail: kept for evaluation, dropped in training.
            if chunk and (len(chunk) == self.batch_size or not self.drop_last):
                yield _collate(chunk, self.labeled)
            if len(chunk) < self.batch_size:
                return
