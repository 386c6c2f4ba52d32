"""Streaming WebDataset shards into uint8 batches: the same number of batches on every rank.

`ShardStream` is the one class callers use; it keeps the stream's position and resumes from it.
An epoch runs in three places, in this order:

1. Plan [`vitcore.data.plan`]: the shards, and for each of this rank's streams (one per DataLoader
   worker) a seed, what to read and how many batches to deliver [`ShardStream._plans`], posted on
   a shared board that the workers read.
2. Run [`vitcore.data.pipeline`]: each worker reads its shards through a shuffle buffer, drops what
   a resumed run already consumed, decodes, augments and batches.
3. Count [`ShardStream.__iter__`]: the DataLoader takes the streams' batches round-robin, each
   with its stream's counters, so the main process always knows how many samples every stream has
   consumed and skipped: that, with the epoch and the batches yielded in it, is the position.

Resume is exact: after `load_state_dict` the stream yields the very batches an uninterrupted run
would have, corrupt samples included, provided rank, world_size and num_workers are unchanged.
With the state of another rank (same topology) it is exact when no corrupt sample was met. After a
topology change the rest of the epoch is a fresh resampled stream seeded by the resume position:
statistically equivalent, never a replay of the epoch's beginning.
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader

from vitcore import interrupts
from vitcore.data.pipeline import Batch, BrokenData, RankStreamDataset, Transform
from vitcore.data.plan import (
    PlanBoard,
    ShardRange,
    StreamPlan,
    derive_seed,
    exactly_once_ranges,
    part_size,
    resolve_shards,
)

__all__ = ["Batch", "ShardStream", "derive_seed", "first_batch", "naming", "resolve_shards"]

log = logging.getLogger(__name__)

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
    gets exactly `len(self)` batches. `resampled=False` (evaluation; build it with `exactly_once`):
    each sample exactly once per epoch across all ranks, divided in sample ranges
    (`vitcore.data.plan`); ranks may then get different batch counts, none when there are more
    streams than samples.
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
        transform: Transform,
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
        # The position (see state_dict: each key there is one of these names without the underscore).
        self.epoch = 0
        self._batches = 0  # yielded in this epoch
        self._plans_start = 0  # batch of the epoch where the current plans began (non-zero after a topology change)
        self._stream_consumed: list[int] | None = None  # raw samples each stream consumed since _plans_start
        self._skipped_before = 0  # skips folded in from finished iterations or a loaded checkpoint
        self._stream_skipped = [0] * self._num_streams  # skips reported by the running streams
        self._division_key: tuple[int, int] | None = None  # (seed, epoch) of the cached exactly-once division
        self._division: list[list[ShardRange]] = []
        self._loader: DataLoader | None = None  # kept across epochs with its workers
        self._board: PlanBoard | None = None  # where that loader's workers read their plans
        self._loader_busy = False  # an iteration over it has begun and not run to its end
        if resampled and len(self) == 0:
            raise ValueError(f"{self.epoch_samples} samples make no batch of {batch_size} on {world_size} ranks")

    @classmethod
    def exactly_once(cls, urls: str | list[str], transform: Transform, batch_size: int, *, rank: int = 0,
                     world_size: int = 1, num_workers: int = 2, seed: int = 0, labeled: bool = True,
                     pin_memory: bool = False) -> ShardStream:
        """An evaluation stream: every sample once per epoch over all ranks, none dropped.

        No shuffle buffer: evaluation needs no mixing, and each stream then yields its sample ranges
        in order, so a seed always gives the same first batch. The last short batch is kept, so
        that no sample is lost; shards are not resampled, so that none is seen twice.
        """
        return cls(urls, transform, batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                   seed=seed, labeled=labeled, shuffle_buffer=0, drop_last=False, resampled=False,
                   pin_memory=pin_memory)

    @property
    def skipped(self) -> int:
        """Corrupt samples and broken shards skipped so far on this rank."""
        return self._skipped_before + sum(self._stream_skipped)

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch."""
        if self.resampled:
            return self._batch_count(self.epoch_samples // self.world_size)
        return sum(self._batch_count(sum(stop - start for _, start, stop in ranges)) for ranges in self._rank_ranges())

    def _batch_count(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _epoch_shard_order(self) -> list[int]:
        """All shard indices in this epoch's order, identical on every rank."""
        order = list(range(len(self.urls)))
        random.Random(derive_seed(self.seed, self.epoch, "shard-order")).shuffle(order)
        return order

    def _rank_ranges(self) -> list[list[ShardRange]]:
        """The (shard, start, stop) ranges of each of this rank's streams this epoch: every sample once
        in the world (training streams read theirs first, then top up with draws)."""
        key = (self.seed, self.epoch)
        if self._division_key != key:  # the division of the whole world, the same on every rank
            self._division = exactly_once_ranges(self._shard_samples, self._epoch_shard_order(),
                                                  self.world_size * self._num_streams, whole_shards=not self.resampled)
            self._division_key = key
        # Streams are numbered worker-major, so that small epochs spread over the ranks first.
        return [self._division[s * self.world_size + self.rank] for s in range(self._num_streams)]

    def _plans(self) -> list[StreamPlan]:
        """Each stream's plan for the rest of this epoch, from the position."""
        streams = self._num_streams
        delivered = self._batches - self._plans_start  # batches the current plans' streams delivered
        consumed = self._stream_consumed or [part_size(delivered, streams, s) * self.batch_size
                                             for s in range(streams)]
        plans_batches = len(self) - self._plans_start  # batches the current plans deliver in all
        # a permutation of the epoch when the sample counts are known and the plans start it; else draws
        permuted = self._shard_samples is not None and self._plans_start == 0
        rank_ranges = self._rank_ranges() if permuted or not self.resampled else []
        plans = []
        for s in range(streams):
            seed = derive_seed(self.seed, self.epoch, self.rank, s, self._plans_start)
            if self.resampled:
                batches = part_size(plans_batches, streams, s) - part_size(delivered, streams, s)
                plans.append(StreamPlan(seed, rank_ranges[s] if permuted else None, consumed[s], batches))
            else:
                plans.append(StreamPlan(seed, rank_ranges[s], consumed[s], None))
        return plans

    def _new_loader(self) -> tuple[DataLoader, PlanBoard]:
        """A DataLoader over this rank's streams, with the board its workers read their plans from."""
        # Exactly-once ranges: at most one per shard, plus one per cut between two streams.
        max_ranges = len(self.urls) + self.world_size * self._num_streams
        board = PlanBoard(self._num_streams, max_ranges)
        dataset = RankStreamDataset(board, self.urls, self._shard_samples, self.transform, self.batch_size,
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
        self._skipped_before, self._stream_skipped = self.skipped, [0] * self._num_streams
        if self._loader is None or self._board is None or self._loader_busy:
            # After an iteration broken off mid-epoch, a worker may yet start its stream and read
            # the board: posting on it now could hand that worker a half-written plan. Its output is
            # discarded, but a new loader (new workers, new board) is the simple safe course.
            self._loader, self._board = self._new_loader()
        self._board.post((self._batches - self._plans_start) % self._num_streams, plans)
        self._loader_busy = True
        with _gc_frozen_for_fork():
            messages = iter(self._loader)  # forks the workers on a new loader's first iteration
        while True:
            with interrupts.held():  # a Ctrl-C waits for the transfer (vitcore.interrupts)
                message = next(messages, None)
            if message is None:
                break
            # a batch with its stream's counters, or the counters alone
            stream = message.pop("stream")
            self._stream_consumed[stream] = message.pop("consumed")
            self._stream_skipped[stream] = message.pop("skipped")
            if "error" in message:  # the workers' streams cannot go on (every shard gone, say)
                raise BrokenData(message["error"])
            if "image" in message:
                self._batches += 1
                yield message
        self._loader_busy = False
        self._skipped_before, self._stream_skipped = self.skipped, [0] * self._num_streams
        self.epoch, self._batches, self._plans_start, self._stream_consumed = self.epoch + 1, 0, 0, None

    def close(self) -> None:
        """Stop the DataLoader workers now, not at garbage collection (they are otherwise kept for the
        next epoch); a later `iter()` starts new ones. Close a running iteration (its generator) first:
        it holds the workers too."""
        self._loader, self._board, self._loader_busy = None, None, False

    def state_dict(self) -> dict[str, Any]:
        """The stream position as plain ints (JSON- and weights_only-safe).

        Each key names the attribute holding its value: `key` or, when private, `_key`.
        """
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "seed": self.seed,
            "skipped": self.skipped,
            "plans_start": self._plans_start,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_streams": self._num_streams,
            "batch_size": self.batch_size,
            "epoch_samples": self.epoch_samples,
            # [] rather than None before the first iteration: the state holds plain ints and lists only.
            "stream_consumed": list(self._stream_consumed) if self._stream_consumed is not None else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` position: the next `iter()` yields the batches after it."""
        self.seed, self.epoch, self._batches = int(state["seed"]), int(state["epoch"]), int(state["batches"])
        self._skipped_before, self._stream_skipped = int(state["skipped"]), [0] * self._num_streams
        layout = ("world_size", "num_streams", "batch_size", "epoch_samples")
        same_layout = [state[k] for k in layout] == [self.world_size, self._num_streams, self.batch_size,
                                                     self.epoch_samples]
        consumed = [int(o) for o in state.get("stream_consumed", [])]
        if same_layout:
            self._plans_start = int(state.get("plans_start", 0))
            # Consumed counts are this rank's own; another rank's state only gives the batch count.
            own = state.get("rank") == self.rank and len(consumed) == self._num_streams
            self._stream_consumed = consumed if own else None
            return
        if not self.resampled:
            raise ValueError("an exactly-once stream resumes only with the same world_size, num_workers, "
                             "batch_size and epoch_samples")
        # Samples all ranks consumed this epoch, in batches of the new layout (rounded up: no replay).
        samples = int(state["batches"]) * int(state["batch_size"]) * int(state["world_size"])
        self._batches = min(len(self), -(-samples // (self.batch_size * self.world_size)))
        log.warning("data stream resumed with a different world_size/num_workers/batch_size/epoch_samples: the "
                    "rest of epoch %d is freshly resampled from batch %d", self.epoch, self._batches)
        self._plans_start, self._stream_consumed = self._batches, None


def first_batch(urls: str | list[str], transform: Transform, n: int, labeled: bool) -> Batch:
    """The first `n` samples of the shards, in the order they are stored, as one batch: fixed
    images to draw from while a model trains."""
    stream = ShardStream.exactly_once(urls, transform, n, num_workers=0, labeled=labeled)
    batches = iter(stream)
    try:
        return next(batches)
    finally:
        batches.close()
        stream.close()


@contextmanager
def naming(key: str | None, only: type[Exception] | tuple[type[Exception], ...] = ValueError) -> Iterator[None]:
    """A shard set's error (missing files: FileNotFoundError; no labels, other classes, or `only`)
    raised again with its message led by the config key that named the set."""
    try:
        yield
    except (FileNotFoundError, only) as e:
        if key is None:
            raise
        raise type(e)(f"{key}: {e}") from None
