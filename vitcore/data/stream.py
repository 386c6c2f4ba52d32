"""Streaming WebDataset shards into uint8 batches: the same number of batches on every rank.

Each (rank, worker) pair runs its own deterministic stream, seeded by (seed, epoch, rank, worker):

    shards (resampled with replacement, or this worker's sample ranges) -> raw samples -> shuffle buffer
      -> [resume: drop already-consumed samples, undecoded] -> decode + augment -> batch

Epoch length comes from index.json: every rank gets total // (world_size * batch_size) batches,
spread over its workers (the first ones take one more when it does not divide). Corrupt samples
and broken shards are skipped and counted; only data broken throughout stops the stream with an
error (FAILED_SAMPLES_IN_A_ROW failed samples in a row, or BARREN_SHARDS_PER_URL x len(urls)
shards in a row that give no sample).

Resume is exact: augmentation is seeded per sample by its stream position, each worker reports
how many raw samples it has consumed, and a resumed worker drops exactly those before decoding.
So after `load_state_dict` the stream yields the very batches an uninterrupted run would have,
corrupt samples included, provided rank, world_size and num_workers are unchanged. With the
state of another rank (same topology) it is exact when no corrupt sample was met. After a
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
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import json
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

from vitcore.data.tar import iter_tar_samples
from vitcore.data.transforms import DECODE_ERRORS, open_image

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"  # beside the shards, written by vitcore.data.shards
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SAMPLE_ERRORS = (KeyError, *DECODE_ERRORS)
SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError)
# A resampled stream whose shards all fail would spin forever; give up after this many in a row.
BARREN_SHARDS_PER_URL = 10
# Likewise for samples: this many failures in a row means the data, not a sample, is broken.
FAILED_SAMPLES_IN_A_ROW = 1000

Batch = dict[str, Any]
_Decoded = tuple[str, Tensor, int | None]  # (key, uint8 (3, H, W) image, label)


def read_index(shard_dir_or_index_path: str | Path) -> dict[str, Any]:
    """Load the index.json of a shard folder (or at that path) written by `write_shards`."""
    path = Path(shard_dir_or_index_path)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"shard index not found: {path}")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}); write the shards again with "
                         "`python -m vitcore.data.shards`") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} is not a shard index (a JSON object)")
    missing = {"shards", "total", "classes"} - index.keys()
    if missing:
        raise ValueError(f"{path} is not a shard index (missing {sorted(missing)})")
    return index


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def resolve_shards(urls: str | list[str]) -> tuple[list[str], list[int] | None, dict[str, Any] | None]:
    """Shard URLs, their sample counts when an index knows them, and that index.

    Accepts a shard folder or index.json path, local paths, brace patterns (`a-{000..009}.tar`)
    and `pipe:`/http(s) URLs, as a string or a list. Local shards must exist.
    """
    specs = [urls] if isinstance(urls, str) else list(urls)
    if len(specs) == 1 and not _is_remote(specs[0]) and (Path(specs[0]).is_dir() or specs[0].endswith(".json")):
        index = read_index(specs[0])
        base = (Path(specs[0]) if Path(specs[0]).is_dir() else Path(specs[0]).parent).resolve()
        names = [s["name"] for s in index["shards"]]
        # An index is data, not a command: its names must be plain files beside it, never a
        # `pipe:` or URL that gopen would run or fetch (absolute paths also keep gopen local).
        bad = next((n for n in names if not isinstance(n, str) or Path(n).name != n or _is_remote(n)), None)
        if bad is not None:
            raise ValueError(f"{base / INDEX_NAME}: shard name {bad!r} is not a file name in that folder")
        return [str(base / n) for n in names], [s["samples"] for s in index["shards"]], index
    expanded = [url for spec in specs for url in braceexpand(spec)]
    if not expanded:
        raise ValueError("no shards given")
    local = [Path(u) for u in expanded if not _is_remote(u)]
    missing = [str(p) for p in local if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    # Local shards from one folder: take their sizes from the index beside them, if it lists them all.
    folders = {p.parent for p in local}
    if len(local) == len(expanded) and len(folders) == 1 and (folders.pop() / INDEX_NAME).is_file():
        index = read_index(local[0].parent)
        sizes = {s["name"]: s["samples"] for s in index["shards"]}
        if all(p.name in sizes for p in local):
            return expanded, [sizes[p.name] for p in local], index
    return expanded, None, None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and Python runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def share(total: int, parts: int, i: int) -> int:
    """Part i of `total` split into `parts` near-equal parts, the first ones larger.

    Also the number of batches worker i delivered among the first `total`, since the DataLoader
    takes worker batches round-robin.
    """
    return total // parts + (i < total % parts)


@dataclass(frozen=True)
class _WorkerPlan:
    """What one worker streams this epoch."""

    seed: int  # seeds shard draws, sample shuffling and per-sample augmentation
    ranges: list[tuple[str, int, int]] | None  # this worker's (url, start, stop) in order; None = resampled
    skip: int  # post-shuffle samples already consumed before a resume, dropped undecoded
    batches: int | None  # batches to deliver; None = until the shards run out


@dataclass
class _WorkerStats:
    """Per-worker counters, reported with every batch so the main process always has exact totals."""

    worker: int
    consumed: int  # post-shuffle raw samples taken, delivered or skipped
    skipped: int = 0

    def report(self) -> dict[str, int]:
        return {"worker": self.worker, "consumed": self.consumed, "skipped": self.skipped}


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
    shards = [i for i in order if sizes[i] > 0]
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    if len(shards) >= parts:
        loads = [(0, p) for p in range(parts)]  # a heap of (samples so far, stream)
        for i in sorted(shards, key=lambda i: -sizes[i]):  # stable: ties keep the epoch's order
            load, p = heapq.heappop(loads)
            ranges[p].append((i, 0, sizes[i]))
            heapq.heappush(loads, (load + sizes[i], p))
        rank_in_order = {i: n for n, i in enumerate(shards)}
        return [sorted(r, key=lambda r: rank_in_order[r[0]]) for r in ranges]
    total = sum(sizes[i] for i in shards)
    bounds = [p * (total // parts) + min(p, total % parts) for p in range(parts + 1)]  # share() summed
    first = 0  # of the shard, in the concatenation
    for i in shards:
        last = first + sizes[i]
        for p in range(parts):
            start, stop = max(bounds[p], first), min(bounds[p + 1], last)
            if start < stop:
                ranges[p].append((i, start - first, stop - first))
        first = last
    return ranges


def _read_shards(ranges: Iterable[tuple[str, int, int | None]], stats: _WorkerStats,
                 barren_limit: int) -> Iterator[dict[str, Any]]:
    """Raw samples start..stop-1 of each (url, start, stop) shard range in turn (stop None: to the
    end). A range that fails to open, breaks off or ends before `stop` counts one skip."""
    barren = 0
    for url, start, stop in ranges:
        produced = 0
        wanted = None if stop is None else stop - start
        try:
            with gopen(url) as stream:
                for sample in islice(iter_tar_samples(stream, skip=start), wanted):
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
        barren = 0 if produced else barren + 1
        if barren >= barren_limit:
            raise RuntimeError(f"{barren} shards in a row gave no sample (last: {url})")


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


def _drop_consumed(samples: Iterator[dict[str, Any]], count: int, stats: _WorkerStats) -> Iterator[dict[str, Any]]:
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
    """One epoch of one rank; each DataLoader worker (or the main process) runs its own plan."""

    def __init__(self, plans: list[_WorkerPlan], first: int, urls: list[str], sizes: list[int] | None,
                 transform: Callable, batch_size: int, labeled: bool, shuffle_buffer: int, drop_last: bool) -> None:
        super().__init__()
        self.plans, self.first, self.urls, self.sizes, self.transform = plans, first, urls, sizes, transform
        self.batch_size, self.labeled = batch_size, labeled
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        # The DataLoader polls its workers round-robin from worker 0; a resumed epoch must start
        # with the stream whose turn is next, so loader worker i runs stream first + i.
        stream = (self.first + (0 if info is None else info.id)) % len(self.plans)
        batches = self._worker_batches(stream, self.plans[stream])
        if info is not None:
            yield from batches
            return
        # In-process: per-sample seeding must not disturb the caller's RNG (dropout, masking).
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _worker_batches(self, worker: int, plan: _WorkerPlan) -> Iterator[Batch]:
        stats = _WorkerStats(worker, consumed=plan.skip)
        ranges: Iterable[tuple[str, int, int | None]] | None = plan.ranges
        if ranges is None:
            draws = _resampled(self.urls, self.sizes, random.Random(derive_seed(plan.seed, "shards")))
            ranges = ((url, 0, None) for url in draws)
        samples = _read_shards(ranges, stats, barren_limit=BARREN_SHARDS_PER_URL * len(self.urls))
        if self.shuffle_buffer > 1:
            samples = _shuffled(samples, self.shuffle_buffer, random.Random(derive_seed(plan.seed, "samples")))
        samples = _drop_consumed(samples, plan.skip, stats)
        batches = self._batches(self._decoded(samples, stats, derive_seed(plan.seed, "augment")))
        for batch in islice(batches, plan.batches):
            yield batch | stats.report()
        yield stats.report()  # end marker: counts the skips after the last batch

    def _decoded(self, samples: Iterator[dict[str, Any]], stats: _WorkerStats, seed: int) -> Iterator[_Decoded]:
        failed = 0  # in a row
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
                stats.skipped, failed = stats.skipped + 1, failed + 1
                log.warning("skipping sample %s from %s: %r", sample.get("__key__"), sample.get("__url__"), exc)
                if failed >= FAILED_SAMPLES_IN_A_ROW:
                    raise RuntimeError(f"{failed} samples in a row failed (last: {sample.get('__key__')} from "
                                       f"{sample.get('__url__')}: {exc!r}); are these the right shards?") from None
                continue
            failed = 0
            yield decoded

    def _batches(self, samples: Iterator[_Decoded]) -> Iterator[Batch]:
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
    it and copies every page it touches: ~0.3 s per worker per epoch. The parent unfreezes at once.
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
        self._streams = max(num_workers, 1)  # num_workers=0 runs one stream in this process
        self.epoch = 0
        self._batches = 0  # consumed in this epoch
        self._segment = 0  # batch at which the current streams started (non-zero after a topology change)
        self._offsets: list[int] | None = None  # raw samples each worker consumed in this segment
        self._skipped = 0  # skips folded in from finished iterations or checkpoints
        self._worker_skipped = [0] * self._streams  # skips reported by the running workers
        self._ranges_for: tuple[int, int] | None = None  # (seed, epoch) of the cached exactly-once division
        self._ranges: list[list[tuple[int, int, int]]] = []
        if resampled and len(self) == 0:
            raise ValueError(f"{self.epoch_samples} samples make no batch of {batch_size} on {world_size} ranks")

    @property
    def skipped(self) -> int:
        """Corrupt samples and broken shards skipped so far on this rank."""
        return self._skipped + sum(self._worker_skipped)

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch."""
        if self.resampled:
            return self._batches_in(self.epoch_samples // self.world_size)
        return sum(self._batches_in(sum(stop - start for _, start, stop in ranges)) for ranges in self._my_ranges())

    def _batches_in(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _epoch_shard_ids(self) -> list[int]:
        """Exactly-once mode: all shards in this epoch's order, identical on every rank."""
        ids = list(range(len(self.urls)))
        random.Random(derive_seed(self.seed, self.epoch, "shard-order")).shuffle(ids)
        return ids

    def _my_ranges(self) -> list[list[tuple[int, int, int]]]:
        """Exactly-once mode: each of this rank's workers' (shard, start, stop) ranges this epoch."""
        key = (self.seed, self.epoch)
        if self._ranges_for != key:  # the division of the whole world, the same on every rank
            division = _exactly_once_ranges(self._shard_samples, self._epoch_shard_ids(),
                                            self.world_size * self._streams)
            self._ranges_for, self._ranges = key, division
        # Streams are numbered worker-major, so that small epochs spread over the ranks first.
        return [self._ranges[w * self.world_size + self.rank] for w in range(self._streams)]

    def _plans(self) -> list[_WorkerPlan]:
        done = self._batches - self._segment  # batches the current streams have delivered
        offsets = self._offsets or [share(done, self._streams, w) * self.batch_size for w in range(self._streams)]
        remaining = len(self) - self._segment
        mine = self._my_ranges() if not self.resampled else []
        plans = []
        for w in range(self._streams):
            seed = derive_seed(self.seed, self.epoch, self.rank, w, self._segment)
            if self.resampled:
                batches = share(remaining, self._streams, w) - share(done, self._streams, w)
                plan = _WorkerPlan(seed, None, offsets[w], batches)
            else:
                ranges = [(self.urls[i], start, stop) for i, start, stop in mine[w]]
                plan = _WorkerPlan(seed, ranges, offsets[w], None)
            plans.append(plan)
        return plans

    def __iter__(self) -> Iterator[Batch]:
        """One epoch (or its rest, after a resume or an interrupted iteration); then the next epoch."""
        plans = self._plans()
        self._offsets = [p.skip for p in plans]
        self._skipped, self._worker_skipped = self.skipped, [0] * self._streams
        first = (self._batches - self._segment) % self._streams
        dataset = _EpochStream(plans, first, self.urls, self._shard_samples, self.transform, self.batch_size,
                               self.labeled, self.shuffle_buffer, self.drop_last)
        # A private generator: creating the loader's iterator would otherwise draw its base seed
        # from the global RNG, shifting the training RNG (MPP masking) by where iteration began.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, self.epoch, "loader"))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            generator=generator)
        with _gc_frozen_for_fork():
            items = iter(loader)  # forks the workers
        for item in items:
            worker = item.pop("worker")
            self._offsets[worker] = item.pop("consumed")
            self._worker_skipped[worker] = item.pop("skipped")
            if "image" in item:
                self._batches += 1
                yield item
        self._skipped, self._worker_skipped = self.skipped, [0] * self._streams
        self.epoch, self._batches, self._segment, self._offsets = self.epoch + 1, 0, 0, None

    def state_dict(self) -> dict[str, Any]:
        """The stream position as plain ints (JSON- and weights_only-safe)."""
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "seed": self.seed,
            "skipped": self.skipped,
            "segment": self._segment,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self._streams,
            "batch_size": self.batch_size,
            "epoch_samples": self.epoch_samples,
            "offsets": list(self._offsets) if self._offsets is not None else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` position: the next `iter()` yields the batches after it."""
        self.seed, self.epoch, self._batches = int(state["seed"]), int(state["epoch"]), int(state["batches"])
        self._skipped, self._worker_skipped = int(state["skipped"]), [0] * self._streams
        layout = ("world_size", "num_workers", "batch_size", "epoch_samples")
        same_layout = [state[k] for k in layout] == [self.world_size, self._streams, self.batch_size, self.epoch_samples]
        offsets = [int(o) for o in state.get("offsets", [])]
        if same_layout:
            self._segment = int(state.get("segment", 0))
            # Offsets are this rank's own; another rank's state only gives the batch count.
            self._offsets = offsets if state.get("rank") == self.rank and len(offsets) == self._streams else None
            return
        if not self.resampled:
            raise ValueError("an exactly-once stream resumes only with the same world_size, num_workers, "
                             "batch_size and epoch_samples")
        # Samples all ranks consumed this epoch, in batches of the new layout (rounded up: no replay).
        consumed = int(state["batches"]) * int(state["batch_size"]) * int(state["world_size"])
        self._batches = min(len(self), -(-consumed // (self.batch_size * self.world_size)))
        log.warning("data stream resumed with a different world_size/num_workers/batch_size/epoch_samples: the "
                    "rest of epoch %d is freshly resampled from batch %d", self.epoch, self._batches)
        self._segment, self._offsets = self._batches, None
