"""The shard writer's encoding stage: source records -> RGB JPEG samples, in one process or N; and
how many processes and which task this is, from the launcher or SLURM.

Decoding, resizing and re-encoding is nearly all of a shard writer's CPU time, and each image is
independent of the others, so N worker processes do it. Everything that decides what the output
looks like (the record order, where a shard ends, which images are skipped) stays in the parent,
which consumes the results strictly in submission order: the shards are byte-identical for any N.

Memory is bounded: records are sent in chunks, and at most `2 x workers` chunks are in flight
(submitted, not yet written); the parent reads the source only as fast as it writes shards.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice

from PIL import Image, ImageOps

from vitcore.data.sources import Record
from vitcore.data.transforms import DECODE_ERRORS, decode_image

MAX_CHUNK = 16  # records per task: big enough to amortise the pickling round trip, small for memory
CHUNKS_PER_WORKER = 2  # in flight: one being encoded, one queued so that no worker waits on the parent
# PIL names the buffer it failed to read ("cannot identify image file <_io.BytesIO object at 0x7f..>"):
# a memory address, which would make skipped.txt differ between runs and processes.
_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Encoded:
    """One record after encoding: its files, or why it was skipped (`error`, files None)."""

    key: str
    files: dict[str, bytes] | None
    error: str | None


def encode_jpeg(image: bytes | Image.Image, resize: int | None, quality: int) -> bytes:
    """Re-encode an image as RGB JPEG, shrinking its shorter side to `resize` (never enlarging)."""
    if isinstance(image, bytes):
        image = decode_image(image, (resize, resize) if resize else None)
    else:
        image = image.convert("RGB")
    # Re-encoding drops EXIF, so the orientation has to be baked into the pixels now.
    ImageOps.exif_transpose(image, in_place=True)
    if resize and min(image.size) > resize:
        scale = resize / min(image.size)
        size = (max(resize, round(image.width * scale)), max(resize, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_record(record: Record, resize: int | None, quality: int) -> Encoded:
    """A record's shard files (`jpg`, and `cls` when labeled), or the one-line reason it is unreadable."""
    try:
        files = {"jpg": encode_jpeg(record.image, resize, quality)}
    except DECODE_ERRORS as exc:  # only a broken image is skipped; anything else is a real error
        return Encoded(record.key, None, _ADDRESS.sub("", f"{type(exc).__name__}: {exc}"))
    if record.label is not None:
        files["cls"] = str(record.label).encode()
    return Encoded(record.key, files, None)


def _encode_chunk(chunk: list[Record], resize: int | None, quality: int) -> list[Encoded]:
    return [encode_record(r, resize, quality) for r in chunk]


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the writer dies. A SIGKILLed parent closes no pipes
    the workers wait on (they share the task queue's ends), so without this they would live on.
    Ctrl-C is left to the parent, which then shuts the pool down (no traceback from every worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def chunk_size(workers: int, samples_per_shard: int | None) -> int:
    """Records per task: up to MAX_CHUNK, but small enough that everything in flight (2 chunks per
    worker) is no more than about one shard's samples."""
    if samples_per_shard is None:
        return MAX_CHUNK
    return max(1, min(MAX_CHUNK, samples_per_shard // (CHUNKS_PER_WORKER * workers)))


def encode_records(records: Iterable[Record], resize: int | None, quality: int, workers: int,
                   chunk: int = MAX_CHUNK) -> Iterator[Encoded]:
    """`encode_record` over `records`, in their order, using `workers` processes (1: this process)."""
    if workers <= 1:
        for record in records:
            yield encode_record(record, resize, quality)
        return
    # fork: workers start in milliseconds and inherit the imports; spawn where there is no fork.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    it = iter(records)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending: deque[Future[list[Encoded]]] = deque()
        try:
            while True:
                # Top the window up, then hand back the oldest chunk: results leave in input order.
                while len(pending) < CHUNKS_PER_WORKER * workers:
                    batch = list(islice(it, chunk))
                    if not batch:
                        break
                    pending.append(pool.submit(_encode_chunk, batch, resize, quality))
                if not pending:
                    return
                yield from pending.popleft().result()
        finally:
            for future in pending:  # an error or a closed generator: drop the queued work
                future.cancel()


def default_workers() -> int:
    """The CPUs this process may use (its affinity: a SLURM allocation or a container's share), divided
    among the local processes of a launch (`LOCAL_WORLD_SIZE`, set by accelerate launch and torchrun)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def task_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(num_tasks, task_index) from a SLURM array (`--array=0-N`, any contiguous range or step) or a
    launch with one process per rank (`RANK`/`WORLD_SIZE`: accelerate launch, torchrun); (1, 0) otherwise."""
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
        return int(env["SLURM_ARRAY_TASK_COUNT"]), (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"])
    return 1, 0
