"""Exactly-once (evaluation) streaming: every sample once across ranks and workers, even when the
shards are fewer than the (rank, worker) streams and the ranks outnumber the samples."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vitcore.data import ShardStream, eval_transform
from vitcore.data.index import write_index
from vitcore.data.shards import write_shards
from vitcore.data.plan import exactly_once_ranges
from vitcore.data.tar import iter_tar_samples

SIZES = (7, 13, 4)  # samples per shard: unequal on purpose
CLASSES = ("ant", "bee")
BATCH = 3


def _samples(tar_path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _split_into_shards(samples: list[tuple[str, dict[str, bytes]]], out: Path, classes: list[str]) -> Path:
    out.mkdir()
    shards, first = [], 0
    for i, n in enumerate(SIZES):
        _write_tar(out / f"v-{i:06d}.tar", samples[first:first + n])
        shards.append({"name": f"v-{i:06d}.tar", "samples": n})
        first += n
    write_index(out, shards, classes)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[str, dict[str, bytes]]], list[str]]:
    """24 labeled 16 px samples written by write_shards from class folders, in one shard's order."""
    root = tmp_path_factory.mktemp("folders")
    for i in range(sum(SIZES)):
        folder = root / CLASSES[i % 2]
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (10 * i, 255 - 10 * i, 7 * i)).save(folder / f"{i:02d}.png")
    out = tmp_path_factory.mktemp("one-shard")
    index = write_shards(str(root), out, samples_per_shard=100, progress=False)
    assert index["total"] == sum(SIZES)
    return _samples(out / index["shards"][0]["name"]), index["classes"]


@pytest.fixture(scope="module")
def eval_dir(source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards of 7, 13 and 4 samples."""
    samples, classes = source
    return _split_into_shards(samples, tmp_path_factory.mktemp("eval") / "shards", classes)


@pytest.fixture(scope="module")
def corrupt_eval_dir(source, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same three shards, but sample 10 (inside the 13-sample shard) is not an image."""
    samples, classes = source
    samples = list(samples)
    key, files = samples[10]
    samples[10] = (key, {**files, "jpg": b"these bytes are not an image" * 4})
    return _split_into_shards(samples, tmp_path_factory.mktemp("corrupt-eval") / "shards", classes)


def _all_ranks(urls: str | list[str], world_size: int, num_workers: int,
               intact: bool = True) -> list[tuple[ShardStream, list[dict]]]:
    """One exactly-once stream per rank, in process, each run for one epoch; len() is exact when the
    shards are `intact`."""
    runs = []
    for rank in range(world_size):
        stream = ShardStream.exactly_once(urls, eval_transform(16), BATCH, rank=rank, world_size=world_size,
                                          num_workers=num_workers)
        expected = len(stream)
        batches = list(stream)
        assert len(batches) == expected or not intact, f"rank {rank}: len() {expected}, {len(batches)} batches"
        runs.append((stream, batches))
    return runs


def _keys(runs: list[tuple[ShardStream, list[dict]]]) -> Counter:
    return Counter(k for _, batches in runs for b in batches for k in b["key"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_every_sample_exactly_once_across_ranks_and_workers(eval_dir: Path, source, world_size: int,
                                                            num_workers: int) -> None:
    runs = _all_ranks(str(eval_dir), world_size, num_workers)
    keys = _keys(runs)
    assert set(keys) == {key for key, _ in source[0]} and set(keys.values()) == {1}
    assert sum(len(batches) for _, batches in runs) == sum(len(stream) for stream, _ in runs)
    for stream, batches in runs:
        assert stream.skipped == 0 and stream.epoch == 1
        assert all(b["image"].shape[1:] == (3, 16, 16) and len(b["key"]) <= BATCH for b in batches)
        assert all([source[1][c] for c in b["label"]] == [k.split("/")[0] for k in b["key"]] for b in batches)
    if world_size * max(num_workers, 1) > len(SIZES):  # shards split: ranks differ by at most a sample per worker
        per_rank = [sum(len(b["key"]) for b in batches) for _, batches in runs]
        assert max(per_rank) - min(per_rank) <= max(num_workers, 1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_beyond_the_samples_yield_nothing_and_finish(eval_dir: Path, num_workers: int) -> None:
    """One 4-sample shard on 8 ranks: 4 ranks get one sample, the others none, and all end cleanly."""
    small = str(eval_dir / "v-000002.tar")
    runs = _all_ranks(small, 8, num_workers)
    assert sorted(_keys(runs).values()) == [1] * 4
    assert [len(stream) for stream, _ in runs] == [1] * 4 + [0] * 4
    for stream, batches in runs[4:]:
        assert batches == [] and stream.skipped == 0 and stream.epoch == 1
        assert list(stream) == [] and stream.epoch == 2  # and again next epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (5, 1), (8, 2)])
def test_corrupt_sample_is_skipped_and_counted_once(corrupt_eval_dir: Path, source, world_size: int,
                                                     num_workers: int) -> None:
    runs = _all_ranks(str(corrupt_eval_dir), world_size, num_workers)
    keys = _keys(runs)
    skipped = sum(stream.skipped for stream, _ in runs)
    assert sum(keys.values()) + skipped == sum(SIZES) and skipped == 1
    assert set(keys) == {key for key, _ in source[0]} - {source[0][10][0]} and set(keys.values()) == {1}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_truncated_shard_counts_a_skip_per_range_and_never_hangs(eval_dir: Path, tmp_path: Path) -> None:
    """Shard 1 cut in its middle: ranges past the cut (their start seeked beyond the end) count one
    skip each instead of yielding nothing silently; every other sample still comes once."""
    out = tmp_path / "cut"
    shutil.copytree(eval_dir, out)
    whole = (out / "v-000001.tar").read_bytes()
    (out / "v-000001.tar").write_bytes(whole[: len(whole) // 2])
    runs = _all_ranks(str(out), 8, 2, intact=False)
    keys = _keys(runs)
    assert set(keys.values()) == {1} and 7 + 4 + 1 <= sum(keys.values()) < sum(SIZES)
    assert sum(stream.skipped for stream, _ in runs) >= 1


def test_division_covers_each_sample_once_and_balances() -> None:
    for sizes in ([7, 13, 4], [1, 0, 100, 3], [5], [0, 2]):
        total = sum(sizes)
        order = list(range(len(sizes)))[::-1]
        for parts in range(1, 2 * total + 3):
            division = exactly_once_ranges(sizes, order, parts)
            assert division == exactly_once_ranges(sizes, order, parts)  # deterministic
            covered = Counter((i, s) for ranges in division for i, a, b in ranges for s in range(a, b))
            assert covered == Counter((i, s) for i, n in enumerate(sizes) for s in range(n))
            assert all(0 <= start < stop <= sizes[i] for ranges in division for i, start, stop in ranges)
            loads = [sum(stop - start for _, start, stop in ranges) for ranges in division]
            if sum(n > 0 for n in sizes) >= parts:  # whole shards
                assert all(start == 0 and stop == sizes[i] for ranges in division for i, start, stop in ranges)
            else:  # contiguous runs of near-equal length
                assert max(loads) - min(loads) <= 1


class _Unseekable(io.RawIOBase):
    """A pipe-like stream that counts the bytes read from it."""

    def __init__(self, data: bytes) -> None:
        self.inner, self.read_bytes = io.BytesIO(data), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.read_bytes += len(data)
        return data


def test_tar_reader_skips_samples_by_their_headers(eval_dir: Path) -> None:
    data = (eval_dir / "v-000001.tar").read_bytes()
    every = list(iter_tar_samples(io.BytesIO(data)))
    assert len(every) == 13
    for skip in (0, 1, 12):
        assert list(iter_tar_samples(io.BytesIO(data), skip=skip)) == every[skip:]
        pipe = _Unseekable(data)
        assert list(iter_tar_samples(pipe, skip=skip)) == every[skip:]
    # A seekable stream reads only the headers of the samples it skips (jpg + cls: 2 blocks each).
    counting = _Unseekable(data)
    counting.seekable = lambda: True  # type: ignore[method-assign]
    counting.seek = counting.inner.seek  # type: ignore[method-assign]
    assert [s["__key__"] for s in iter_tar_samples(counting, skip=12)] == [every[12]["__key__"]]
    assert counting.read_bytes < 12 * 2 * 512 + 4096
    for stream in (io.BytesIO(data), _Unseekable(data), io.BytesIO(data[: len(data) // 2])):
        with pytest.raises(tarfile.ReadError):
            list(iter_tar_samples(stream, skip=13))
