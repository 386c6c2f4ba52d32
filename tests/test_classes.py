"""Class labels keep class identity: dataset label ids are kept, shared names never merge classes,
and a validation split whose classes differ from training's is refused in one line."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vitcore.data.shards import write_shards
from vitcore.data.classes import check_same_classes, unique_class_names

TRAIN = ["n01", "n02", "n03", "n04"]


def _labels(shard: Path) -> dict[str, int]:
    """Sample key -> label of a shard written by `write_shards`."""
    with tarfile.open(shard) as tar:
        return {m.name.removesuffix(".cls"): int(tar.extractfile(m).read())
                for m in tar.getmembers() if m.name.endswith(".cls")}


def test_torchvision_shared_names_stay_distinct_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    class FakeNet:
        classes = ["crane", "ant", "crane"]  # two synsets, one display name; not sorted

        def __init__(self, root: str, train: bool = True, transform=None, download: bool = False) -> None: ...

        def __len__(self) -> int:
            return 9

        def __getitem__(self, i: int) -> tuple[Image.Image, int]:
            return Image.new("RGB", (8, 8)), i % 3

    monkeypatch.setattr(torchvision.datasets, "FakeNet", FakeNet, raising=False)
    index = write_shards("torchvision:FakeNet", tmp_path / "out", download_dir=tmp_path, progress=False)
    assert index["classes"] == ["crane", "ant", "crane (2)"]  # label i -> classes[i], one entry per label
    labels = _labels(tmp_path / "out" / "shard-000000.tar")
    assert labels == {f"FakeNet_train_{i:08d}": i % 3 for i in range(9)}  # the dataset's own ids


def test_hf_labels_are_the_classlabel_ids(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")  # ClassLabel itself refuses repeated names
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["zebra", "ant", "cat"])})
    ids = [i % 3 for i in range(6)]
    images = [Image.new("RGB", (8, 8)) for _ in ids]
    datasets.Dataset.from_dict({"img": images, "label": ids}, features=features).save_to_disk(str(tmp_path / "hf"))
    index = write_shards(str(tmp_path / "hf"), tmp_path / "out", shuffle_seed=None, progress=False)
    assert index["classes"] == ["zebra", "ant", "cat"]  # the dataset's order, not sorted
    assert _labels(tmp_path / "out" / "shard-000000.tar") == {f"{i:08d}": label for i, label in enumerate(ids)}


def test_repeated_names_get_readable_deterministic_suffixes() -> None:
    assert unique_class_names(["a", "b"]) == ["a", "b"]
    assert unique_class_names(["crane", "crane", "crane"]) == ["crane", "crane (2)", "crane (3)"]
    # a suffixed name the dataset already uses is skipped, so entries stay unique
    assert unique_class_names(["crane", "crane (2)", "crane"]) == ["crane", "crane (2)", "crane (3)"]


def test_same_classes_pass() -> None:
    check_same_classes(TRAIN, list(TRAIN), "data/train", "eval.shards: data/val")
    check_same_classes(None, None, "data/train", "eval.shards: data/val")  # both unlabeled


@pytest.mark.parametrize("val, message", [
    (TRAIN[:3], "eval.shards: data/val has 3 classes, data/train has 4 (missing: n04)"),
    (TRAIN + ["n05"], "eval.shards: data/val has 5 classes, data/train has 4 (extra: n05)"),
    (TRAIN[:3] + ["n09"], "eval.shards: data/val has 4 classes, data/train has 4 (missing: n04; extra: n09)"),
    (["n01", "n02", "n04", "n03"], "eval.shards: data/val and data/train: classes differ in order at label 2 "
                                   "(val 'n04', train 'n03'): write both splits from one source so labels agree"),
    (None, "eval.shards: data/val has no labels (index classes is null), data/train has 4 classes"),
])
def test_each_class_mismatch_is_one_line(val: list[str] | None, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_same_classes(TRAIN, val, "data/train", "eval.shards: data/val")


def test_unlabeled_training_split_is_named() -> None:
    with pytest.raises(ValueError, match=re.escape("data/train has no labels (index classes is null), "
                                                   "eval.shards: data/val has 4 classes")):
        check_same_classes(None, TRAIN, "data/train", "eval.shards: data/val")


def test_long_class_lists_are_cut_short() -> None:
    train = [f"n{i:02d}" for i in range(20)]
    with pytest.raises(ValueError, match=re.escape("(missing: n00, n01, n02, n03, n04 and 7 more)")):
        check_same_classes(train, train[12:], "data/train", "data/val")
