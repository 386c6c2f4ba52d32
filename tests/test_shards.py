"""The shard writer (vitcore.data.shards) and its image sources (vitcore.data.sources)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from shard_helpers import CLASSES, PER_CLASS, encode, folder_keys, read_tar

from pretrain.task import CROP_SCALE
from vitcore.data import ShardStream, decode_image, eval_transform, open_source, read_index, train_transform
from vitcore.data.shards import main, write_shards

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-10k.tar"


def test_index_and_shard_contents(shard_dir: Path, image_folder: Path) -> None:
    index = read_index(shard_dir)
    assert index["total"] == len(CLASSES) * PER_CLASS == sum(s["samples"] for s in index["shards"])
    assert index["classes"] == CLASSES
    assert (index["skipped"], index["resize"], index["quality"], index["seed"]) == (2, 24, 90, 0)
    # 41 source records, 5 per shard: 9 shards; the 2 unreadable ones leave their shards a sample short.
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(9)]
    assert sorted(s["samples"] for s in index["shards"]) == [1, 4, 4] + [5] * 6
    skipped = (shard_dir / "skipped.txt").read_text()
    assert "garbage" in skipped and "truncated" in skipped
    assert not list(shard_dir.glob("*.tmp"))

    keys = set()
    for shard in index["shards"]:
        samples = read_tar(shard_dir / shard["name"])
        assert len(samples) == shard["samples"]
        for key, files in samples.items():
            image = Image.open(io.BytesIO(files["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(image.size) <= 24
            assert CLASSES[int(files["cls"])] == key.split("/")[0]
            keys.add(key)
    assert keys == folder_keys(image_folder)


def test_resize_keeps_aspect_and_never_enlarges(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (200, 100)).save(root / "a" / "wide.jpg")
    Image.new("RGB", (10, 12)).save(root / "b" / "tiny.jpg")
    write_shards(str(root), tmp_path / "out", resize=50, progress=False)
    samples = read_tar(tmp_path / "out" / "shard-000000.tar")
    assert Image.open(io.BytesIO(samples["a/wide_jpg"]["jpg"])).size == (100, 50)
    assert Image.open(io.BytesIO(samples["b/tiny_jpg"]["jpg"])).size == (10, 12)


def test_exif_orientation_is_baked_into_the_pixels(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 20)).save(tmp_path / "imgs" / "rotated.jpg", exif=exif.tobytes())
    write_shards(str(tmp_path / "imgs"), tmp_path / "out", progress=False)
    (files,) = read_tar(tmp_path / "out" / "shard-000000.tar").values()
    assert Image.open(io.BytesIO(files["jpg"])).size == (20, 40)


def test_shuffle_is_seeded_and_shards_roll_by_bytes(image_folder: Path, tmp_path: Path) -> None:
    def first_shard(seed: int | None, name: str) -> bytes:
        write_shards(str(image_folder), tmp_path / name, samples_per_shard=10, shuffle_seed=seed, progress=False)
        return (tmp_path / name / "shard-000000.tar").read_bytes()

    assert first_shard(1, "a") == first_shard(1, "b")
    assert first_shard(1, "a") != first_shard(2, "c")
    first_shard(None, "d")  # no shuffle: source order, which is sorted by path
    assert list(read_tar(tmp_path / "d" / "shard-000000.tar")) == sorted(folder_keys(image_folder))[:10]

    index = write_shards(str(image_folder), tmp_path / "e", max_bytes=3000, resize=24, progress=False)
    assert len(index["shards"]) > 3
    assert all((tmp_path / "e" / s["name"]).stat().st_size <= 3000 for s in index["shards"] if s["samples"] > 1)
    # A rerun that writes fewer shards removes the stale ones (other arguments: only with overwrite).
    write_shards(str(image_folder), tmp_path / "e", samples_per_shard=100, progress=False, overwrite=True)
    assert [p.name for p in (tmp_path / "e").glob("shard-*")] == ["shard-000000.tar"]


def test_missing_or_empty_source_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_shards(str(missing), tmp_path / "out")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found in .*empty"):
        write_shards(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(SystemExit, match="nowhere") as exc:
        main(["--source", str(missing), "--out", str(tmp_path / "out")])
    assert "\n" not in str(exc.value)
    with pytest.raises(FileNotFoundError, match="shard index not found"):
        read_index(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ShardStream(str(missing), train_transform(16, CROP_SCALE), 4)
    with pytest.raises(FileNotFoundError, match=r"x-000000\.tar \(and 1 more\)"):
        ShardStream(str(tmp_path / "x-{000000..000001}.tar"), train_transform(16, CROP_SCALE), 4)


def test_cli_writes_shards(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--source", str(image_folder), "--out", str(tmp_path / "out"), "--resize", "16",
          "--samples-per-shard", "20", "--limit", "30", "--unlabeled", "--quality", "80"])
    assert "wrote 29 samples in 2 shards" in capsys.readouterr().out  # 30 minus the garbage file
    index = read_index(tmp_path / "out")
    assert (index["total"], index["skipped"], index["classes"], index["quality"]) == (29, 1, None, 80)
    assert all("cls" not in files for files in read_tar(tmp_path / "out" / "shard-000000.tar").values())


def test_tar_source_selects_split_folder(image_folder: Path, tmp_path: Path) -> None:
    for compression in ("", "gz"):
        archive = tmp_path / f"data.tar{'.' + compression if compression else ''}"
        with tarfile.open(archive, f"w:{compression}") as tar:
            for path in sorted(image_folder.rglob("*")):
                if path.is_file():
                    rel = path.relative_to(image_folder).as_posix()
                    tar.add(path, f"data/train/{rel}")
                    if rel.startswith("cat/"):
                        tar.add(path, f"data/val/{rel}")
        with open_source(str(archive), split="train") as src:
            assert src.classes == CLASSES and len(src) == len(CLASSES) * PER_CLASS + 2
            records = list(src.read([0, len(src) - 1]))
            assert records[0].key.startswith("cat/") and records[0].label == 0
            assert records[1].key.startswith("eel/") and records[1].label == 2
        with open_source(str(archive)) as src:  # train/ and val/ nest two deep: an unlabeled collection
            assert src.classes is None and len(src) == (len(CLASSES) + 1) * PER_CLASS + 2
        index = write_shards(str(archive), tmp_path / f"out{compression}", split="val", progress=False)
        assert (index["total"], index["classes"]) == (PER_CLASS, ["cat"])
        with pytest.raises(ValueError, match="no images found"):
            write_shards(str(archive), tmp_path / "none", split="test")


def test_hf_saved_dataset_keeps_its_label_ids(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["zebra", "ant"])})
    colors = {0: (255, 255, 255), 1: (0, 0, 0)}  # zebra white, ant black
    labels = [i % 2 for i in range(10)]
    images = [Image.new("RGB", (20, 20), colors[label]) for label in labels]
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).save_to_disk(str(tmp_path / "hf"))

    index = write_shards(str(tmp_path / "hf"), tmp_path / "out", progress=False)
    assert (index["total"], index["classes"]) == (10, ["zebra", "ant"])
    for files in read_tar(tmp_path / "out" / "shard-000000.tar").values():
        brightness = decode_image(files["jpg"]).getpixel((10, 10))[0]
        assert index["classes"][int(files["cls"])] == ("zebra" if brightness > 128 else "ant")

    # HF's -1 means "no label": such a row is written without one, not as the last class
    unlabeled = datasets.Dataset.from_dict({"img": images[:4], "label": [0, -1, 1, -1]}, features=features)
    unlabeled.save_to_disk(str(tmp_path / "hf-missing"))
    write_shards(str(tmp_path / "hf-missing"), tmp_path / "out-missing", shuffle_seed=None, progress=False)
    samples = read_tar(tmp_path / "out-missing" / "shard-000000.tar")
    assert [files.get("cls") for _, files in sorted(samples.items())] == [b"0", None, b"1", None]


def test_a_crash_mid_rewrite_leaves_no_stale_index(image_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    write_shards(str(image_folder), out, samples_per_shard=5, progress=False)
    assert (out / "index.json").is_file()
    from vitcore.data import shards as shards_module

    def full_disk(self, key: str, files: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards_module._ShardFile, "add", full_disk)
    with pytest.raises(OSError, match="No space left"):  # an error, not 39 "skipped images"
        write_shards(str(image_folder), out, samples_per_shard=4, progress=False, overwrite=True)
    assert not (out / "index.json").exists()  # readers get "shard index not found", not a mix


def test_torchvision_source_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    calls = []

    class FakeCIFAR:
        classes = ["truck", "airplane"]

        def __init__(self, root: str, train: bool = True, transform=None, download: bool = False) -> None:
            calls.append((root, train, download))

        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> tuple[Image.Image, int]:
            return Image.new("RGB", (8, 8)), i % 2

    monkeypatch.setattr(torchvision.datasets, "FakeCIFAR", FakeCIFAR, raising=False)
    index = write_shards("torchvision:FakeCIFAR", tmp_path / "out", split="test", download_dir=tmp_path, progress=False)
    assert calls == [(str(tmp_path), False, True)]
    assert (index["total"], index["classes"]) == (6, ["truck", "airplane"])
    labels = {k: int(f["cls"]) for k, f in read_tar(tmp_path / "out" / "shard-000000.tar").items()}
    assert labels["FakeCIFAR_test_00000000"] == 0 and labels["FakeCIFAR_test_00000001"] == 1
    with pytest.raises(ValueError, match="has the splits train and test, not 'val'"):  # not silently the test set
        write_shards("torchvision:FakeCIFAR", tmp_path / "val", split="val", download_dir=tmp_path, progress=False)


def test_hidden_folders_and_files_are_neither_classes_nor_samples(tmp_path: Path) -> None:
    for name in ("cat/1.jpg", "dog/2.jpg", ".ipynb_checkpoints/3.jpg", "dog/.4.jpg"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(encode(Image.new("RGB", (8, 8))))
    index = write_shards(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert (index["total"], index["classes"]) == (2, ["cat", "dog"])


def test_real_cifar_subset_round_trip(tmp_path: Path) -> None:
    if not CIFAR_TAR.exists():
        pytest.skip(f"{CIFAR_TAR} not present")
    index = write_shards(str(CIFAR_TAR), tmp_path, split="train", limit=200, samples_per_shard=50, progress=False)
    assert index["total"] == 200 and len(index["shards"]) == 4 and index["skipped"] == 0
    classes = index["classes"]
    assert len(classes) == 10 and classes == sorted(classes) and "airplane" in classes
    stream = ShardStream(str(tmp_path), eval_transform(32), 50, num_workers=0, resampled=False)
    batches = list(stream)
    assert [b["image"].shape for b in batches] == [(50, 3, 32, 32)] * 4
    assert len(set(torch.cat([b["label"] for b in batches]).tolist())) == 10


def test_per_class_offset_and_limit_select_from_the_seeded_order(tmp_path: Path) -> None:
    """A class-balanced subset (`--per-class`, the few-labels arm's set) and a disjoint split of one
    seeded order (`--limit K` / `--offset K`, the sweep's held-out images), on real CIFAR images."""
    def labels(out: Path) -> dict[str, int]:
        return {k: int(f["cls"]) for s in read_index(out)["shards"] for k, f in read_tar(out / s["name"]).items()}

    write_shards(str(CIFAR_TAR), tmp_path / "bal", split="test", per_class=3, progress=False)
    balanced = labels(tmp_path / "bal")
    assert sorted(balanced.values()) == sorted(list(range(10)) * 3)
    again = write_shards(str(CIFAR_TAR), tmp_path / "bal2", split="test", per_class=3, progress=False)
    assert labels(tmp_path / "bal2") == balanced and again["per_class"] == 3  # seeded: the same images
    other_seed = write_shards(str(CIFAR_TAR), tmp_path / "bal3", split="test", per_class=3, shuffle_seed=1,
                              progress=False)
    assert other_seed["total"] == 30 and set(labels(tmp_path / "bal3")) != set(balanced)

    write_shards(str(CIFAR_TAR), tmp_path / "hold", split="test", limit=500, progress=False)
    write_shards(str(CIFAR_TAR), tmp_path / "rest", split="test", offset=500, progress=False)
    held_out, rest = labels(tmp_path / "hold"), labels(tmp_path / "rest")
    assert (len(held_out), len(rest)) == (500, 1500) and not set(held_out) & set(rest)
    with pytest.raises(ValueError, match="keeps none"):
        write_shards(str(CIFAR_TAR), tmp_path / "none", split="test", offset=2000, progress=False)


def test_per_class_needs_labels(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    images = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(9)]
    datasets.Dataset.from_dict({"img": images, "label": [0, 0, 0, 0, 1, 1, -1, -1, 2]},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    index = write_shards(str(tmp_path / "hf"), tmp_path / "out", per_class=2, progress=False)
    written = sorted(int(f["cls"]) for f in read_tar(tmp_path / "out" / "shard-000000.tar").values())
    assert written == [0, 0, 1, 1, 2] and index["total"] == 5  # class 2 has one; unlabeled rows are never picked
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "x.jpg")
    with pytest.raises(ValueError, match="per_class needs labels"):
        write_shards(str(tmp_path / "plain"), tmp_path / "out2", per_class=2, labeled=False, progress=False)
