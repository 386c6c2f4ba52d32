"""vitcore.data.stream, .plan, .pipeline: ShardStream's batches, seeding, corrupt data, resume and workers."""

from __future__ import annotations

import json
import multiprocessing
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from shard_helpers import CLASSES, encode, folder_keys, read_tar

from pretrain.task import CROP_SCALE
from vitcore.data import ShardStream, eval_transform, open_image, read_index, train_transform
from vitcore.data.shards import write_shards
from vitcore.data.pipeline import BrokenData


def _epoch(stream: ShardStream) -> list[dict]:
    return list(stream)


def test_stream_gives_up_when_no_shard_is_readable(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 200)
    stream = ShardStream(str(tmp_path / "bad.tar"), train_transform(8, CROP_SCALE), 2, num_workers=0, epoch_samples=10)
    with pytest.raises(BrokenData, match="shards in a row gave no sample"):
        list(stream)


def test_stream_gives_up_when_every_sample_fails(make_shards, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitcore.data.pipeline as pipeline_module

    bad = make_shards({"bad.tar": [(f"{i:03d}", {"jpg": b"not a jpeg"}) for i in range(8)]}, None, index=False)
    monkeypatch.setattr(pipeline_module, "FAILED_SAMPLES_IN_A_ROW", 20)  # 1000 in production
    stream = ShardStream(str(bad / "bad.tar"), train_transform(8, CROP_SCALE), 2, num_workers=0, epoch_samples=10,
                         labeled=False)
    with pytest.raises(BrokenData, match="20 samples in a row failed"):
        list(stream)


def test_shards_are_drawn_in_proportion_to_their_size() -> None:
    from vitcore.data.plan import resampled_shards

    draws = resampled_shards(["big", "small"], [900, 100], random.Random(0))
    picks = [next(draws) for _ in range(20000)]
    assert 0.085 < picks.count("small") / len(picks) < 0.115  # 10% of the samples live there
    uniform = resampled_shards(["big", "small"], None, random.Random(0))
    assert 0.47 < sum(next(uniform) == "small" for _ in range(20000)) / 20000 < 0.53  # no index: uniform


def test_shuffle_buffer_is_a_seeded_permutation() -> None:
    from vitcore.data.pipeline import _shuffled

    def shuffled(n: int, bufsize: int, seed: int) -> list[int]:
        return list(_shuffled(iter(range(n)), bufsize, random.Random(seed)))

    for n, bufsize in [(0, 10), (7, 3), (500, 100), (1000, 1000)]:
        out = shuffled(n, bufsize, seed=1)
        assert sorted(out) == list(range(n))  # every sample once
        assert out == shuffled(n, bufsize, seed=1)  # the same for a seed
    assert shuffled(500, 100, seed=1) != shuffled(500, 100, seed=2)
    assert shuffled(50, 1, seed=1) == list(range(50))  # a buffer of one keeps the order


def test_in_process_stream_leaves_the_global_rng_alone(shard_dir: Path) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), 4, num_workers=0))
    assert torch.equal(torch.rand(3), expected)


def test_every_rank_gets_the_same_batch_count(shard_dir: Path, image_folder: Path) -> None:
    valid = folder_keys(image_folder)
    for rank in range(2):
        stream = ShardStream(str(shard_dir), train_transform(16, CROP_SCALE), 4, rank=rank, world_size=2, num_workers=2,
                             shuffle_buffer=8)
        assert len(stream) == 39 // 8
        batches = _epoch(stream)
        assert len(batches) == len(stream)
        for batch in batches:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
            assert batch["label"].dtype == torch.int64
            assert set(batch["key"]) <= valid
            assert [CLASSES[i] for i in batch["label"]] == [k.split("/")[0] for k in batch["key"]]
        assert stream.epoch == 1 and stream.skipped == 0


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_uneven_split_over_workers_still_exact(shard_dir: Path) -> None:
    stream = ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), 2, num_workers=3, epoch_samples=14)
    assert len(stream) == 7 == len(_epoch(stream))


def test_exactly_once_mode_covers_each_sample_once(shard_dir: Path, image_folder: Path) -> None:
    keys: list[str] = []
    for rank in range(2):
        stream = ShardStream(str(shard_dir), eval_transform(16), 3, rank=rank, world_size=2, num_workers=2,
                             resampled=False, drop_last=False)
        expected = len(stream)
        batches = _epoch(stream)
        assert len(batches) == expected
        keys += [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(folder_keys(image_folder))


@pytest.mark.parametrize("world_size, num_workers", [(1, 2), (2, 2), (2, 0)])
def test_a_training_epoch_is_a_permutation_over_every_rank(cifar_shards: Path, world_size: int,
                                                           num_workers: int) -> None:
    """As timm's sampler: each epoch every sample once in the world (256 = 2 ranks x 2 workers x 64),
    in another order the next epoch; drawing shards with replacement left about a third out."""
    epochs: list[list[str]] = [[], []]
    for rank in range(world_size):
        stream = ShardStream(str(cifar_shards), train_transform(8, CROP_SCALE), 8, rank=rank, world_size=world_size,
                             num_workers=num_workers, shuffle_buffer=50)
        for epoch in epochs:
            epoch += [k for b in _epoch(stream) for k in b["key"]]
    assert len(set(epochs[0])) == len(epochs[0]) == 256 and set(epochs[0]) == set(epochs[1])
    assert epochs[0] != epochs[1]


def test_stream_is_seeded_and_differs_per_epoch(shard_dir: Path) -> None:
    def run(seed: int) -> tuple[list[dict], list[dict]]:
        stream = ShardStream(str(shard_dir), train_transform(16, CROP_SCALE), 4, num_workers=2, seed=seed, shuffle_buffer=8)
        return _epoch(stream), _epoch(stream)

    first, second = run(0)
    again, _ = run(0)
    other, _ = run(1)
    keys = lambda batches: [b["key"] for b in batches]  # noqa: E731
    assert keys(first) == keys(again) and all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert keys(first) != keys(second) and keys(first) != keys(other)


@pytest.fixture(scope="module")
def corrupt_dir(shard_dir: Path, make_shards) -> Path:
    """Three shards: good + bad JPEG bytes + missing cls; intact; cut inside its third sample."""
    good = list(read_tar(shard_dir / "shard-000000.tar").items())
    extra = [("bad/jpeg", {"jpg": b"\xff\xd8garbage", "cls": b"1"}), ("no/cls", {"jpg": good[0][1]["jpg"]})]
    out = make_shards({"c-000000.tar": good + extra,
                       "c-000001.tar": list(read_tar(shard_dir / "shard-000001.tar").items()),
                       "c-000002.tar": list(read_tar(shard_dir / "shard-000002.tar").items())}, CLASSES)
    cut = out / "c-000002.tar"  # the index still lists its 5 samples
    with tarfile.open(cut) as tar:
        third_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2]
    cut.write_bytes(cut.read_bytes()[: third_jpg.offset_data + third_jpg.size // 2])
    assert [s["samples"] for s in read_index(out)["shards"]] == [7, 5, 5]
    return out


def test_corrupt_samples_are_skipped_and_counted(corrupt_dir: Path) -> None:
    stream = ShardStream(str(corrupt_dir), train_transform(8, CROP_SCALE), 2, num_workers=2, resampled=False, drop_last=False)
    keys = [k for b in _epoch(stream) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 5 + 5 + 2
    assert "bad/jpeg" not in keys and "no/cls" not in keys
    assert stream.skipped == 3  # bad JPEG, missing cls, truncated shard

    unlabeled = ShardStream(str(corrupt_dir), train_transform(8, CROP_SCALE), 2, num_workers=0, resampled=False,
                            drop_last=False, labeled=False)
    assert "no/cls" in [k for b in _epoch(unlabeled) for k in b["key"]] and unlabeled.skipped == 2

    resampled = ShardStream(str(corrupt_dir), train_transform(8, CROP_SCALE), 2, num_workers=2, shuffle_buffer=4)
    assert len(_epoch(resampled)) == len(resampled) == 8 and resampled.skipped > 0


def test_truncated_jpeg_is_skipped_and_counted(shard_dir: Path, make_shards) -> None:
    """Its header parses, so only the decode inside the transform fails: still a counted skip."""
    whole = encode(Image.effect_noise((96, 96), 50).convert("RGB"))
    assert open_image(whole[: len(whole) // 2]).size == (96, 96)
    good = dict(list(read_tar(shard_dir / "shard-000000.tar").items())[:3])
    cut_jpeg = ("cut/jpeg", {"jpg": whole[: len(whole) // 2], "cls": b"0"})
    out = make_shards({"t-000000.tar": [*good.items(), cut_jpeg]}, CLASSES)
    for transform in (train_transform(8, CROP_SCALE), eval_transform(8)):  # both draft it: a reduced decode
        stream = ShardStream(str(out), transform, 2, num_workers=0, resampled=False, drop_last=False)
        keys = [k for b in _epoch(stream) for k in b["key"]]
        assert sorted(keys) == sorted(good) and stream.skipped == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_batches_of_an_uninterrupted_run(corrupt_dir: Path, num_workers: int) -> None:
    def make() -> ShardStream:
        return ShardStream(str(corrupt_dir), train_transform(8, CROP_SCALE), 2, num_workers=num_workers, shuffle_buffer=6)

    reference = make()
    expected = _epoch(reference) + _epoch(reference)

    interrupted = make()
    head = []
    for batch in interrupted:
        head.append(batch)
        if len(head) == 5:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["epoch"] == 0 and state["batches"] == 5

    resumed = make()
    resumed.load_state_dict(state)
    rest = _epoch(resumed) + _epoch(resumed)
    assert len(head) + len(rest) == len(expected)
    for got, want in zip(head + rest, expected):
        assert got["key"] == want["key"] and torch.equal(got["image"], want["image"])
    assert resumed.skipped == reference.skipped > 0


def test_resume_after_topology_change_continues_without_replay(shard_dir: Path) -> None:
    stream = ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), 2, num_workers=2, shuffle_buffer=8)
    head = [b["key"] for _, b in zip(range(4), stream)]
    state = stream.state_dict()
    resumed = ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), 2, num_workers=1, shuffle_buffer=8)
    resumed.load_state_dict(state)
    rest = [b["key"] for b in resumed]
    assert len(rest) == len(resumed) - 4 and rest[:4] != head
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole again


@pytest.mark.parametrize("world_size,batch_size", [(2, 2), (1, 3), (2, 5)])
def test_resume_late_in_an_epoch_with_another_layout_finishes_it(shard_dir: Path, world_size: int,
                                                                  batch_size: int) -> None:
    """A position taken near the end of an epoch on 1 rank with batches of 2 becomes a position of
    the new layout (samples consumed, rounded up): no crash, no overrun, the next epoch whole."""
    stream = ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), 2, num_workers=2, shuffle_buffer=8)
    consumed = len(stream) - 2
    for _, _batch in zip(range(consumed), stream):
        pass
    state = stream.state_dict()
    for rank in range(world_size):
        resumed = ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), batch_size, rank=rank, world_size=world_size,
                              num_workers=1, shuffle_buffer=8)
        resumed.load_state_dict(state)
        done = -(-consumed * 2 // (batch_size * world_size))
        assert len(list(resumed)) == max(len(resumed) - done, 0)
        assert resumed.epoch == 1 and len(list(resumed)) == len(resumed)


def test_labeled_stream_on_unlabeled_shards_is_refused(image_folder: Path, tmp_path: Path) -> None:
    write_shards(str(image_folder), tmp_path / "out", labeled=False, limit=8, progress=False)
    with pytest.raises(ValueError, match="labeled=False"):
        ShardStream(str(tmp_path / "out"), train_transform(8, CROP_SCALE), 2)
    stream = ShardStream(str(tmp_path / "out"), train_transform(8, CROP_SCALE), 2, labeled=False, num_workers=0)
    assert all(b["label"] is None for b in stream)


def _keys(batches: list[dict]) -> list[list[str]]:
    return [b["key"] for b in batches]


def _same_batches(got: list[dict], want: list[dict]) -> bool:
    return _keys(got) == _keys(want) and all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want))


def test_persistent_workers_give_each_epoch_its_plan_and_resume_exactly(corrupt_dir: Path) -> None:
    """Workers forked once serve every epoch, yet each epoch differs, and a position loaded into
    a stream whose workers already run (or into a fresh one) yields an uninterrupted run's batches."""
    def make() -> ShardStream:
        return ShardStream(str(corrupt_dir), train_transform(8, CROP_SCALE), 2, num_workers=2, shuffle_buffer=6)

    before = {p.pid for p in multiprocessing.active_children()}
    stream = make()
    first = _epoch(stream)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2  # still alive after the epoch
    second = _epoch(stream)
    assert {p.pid for p in multiprocessing.active_children()} - before == workers  # the same two
    assert _keys(first) != _keys(second)

    interrupted = make()
    head = [b for _, b in zip(range(3), interrupted)]
    mid_epoch = interrupted.state_dict()
    assert _same_batches(head + _epoch(interrupted) + _epoch(interrupted), first + second)  # a new loader
    stream.load_state_dict(mid_epoch)  # its workers are idle, not restarted
    assert _same_batches(_epoch(stream), first[3:]) and _same_batches(_epoch(stream), second)
    assert {p.pid for p in multiprocessing.active_children()} - before >= workers
    resumed = make()
    resumed.load_state_dict(mid_epoch)
    assert _same_batches(_epoch(resumed) + _epoch(resumed), first[3:] + second)
    assert resumed.skipped == stream.skipped > 0


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_pin_memory_reaches_the_data_loader(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU nothing can be pinned, so this checks what the loader is asked for."""
    import vitcore.data.stream as stream_module

    asked = []

    class SpyLoader(stream_module.DataLoader):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            asked.append((kwargs["pin_memory"], kwargs["persistent_workers"]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(stream_module, "DataLoader", SpyLoader)
    for pin in (False, True):
        for num_workers in (0, 2):
            stream = ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), 4, num_workers=num_workers, pin_memory=pin)
            assert len(_epoch(stream)) == len(stream) and len(_epoch(stream)) == len(stream)
    assert asked == [(False, False), (False, True), (True, False), (True, True)]  # one loader per stream


def _attribute_of(stream: ShardStream, key: str) -> object:
    """The attribute a state key names: `key` itself, or `_key` when it is private; never both."""
    public, private = hasattr(stream, key), hasattr(stream, "_" + key)
    assert public != private, f"state key {key!r}: attributes {key!r} {public}, {'_' + key!r} {private}"
    return getattr(stream, key if public else "_" + key)


def test_state_keys_name_the_attributes_holding_them(shard_dir: Path) -> None:
    """So that the checkpoint's keys and the code's names cannot drift apart again."""
    def check(stream: ShardStream) -> None:
        for key, value in stream.state_dict().items():
            attribute = _attribute_of(stream, key)
            assert value == (attribute if attribute is not None else []), key  # None: no stream ran yet

    stream = ShardStream(str(shard_dir), train_transform(8, CROP_SCALE), 2, num_workers=2, shuffle_buffer=8)
    check(stream)
    for _, _batch in zip(range(3), stream):  # mid-epoch: every counter in use
        pass
    check(stream)
    check(ShardStream.exactly_once(str(shard_dir), eval_transform(8), 2, num_workers=0))
