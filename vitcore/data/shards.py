"""The shard writer: any image source -> WebDataset tar shards (`jpg` + `cls`) plus `index.json`.

    python -m vitcore.data.shards --source imagenette2-224.tar --split train --out shards/train --resize 80
    vit-shards --source torchvision:CIFAR10 --out shards/cifar10-train --samples-per-shard 5000

Samples are shuffled (by index, before anything is decoded) so each shard mixes classes, and every
image is re-encoded as an RGB JPEG. Unreadable images are skipped and listed in `skipped.txt`.

`--workers N` (default: all CPUs) decodes, resizes and re-encodes in N processes; the parent reads
the source, and cuts and writes the shards in the seeded order, so every output byte (shards,
skipped.txt, index.json but for its `created` time) is the same for any N, with `--max-bytes` too:
a byte limit is decided in the parent from the encoded sizes, in order, exactly as with one worker.
About one shard's samples (at most 2 x 16 records per worker) are in flight at any time.

A killed writer resumes: run it again with the same arguments (any `--workers`) and it keeps the
shards it finished (checked against their recorded size and sample count), skips the source
records they consumed and writes the rest; `.writer-progress.json` records how (see
`vitcore.data.shard_resume`). Other arguments are refused with one line naming them, and nothing
is touched; `--overwrite` discards the old progress and writes the folder anew.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitcore.atomic import atomic_write_text, commit
from vitcore.data.index import ShardEntry, remove_index, write_index
from vitcore.data.shard_resume import FinishedShard, open_progress
from vitcore.data.shard_workers import chunk_size, encode_jpeg, encode_records
from vitcore.data.sources import open_source
from vitcore.data.tar import TAR_BLOCK

log = logging.getLogger(__name__)

SKIPPED_NAME = "skipped.txt"
SHARD_NAME = "shard-{:06d}.tar"
DEFAULT_SAMPLES_PER_SHARD = 1000
__all__ = ["encode_jpeg", "shuffled_order", "write_shards", "main"]


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


class _ShardSink:
    """Rolls samples into numbered tar shards; each is written under a temporary name, then renamed.

    It also tracks which source records (positions in the writing order) each shard consumed,
    skipped images included, and reports every renamed shard to `on_commit`: a resumed writer
    skips exactly those records and starts the next shard where this one would have.
    """

    def __init__(self, out_dir: Path, max_samples: int | None, max_bytes: int | None, *, kept: list[FinishedShard],
                 on_commit: Callable[[FinishedShard], None]) -> None:
        self.out_dir, self.max_samples, self.max_bytes = out_dir, max_samples, max_bytes
        self.shards: list[ShardEntry] = [{"name": s["name"], "samples": s["samples"]} for s in kept]
        self.on_commit = on_commit
        self._start = kept[-1]["records"][1] if kept else 0  # first record of the shard being written
        self._skipped: list[str] = []  # skipped since `_start`
        self._tar: tarfile.TarFile | None = None

    def add(self, key: str, files: dict[str, bytes], record: int) -> None:
        """Add the sample of source record `record` (its position in the writing order)."""
        size = sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in files.values())
        if self._tar is None or self._full(size):
            self._roll(record)
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")  # mtime, uid, ... stay 0: the bytes depend on the data only
            info.size, info.mode = len(data), 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.shards[-1]["samples"] += 1

    def skip(self, line: str) -> None:
        """Note an unreadable image: it belongs to the shard being written (or the next one)."""
        self._skipped.append(line)

    def _full(self, incoming: int) -> bool:
        count = self.shards[-1]["samples"]
        if self.max_samples is not None:
            return count >= self.max_samples
        return count > 0 and self._tar.offset + incoming > self.max_bytes

    def _roll(self, record: int) -> None:
        self._finish(record)
        name = SHARD_NAME.format(len(self.shards))
        self._tar = tarfile.open(self.out_dir / f"{name}.tmp", "w")
        self.shards.append({"name": name, "samples": 0})

    def _finish(self, end: int) -> None:
        """Close and rename the open shard, which consumed the records before `end`."""
        if self._tar is None:
            return
        self._tar.close()
        shard = self.shards[-1]
        path = self.out_dir / shard["name"]
        commit(self.out_dir / f"{shard['name']}.tmp", path)  # on disk before the index or the progress lists it
        self.on_commit({"name": shard["name"], "samples": shard["samples"], "bytes": path.stat().st_size,
                        "records": [self._start, end], "skipped": self._skipped})
        self._start, self._skipped, self._tar = end, [], None

    def close(self, end: int) -> tuple[list[ShardEntry], list[str]]:
        """Finish the last shard (its records end at `end`, the total) and delete shards a previous,
        larger run left behind. Returns the shards and the skipped images no shard accounts for
        (those of a run where every image was unreadable)."""
        self._finish(end)
        written = {s["name"] for s in self.shards}
        for stale in self.out_dir.glob("shard-*.tar*"):
            if stale.name not in written:
                stale.unlink()
        return self.shards, self._skipped


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
) -> dict[str, Any]:
    """Write `source` (see `open_source`) as shards into `out_dir` and return the index it wrote.

    Shards roll over after `samples_per_shard` samples or before exceeding `max_bytes` (default
    1000 samples). `shuffle_seed=None` keeps the source order. `per_class`, `offset` and `limit`
    select from that order (see `shuffled_order`). `workers` processes encode (default: all
    CPUs); the output is the same for any number. A folder a killed writer left is resumed;
    one written with other arguments raises ValueError unless `overwrite` (see the module
    docstring). Raises FileNotFoundError for a missing source and ValueError for an empty one
    or bad options.
    """
    if samples_per_shard is not None and max_bytes is not None:
        raise ValueError("give samples_per_shard or max_bytes, not both")
    if max_bytes is None and samples_per_shard is None:
        samples_per_shard = DEFAULT_SAMPLES_PER_SHARD
    workers = (os.cpu_count() or 1) if workers is None else workers
    sizes = {"resize": resize, "samples_per_shard": samples_per_shard, "max_bytes": max_bytes, "limit": limit,
             "per_class": per_class, "workers": workers}
    for name, value in sizes.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")

    out = Path(out_dir)
    with open_source(source, split=split, labeled=labeled, download_dir=download_dir) as src:
        if per_class is not None and src.classes is None:
            raise ValueError(f"per_class needs labels, and {source} has none")
        labels = src.labels() if per_class is not None else None
        order = shuffled_order(len(src), shuffle_seed, limit, offset, per_class, labels)
        if not order:
            raise ValueError(f"nothing to write: {source} has {len(src)} samples and the selection "
                             f"(offset {offset}, limit {limit}, per_class {per_class}) keeps none")
        # Everything that decides the output (not `workers`, not `download_dir`), and the source's
        # size: the same arguments over a folder with new images give another order.
        args = {"source": _source_id(source), "split": split, "resize": resize, "quality": quality,
                "samples_per_shard": samples_per_shard, "max_bytes": max_bytes, "shuffle_seed": shuffle_seed,
                "limit": limit, "offset": offset, "per_class": per_class, "labeled": labeled,
                "source_images": len(src)}
        state = open_progress(out, args, overwrite)  # refuses other arguments before touching anything
        # Until the new index is written, no index: a crash mid-rewrite must not leave an old
        # index describing a mix of old and new shards.
        remove_index(out)
        sink = _ShardSink(out, samples_per_shard, max_bytes, kept=state.shards[:], on_commit=state.add)
        done = state.consumed
        if done:
            log.info("resuming %s: %d shards (%d of %d records) already written%s", out, len(state.shards), done,
                     len(order), "; nothing left to write" if done == len(order) else "")
        # No more processes than there are chunks to encode: a small folder needs no pool of 64.
        chunk = chunk_size(workers, samples_per_shard)
        procs = min(workers, -(-(len(order) - done) // chunk))
        encoded = encode_records(src.read(order[done:]), resize, quality, procs, chunk)
        bar = tqdm(encoded, total=len(order), initial=done, unit="img", desc=f"shards -> {out}",
                   disable=not progress, smoothing=0.1)
        with closing(encoded), bar:  # an error here (a full disk) stops the workers now, not at garbage collection
            for record, sample in enumerate(bar, start=done):
                if sample.files is None:
                    sink.skip(f"{sample.key}\t{sample.error}")
                else:
                    sink.add(sample.key, sample.files, record)
        shards, unaccounted = sink.close(len(order))
        skipped = state.skipped + unaccounted
        classes = src.classes

    _write_skipped(out / SKIPPED_NAME, skipped)
    if not any(s["samples"] for s in shards):
        raise ValueError(f"no readable images in {source}; see {out / SKIPPED_NAME}")
    return write_index(out, shards, classes, source=source, split=split, resize=resize, quality=quality,
                       seed=shuffle_seed, skipped=len(skipped), limit=limit, offset=offset, per_class=per_class)


def _source_id(source: str) -> str:
    """A local source by its absolute path, so that a rerun from another folder is the same source
    (and the same relative name from another folder is not); other specs as given."""
    path = Path(source)
    return str(path.resolve()) if ":" not in source and path.exists() else source


def _write_skipped(path: Path, skipped: list[str]) -> None:
    if skipped:
        atomic_write_text(path, "\n".join(skipped) + "\n")
        log.warning("skipped %d unreadable images, listed in %s", len(skipped), path)
    else:
        path.unlink(missing_ok=True)


def _byte_size(text: str) -> int:
    """Parse a size such as 500000000, 512M or 1G."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    suffix = text[-1:].lower()
    return int(float(text[:-1]) * units[suffix]) if suffix in units else int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vit-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="folder, tar archive, data file, hf:NAME or torchvision:NAME")
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
    p.add_argument("--download-dir", default="data", help="where torchvision datasets are downloaded")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes that decode and encode (default: all CPUs); the output is the same for any N")
    p.add_argument("--overwrite", action="store_true",
                   help="write the folder anew even if it was written (or begun) with other arguments")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`vit-shards`)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
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
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"vit-shards: error: {exc}") from None
    classes = index["classes"]
    print(
        f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.out}"
        f" ({len(classes) if classes else 'no'} classes, {index['skipped']} skipped)"
    )


if __name__ == "__main__":
    main()
