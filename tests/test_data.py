"""vitcore.data: sources -> shard writer -> streamed batches, on tiny data built in a temp dir."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision.transforms import v2

from vitcore.data import (
    ShardStream,
    decode_image,
    eval_transform,
    finetune_train_transform,
    normalize,
    open_image,
    open_source,
    pretrain_transform,
    read_index,
)
from vitcore.data.shards import main, write_shards
from vitcore.data.transforms import PRETRAIN_SCALE, crop_params

CLASSES = ["cat", "dog", "eel"]
PER_CLASS = 13
CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-10k.tar"


def _jpeg(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _make_image(rng: random.Random, i: int) -> tuple[Image.Image, str]:
    """Textured (so crops and flips show), of varied sizes and modes: grayscale and CMYK JPEGs
    and an RGBA PNG must all come out RGB."""
    size = (rng.randint(20, 60), rng.randint(20, 60))
    noise = Image.effect_noise(size, 60)
    flat = Image.new("L", size, rng.randrange(256))
    if i % 5 == 1:
        return noise, "jpg"
    if i % 5 == 2:
        return Image.merge("CMYK", [noise, flat, noise, flat]), "jpeg"
    if i % 5 == 3:
        return Image.merge("RGBA", [noise, flat, noise, Image.new("L", size, 255)]), "png"
    return Image.merge("RGB", [noise, flat, noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]), "JPEG"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 13 valid images plus a garbage file and a truncated JPEG."""
    root = tmp_path_factory.mktemp("folder")
    rng = random.Random(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(PER_CLASS):
            image, ext = _make_image(rng, i)
            (root / c / f"{i:02d}.{ext}").write_bytes(_jpeg(image, "PNG" if ext == "png" else "JPEG"))
    (root / "dog" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    whole = _jpeg(Image.effect_noise((64, 64), 50).convert("RGB"))
    (root / "eel" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def _folder_keys(root: Path) -> set[str]:
    return {f"{c}/{p.name.replace('.', '_')}" for c in CLASSES for p in (root / c).iterdir() if p.stem.isdigit()}


@pytest.fixture(scope="module")
def shard_dir(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(str(image_folder), out, resize=24, samples_per_shard=5, progress=False)
    return out


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _epoch(stream: ShardStream) -> list[dict]:
    return list(stream)


# ---------------------------------------------------------------- shard writer


def test_index_and_shard_contents(shard_dir: Path, image_folder: Path) -> None:
    index = read_index(shard_dir)
    assert index["total"] == len(CLASSES) * PER_CLASS == sum(s["samples"] for s in index["shards"])
    assert index["classes"] == CLASSES
    assert (index["skipped"], index["resize"], index["quality"], index["seed"]) == (2, 24, 90, 0)
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(8)]
    skipped = (shard_dir / "skipped.txt").read_text()
    assert "garbage" in skipped and "truncated" in skipped
    assert not list(shard_dir.glob("*.tmp"))

    keys = set()
    for shard in index["shards"]:
        samples = _tar_samples(shard_dir / shard["name"])
        assert len(samples) == shard["samples"]
        for key, files in samples.items():
            image = Image.open(io.BytesIO(files["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(image.size) <= 24
            assert CLASSES[int(files["cls"])] == key.split("/")[0]
            keys.add(key)
    assert keys == _folder_keys(image_folder)


def test_resize_keeps_aspect_and_never_enlarges(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (200, 100)).save(root / "a" / "wide.jpg")
    Image.new("RGB", (10, 12)).save(root / "b" / "tiny.jpg")
    write_shards(str(root), tmp_path / "out", resize=50, progress=False)
    samples = _tar_samples(tmp_path / "out" / "shard-000000.tar")
    assert Image.open(io.BytesIO(samples["a/wide_jpg"]["jpg"])).size == (100, 50)
    assert Image.open(io.BytesIO(samples["b/tiny_jpg"]["jpg"])).size == (10, 12)


def test_exif_orientation_is_baked_into_the_pixels(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 20)).save(tmp_path / "imgs" / "rotated.jpg", exif=exif.tobytes())
    write_shards(str(tmp_path / "imgs"), tmp_path / "out", progress=False)
    (files,) = _tar_samples(tmp_path / "out" / "shard-000000.tar").values()
    assert Image.open(io.BytesIO(files["jpg"])).size == (20, 40)


def test_shuffle_is_seeded_and_shards_roll_by_bytes(image_folder: Path, tmp_path: Path) -> None:
    def first_shard(seed: int | None, name: str) -> bytes:
        write_shards(str(image_folder), tmp_path / name, samples_per_shard=10, shuffle_seed=seed, progress=False)
        return (tmp_path / name / "shard-000000.tar").read_bytes()

    assert first_shard(1, "a") == first_shard(1, "b")
    assert first_shard(1, "a") != first_shard(2, "c")
    first_shard(None, "d")  # no shuffle: source order, which is sorted by path
    assert list(_tar_samples(tmp_path / "d" / "shard-000000.tar")) == sorted(_folder_keys(image_folder))[:10]

    index = write_shards(str(image_folder), tmp_path / "e", max_bytes=3000, resize=24, progress=False)
    assert len(index["shards"]) > 3
    assert all((tmp_path / "e" / s["name"]).stat().st_size <= 3000 for s in index["shards"] if s["samples"] > 1)
    # A rerun that writes fewer shards removes the stale ones.
    write_shards(str(image_folder), tmp_path / "e", samples_per_shard=100, progress=False)
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
        ShardStream(str(missing), pretrain_transform(16), 4)
    with pytest.raises(FileNotFoundError, match=r"x-000000\.tar \(and 1 more\)"):
        ShardStream(str(tmp_path / "x-{000000..000001}.tar"), pretrain_transform(16), 4)


def test_cli_writes_shards(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--source", str(image_folder), "--out", str(tmp_path / "out"), "--resize", "16",
          "--samples-per-shard", "20", "--limit", "30", "--unlabeled", "--quality", "80"])
    assert "wrote 29 samples in 2 shards" in capsys.readouterr().out  # 30 minus the garbage file
    index = read_index(tmp_path / "out")
    assert (index["total"], index["skipped"], index["classes"], index["quality"]) == (29, 1, None, 80)
    assert all("cls" not in files for files in _tar_samples(tmp_path / "out" / "shard-000000.tar").values())


# ---------------------------------------------------------------- other sources


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
    for files in _tar_samples(tmp_path / "out" / "shard-000000.tar").values():
        brightness = decode_image(files["jpg"]).getpixel((10, 10))[0]
        assert index["classes"][int(files["cls"])] == ("zebra" if brightness > 128 else "ant")

    # HF's -1 means "no label": such a row is written without one, not as the last class
    unlabeled = datasets.Dataset.from_dict({"img": images[:4], "label": [0, -1, 1, -1]}, features=features)
    unlabeled.save_to_disk(str(tmp_path / "hf-missing"))
    write_shards(str(tmp_path / "hf-missing"), tmp_path / "out-missing", shuffle_seed=None, progress=False)
    samples = _tar_samples(tmp_path / "out-missing" / "shard-000000.tar")
    assert [files.get("cls") for _, files in sorted(samples.items())] == [b"0", None, b"1", None]


def test_a_crash_mid_rewrite_leaves_no_stale_index(image_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    write_shards(str(image_folder), out, samples_per_shard=5, progress=False)
    assert (out / "index.json").is_file()
    from vitcore.data import shards as shards_module

    def full_disk(self, key: str, files: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards_module._ShardSink, "add", full_disk)
    with pytest.raises(OSError, match="No space left"):  # an error, not 39 "skipped images"
        write_shards(str(image_folder), out, samples_per_shard=5, progress=False)
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
    labels = {k: int(f["cls"]) for k, f in _tar_samples(tmp_path / "out" / "shard-000000.tar").items()}
    assert labels["FakeCIFAR_test_00000000"] == 0 and labels["FakeCIFAR_test_00000001"] == 1
    with pytest.raises(ValueError, match="has the splits train and test, not 'val'"):  # not silently the test set
        write_shards("torchvision:FakeCIFAR", tmp_path / "val", split="val", download_dir=tmp_path, progress=False)


def test_hidden_folders_and_files_are_neither_classes_nor_samples(tmp_path: Path) -> None:
    for name in ("cat/1.jpg", "dog/2.jpg", ".ipynb_checkpoints/3.jpg", "dog/.4.jpg"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(_jpeg(Image.new("RGB", (8, 8))))
    index = write_shards(str(tmp_path / "src"), tmp_path / "out", progress=False)
    assert (index["total"], index["classes"]) == (2, ["cat", "dog"])


# ---------------------------------------------------------------- transforms


def test_transforms_give_uint8_chw_and_normalize_maps_to_unit_range() -> None:
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    assert pretrain_transform(16)(image).shape == (3, 16, 16)
    assert pretrain_transform((16, 24))(image).shape == (3, 16, 24)
    assert finetune_train_transform(16, randaugment=True)(image).dtype == torch.uint8
    out = eval_transform(32)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    x = normalize(torch.stack([out, torch.zeros_like(out)]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
    assert x[0, 0].allclose(torch.tensor(1.0)) and x[1].allclose(torch.tensor(-1.0))


def test_draft_decode_shrinks_jpeg_but_not_below_target() -> None:
    data = _jpeg(Image.new("L", (224, 224), 7))
    image = decode_image(data, (64, 64))
    assert image.mode == "RGB" and image.size == (112, 112)
    assert decode_image(data, (200, 200)).size == (224, 224)
    with pytest.raises(OSError):
        decode_image(data[:300])


def _v2_reference(size: int, scale: tuple[float, float]) -> v2.Compose:
    """The unfused pipeline the fused transform replaces, for a fully decoded RGB image."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
                       v2.PILToTensor()])


def _smooth_image(size: tuple[int, int]) -> Image.Image:
    """Gradients only: DCT-domain downscaling loses little on it."""
    ramp = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", [ramp, ramp.transpose(Image.Transpose.ROTATE_90).resize(size),
                               Image.radial_gradient("L").resize(size)])


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_crop_params_are_torchvisions() -> None:
    rrc = v2.RandomResizedCrop(16, scale=PRETRAIN_SCALE)
    for width, height in [(90, 70), (20, 300), (300, 20), (1, 1)]:  # the last two fall back to the centre
        image = Image.new("RGB", (width, height))
        for seed in range(50):
            torch.manual_seed(seed)
            ours = crop_params(width, height, PRETRAIN_SCALE)
            torch.manual_seed(seed)
            theirs = rrc.make_params([image])
            assert ours == (theirs["top"], theirs["left"], theirs["height"], theirs["width"])


def test_fused_crop_matches_v2_without_draft() -> None:
    """Same seed, same box and flip: only the resampling at the box edges differs."""
    rng = random.Random(1)
    for i in range(5):
        image, _ = _make_image(rng, 0)  # RGB noise of a random size, fully decoded: no draft possible
        image = image.resize((image.width * 2, image.height * 2))
        for seed in range(20):
            torch.manual_seed(seed)
            want = _v2_reference(24, PRETRAIN_SCALE)(image)
            torch.manual_seed(seed)
            got = pretrain_transform(24)(image)
            assert got.dtype == torch.uint8 and got.shape == (3, 24, 24)
            assert _mean_abs_diff(got, want) < 3


def test_fused_crop_drafts_a_jpeg_close_to_the_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # noqa: ANN001, ANN202
        result = draft(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = _jpeg(_smooth_image((256, 192)))
    full = decode_image(data)
    for seed in range(30):
        torch.manual_seed(seed)
        _, _, h, w = crop_params(256, 192, PRETRAIN_SCALE)
        torch.manual_seed(seed)
        want = _v2_reference(16, PRETRAIN_SCALE)(full)
        torch.manual_seed(seed)
        got = pretrain_transform(16)(open_image(data))
        assert _mean_abs_diff(got, want) < 3
        # The strongest reduction that keeps the crop box at least 16 px on both sides.
        assert scales[-1] == max(r for r in (1, 2, 4, 8) if min(h, w) >= 16 * r)
    assert len(scales) == 30 and {4, 8} <= set(scales)


def test_eval_transform_matches_v2_resize_and_centre_crop() -> None:
    data = _jpeg(_smooth_image((300, 200)))
    for size, resize in ((32, 36), ((24, 40), 45)):
        reference = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])
        want = reference(decode_image(data))
        got = eval_transform(size)(open_image(data))  # decoded at 1/4 scale
        assert got.shape == want.shape and _mean_abs_diff(got, want) < 3
        noise = Image.effect_noise((300, 200), 60).convert("RGB")  # decoded: no draft
        assert _mean_abs_diff(eval_transform(size)(noise), reference(noise)) < 1


def test_flips_half_the_time_and_seeds_reproduce() -> None:
    ramp = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).convert("RGB")  # bright left, dark right
    data = _jpeg(ramp)
    transform = pretrain_transform(16)
    flipped = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = transform(open_image(data)).float()
        flipped += bool(out[:, :, 0].mean() < out[:, :, -1].mean())
        torch.manual_seed(seed)
        assert torch.equal(transform(open_image(data)), out.to(torch.uint8))
    assert 70 < flipped < 130
    torch.manual_seed(0)
    a = transform(open_image(data))
    torch.manual_seed(1)
    assert not torch.equal(a, transform(open_image(data)))


def test_any_mode_and_png_come_out_rgb() -> None:
    noise = Image.effect_noise((50, 40), 60)
    flat = Image.new("L", (50, 40), 100)
    smooth = _smooth_image((50, 40)).split()  # JPEGs here get drafted: smooth, to compare with a full decode
    images = {
        "png rgba": _jpeg(Image.merge("RGBA", [noise, flat, noise, flat]), "PNG"),
        "png palette": _jpeg(Image.merge("RGB", [noise, flat, noise]).quantize(16), "PNG"),
        "jpeg grey": _jpeg(smooth[0]),
        "jpeg cmyk": _jpeg(Image.merge("CMYK", [*smooth, flat])),
    }
    for name, data in images.items():
        decoded = decode_image(data)  # the reference: everything to RGB first, as before the fusion
        for transform in (pretrain_transform(16), finetune_train_transform(16, randaugment=False), eval_transform(16)):
            torch.manual_seed(0)
            got = transform(open_image(data))
            torch.manual_seed(0)
            want = transform(decoded)
            assert got.dtype == torch.uint8 and got.shape == (3, 16, 16), name
            assert _mean_abs_diff(got, want) < 3, name
        if name == "jpeg grey":
            assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])
        assert finetune_train_transform(16, randaugment=True)(open_image(data)).shape == (3, 16, 16)
    with pytest.raises(OSError):
        pretrain_transform(16)(open_image(images["jpeg grey"][: len(images["jpeg grey"]) // 2]))


# ---------------------------------------------------------------- stream


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_webdataset(fmt: int) -> None:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from vitcore.data.tar import iter_tar_samples

    deep = "/".join(["folder"] * 14)  # > 100 characters: ustar prefix, GNU long name or pax path
    files = {f"{deep}/a.jpg": b"1", f"{deep}/a.cls": b"2", "b.x.JPG": b"3" * 700, "__meta__/info.json": b"{}",
             "noext": b"4", "c.jpg": b"", "c.cls": b"5"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir_info("adir"))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = list(iter_tar_samples(io.BytesIO(buf.getvalue())))
    theirs = [{k: v for k, v in s.items() if k != "__url__"}
              for s in group_by_keys(tar_file_expander([{"url": "u", "stream": io.BytesIO(buf.getvalue())}]))]
    assert ours == theirs and [s["__key__"] for s in ours] == [f"{deep}/a", "b", "c"]
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_samples(io.BytesIO(buf.getvalue()[:1500])))


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_stream_gives_up_when_no_shard_is_readable(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 200)
    stream = ShardStream(str(tmp_path / "bad.tar"), pretrain_transform(8), 2, num_workers=0, epoch_samples=10)
    with pytest.raises(RuntimeError, match="shards in a row gave no sample"):
        list(stream)


def test_stream_gives_up_when_every_sample_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitcore.data.stream as stream_module

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(8):
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = 10
            tar.addfile(info, io.BytesIO(b"not a jpeg"))
    (tmp_path / "bad.tar").write_bytes(buf.getvalue())
    monkeypatch.setattr(stream_module, "FAILED_SAMPLES_IN_A_ROW", 20)  # 1000 in production
    stream = ShardStream(str(tmp_path / "bad.tar"), pretrain_transform(8), 2, num_workers=0, epoch_samples=10,
                         labeled=False)
    with pytest.raises(RuntimeError, match="20 samples in a row failed"):
        list(stream)


def test_corrupt_pax_record_is_an_error_not_a_hang() -> None:
    from vitcore.data.tar import iter_tar_samples

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("/".join(["long"] * 40) + "/a.jpg")  # a pax path record
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    data = bytearray(buf.getvalue())
    record = data.index(b" path=")  # "<len> path=...": make <len> zero
    start = record - len(str(int(data[record - 3:record])))
    data[start:record] = b"0" * (record - start)
    header = tarfile.TarInfo.frombuf(bytes(data[:512]), "utf-8", "surrogateescape")
    assert header.type == tarfile.XHDTYPE
    # the pax header's checksum does not cover its data, so the reader must judge the record itself
    with pytest.raises(tarfile.ReadError, match="pax"):
        list(iter_tar_samples(io.BytesIO(bytes(data))))


def test_index_shard_names_cannot_be_commands_or_escape_the_folder(shard_dir: Path, tmp_path: Path) -> None:
    index = json.loads((shard_dir / "index.json").read_text())
    for name in ("pipe:touch pwned", "../elsewhere.tar", "/abs/shard.tar", "https://host/x.tar"):
        folder = tmp_path / str(abs(hash(name)))
        folder.mkdir()
        bad = {**index, "shards": [{**index["shards"][0], "name": name}]}
        (folder / "index.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="is not a file name in that folder"):
            ShardStream(str(folder), pretrain_transform(8), 2)
    assert not Path("pwned").exists()


def test_shards_are_drawn_in_proportion_to_their_size() -> None:
    from vitcore.data.stream import _resampled

    draws = _resampled(["big", "small"], [900, 100], random.Random(0))
    picks = [next(draws) for _ in range(20000)]
    assert 0.085 < picks.count("small") / len(picks) < 0.115  # 10% of the samples live there
    uniform = _resampled(["big", "small"], None, random.Random(0))
    assert 0.47 < sum(next(uniform) == "small" for _ in range(20000)) / 20000 < 0.53  # no index: uniform



def test_shuffle_buffer_is_a_seeded_permutation() -> None:
    from vitcore.data.stream import _shuffled

    def shuffled(n: int, bufsize: int, seed: int) -> list[int]:
        return list(_shuffled(iter(range(n)), bufsize, random.Random(seed)))

    for n, bufsize in [(0, 10), (7, 3), (500, 100), (1000, 1000)]:
        out = shuffled(n, bufsize, seed=1)
        assert sorted(out) == list(range(n))  # every sample once
        assert out == shuffled(n, bufsize, seed=1)  # the same for a seed
    assert shuffled(500, 100, seed=1) != shuffled(500, 100, seed=2)
    assert shuffled(50, 1, seed=1) == list(range(50))  # a buffer of one keeps the order


def test_only_public_webdataset_names_are_used() -> None:
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in root.glob("vitcore/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("webdataset"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"


def test_a_corrupt_index_names_the_file_and_says_it_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{'shards': []}")
    with pytest.raises(ValueError, match=r"^\S+/index.json is not valid JSON \(Expecting property name"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"index.json is not valid JSON"):
        ShardStream(str(tmp_path), pretrain_transform(8), 2)
    (tmp_path / "index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"index.json is not a shard index"):
        read_index(tmp_path / "index.json")

def test_in_process_stream_leaves_the_global_rng_alone(shard_dir: Path) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(ShardStream(str(shard_dir), pretrain_transform(8), 4, num_workers=0))
    assert torch.equal(torch.rand(3), expected)


def test_every_rank_gets_the_same_batch_count(shard_dir: Path, image_folder: Path) -> None:
    valid = _folder_keys(image_folder)
    for rank in range(2):
        stream = ShardStream(str(shard_dir), pretrain_transform(16), 4, rank=rank, world_size=2, num_workers=2,
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
    stream = ShardStream(str(shard_dir), pretrain_transform(8), 2, num_workers=3, epoch_samples=14)
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
    assert sorted(keys) == sorted(_folder_keys(image_folder))


def test_stream_is_seeded_and_differs_per_epoch(shard_dir: Path) -> None:
    def run(seed: int) -> tuple[list[dict], list[dict]]:
        stream = ShardStream(str(shard_dir), pretrain_transform(16), 4, num_workers=2, seed=seed, shuffle_buffer=8)
        return _epoch(stream), _epoch(stream)

    first, second = run(0)
    again, _ = run(0)
    other, _ = run(1)
    keys = lambda batches: [b["key"] for b in batches]  # noqa: E731
    assert keys(first) == keys(again) and all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert keys(first) != keys(second) and keys(first) != keys(other)


@pytest.fixture(scope="module")
def corrupt_dir(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards: good + bad JPEG bytes + missing cls; intact; cut inside its third sample."""
    out = tmp_path_factory.mktemp("corrupt")
    good = _tar_samples(shard_dir / "shard-000000.tar")
    with tarfile.open(out / "c-000000.tar", "w") as tar:
        extra = {"bad/jpeg": {"jpg": b"\xff\xd8garbage", "cls": b"1"},
                 "no/cls": {"jpg": next(iter(good.values()))["jpg"]}}
        for key, files in {**good, **extra}.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (out / "c-000001.tar").write_bytes((shard_dir / "shard-000001.tar").read_bytes())
    whole = (shard_dir / "shard-000002.tar").read_bytes()
    with tarfile.open(shard_dir / "shard-000002.tar") as tar:
        third_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2]
    (out / "c-000002.tar").write_bytes(whole[: third_jpg.offset_data + third_jpg.size // 2])
    shards = [{"name": f"c-{i:06d}.tar", "samples": n} for i, n in enumerate([7, 5, 5])]
    (out / "index.json").write_text(json.dumps({"shards": shards, "total": 17, "classes": CLASSES}))
    return out


def test_corrupt_samples_are_skipped_and_counted(corrupt_dir: Path) -> None:
    stream = ShardStream(str(corrupt_dir), pretrain_transform(8), 2, num_workers=2, resampled=False, drop_last=False)
    keys = [k for b in _epoch(stream) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 5 + 5 + 2
    assert "bad/jpeg" not in keys and "no/cls" not in keys
    assert stream.skipped == 3  # bad JPEG, missing cls, truncated shard

    unlabeled = ShardStream(str(corrupt_dir), pretrain_transform(8), 2, num_workers=0, resampled=False,
                            drop_last=False, labeled=False)
    assert "no/cls" in [k for b in _epoch(unlabeled) for k in b["key"]] and unlabeled.skipped == 2

    resampled = ShardStream(str(corrupt_dir), pretrain_transform(8), 2, num_workers=2, shuffle_buffer=4)
    assert len(_epoch(resampled)) == len(resampled) == 8 and resampled.skipped > 0


def test_truncated_jpeg_is_skipped_and_counted(shard_dir: Path, tmp_path: Path) -> None:
    """Its header parses, so only the decode inside the transform fails: still a counted skip."""
    whole = _jpeg(Image.effect_noise((96, 96), 50).convert("RGB"))
    assert open_image(whole[: len(whole) // 2]).size == (96, 96)
    good = dict(list(_tar_samples(shard_dir / "shard-000000.tar").items())[:3])
    with tarfile.open(tmp_path / "t-000000.tar", "w") as tar:
        for key, files in {**good, "cut/jpeg": {"jpg": whole[: len(whole) // 2], "cls": b"0"}}.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shards = [{"name": "t-000000.tar", "samples": 4}]
    (tmp_path / "index.json").write_text(json.dumps({"shards": shards, "total": 4, "classes": CLASSES}))
    for transform in (pretrain_transform(8), eval_transform(8)):  # both draft it: a reduced decode
        stream = ShardStream(str(tmp_path), transform, 2, num_workers=0, resampled=False, drop_last=False)
        keys = [k for b in _epoch(stream) for k in b["key"]]
        assert sorted(keys) == sorted(good) and stream.skipped == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_batches_of_an_uninterrupted_run(corrupt_dir: Path, num_workers: int) -> None:
    def make() -> ShardStream:
        return ShardStream(str(corrupt_dir), pretrain_transform(8), 2, num_workers=num_workers, shuffle_buffer=6)

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
    stream = ShardStream(str(shard_dir), pretrain_transform(8), 2, num_workers=2, shuffle_buffer=8)
    head = [b["key"] for _, b in zip(range(4), stream)]
    state = stream.state_dict()
    resumed = ShardStream(str(shard_dir), pretrain_transform(8), 2, num_workers=1, shuffle_buffer=8)
    resumed.load_state_dict(state)
    rest = [b["key"] for b in resumed]
    assert len(rest) == len(resumed) - 4 and rest[:4] != head
    assert len(list(resumed)) == len(resumed)  # the next epoch is whole again


@pytest.mark.parametrize("world_size,batch_size", [(2, 2), (1, 3), (2, 5)])
def test_resume_late_in_an_epoch_with_another_layout_finishes_it(shard_dir: Path, world_size: int,
                                                                  batch_size: int) -> None:
    """A position taken near the end of an epoch on 1 rank with batches of 2 becomes a position of
    the new layout (samples consumed, rounded up): no crash, no overrun, the next epoch whole."""
    stream = ShardStream(str(shard_dir), pretrain_transform(8), 2, num_workers=2, shuffle_buffer=8)
    consumed = len(stream) - 2
    for _, _batch in zip(range(consumed), stream):
        pass
    state = stream.state_dict()
    for rank in range(world_size):
        resumed = ShardStream(str(shard_dir), pretrain_transform(8), batch_size, rank=rank, world_size=world_size,
                              num_workers=1, shuffle_buffer=8)
        resumed.load_state_dict(state)
        done = -(-consumed * 2 // (batch_size * world_size))
        assert len(list(resumed)) == max(len(resumed) - done, 0)
        assert resumed.epoch == 1 and len(list(resumed)) == len(resumed)


def test_labeled_stream_on_unlabeled_shards_is_refused(image_folder: Path, tmp_path: Path) -> None:
    write_shards(str(image_folder), tmp_path / "out", labeled=False, limit=8, progress=False)
    with pytest.raises(ValueError, match="labeled=False"):
        ShardStream(str(tmp_path / "out"), pretrain_transform(8), 2)
    stream = ShardStream(str(tmp_path / "out"), pretrain_transform(8), 2, labeled=False, num_workers=0)
    assert all(b["label"] is None for b in stream)


# ---------------------------------------------------------------- real data


def test_real_cifar_subset_round_trip(tmp_path: Path) -> None:
    if not CIFAR_TAR.exists():
        pytest.skip(f"{CIFAR_TAR} not present")
    index = write_shards(str(CIFAR_TAR), tmp_path, split="train", limit=200, samples_per_shard=50, progress=False)
    assert index["total"] == 200 and len(index["shards"]) == 4 and index["skipped"] == 0
    classes = index["classes"]
    assert len(classes) == 10 and classes == sorted(classes) and "airplane" in classes
    stream = ShardStream(str(tmp_path), eval_transform(32), 50, num_workers=0, resampled=False)
    batches = _epoch(stream)
    assert [b["image"].shape for b in batches] == [(50, 3, 32, 32)] * 4
    assert len(set(torch.cat([b["label"] for b in batches]).tolist())) == 10
