"""Shared fixtures: tiny shards of images, built once per test session."""

import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_TAR = SHARED_DATA / "cifar10-10k.tar"


def _synthetic_folder(root: Path, count: int) -> Path:
    """`count` 32 px images in 10 class folders: coloured shapes on coloured grounds, so that patch
    colours vary as in photos. Stands in for CIFAR-10 where the shared data is absent."""
    rng = random.Random(0)
    for i in range(count):
        colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
        image = Image.new("RGB", (32, 32), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.randrange(24), rng.randrange(24)
            draw.ellipse((x, y, x + rng.randrange(4, 16), y + rng.randrange(4, 16)), fill=colour())
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    return root


def _cifar_split(tmp_path_factory, name: str, split: str, limit: int, samples_per_shard: int, seed: int) -> Path:
    """`limit` real CIFAR-10 images of `split` as shards (synthetic ones when the shared data are absent)."""
    from vitcore.data.shards import write_shards

    source = CIFAR_TAR if CIFAR_TAR.exists() else _synthetic_folder(tmp_path_factory.mktemp(f"synthetic-{name}"), limit)
    out = tmp_path_factory.mktemp(name)
    write_shards(str(source), out, split=split if source == CIFAR_TAR else None, limit=limit,
                 samples_per_shard=samples_per_shard, shuffle_seed=seed, progress=False)
    return out


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory) -> Path:
    """256 CIFAR-10 training images (32 px) in 4 shards with an index.json: the real ones from
    the shared data when present (as in CI), else synthetic ones, so that the engine tests run anywhere."""
    return _cifar_split(tmp_path_factory, "cifar-shards", "train", 256, 64, seed=0)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 13 images of varied sizes and modes, plus a garbage file and a truncated JPEG."""
    from shard_helpers import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def shard_dir(image_folder, tmp_path_factory) -> Path:
    """`image_folder` written by the shard writer: 39 samples (41 source images) in shards of 5, 24 px."""
    from vitcore.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(str(image_folder), out, resize=24, samples_per_shard=5, progress=False)
    return out


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory):
    """Builds a shard folder by hand, for shards the writer would not make (corrupt ones, say):
    `make_shards({name: [(key, {ext: bytes}), ...]}, classes, index=True)` writes the tars and
    their index.json into a new temporary folder and returns it."""
    from shard_helpers import build_shards

    def make(shards, classes, index=True) -> Path:
        return build_shards(tmp_path_factory.mktemp("built-shards"), shards, classes, index)

    return make


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory) -> Path:
    """100 held-out images in 3 shards of unequal size (40, 40, 20)."""
    return _cifar_split(tmp_path_factory, "val-shards", "test", 100, 40, seed=1)


@pytest.fixture(scope="session")
def pretrained(cifar_shards, tmp_path_factory) -> Path:
    """A Pico/8 MPP checkpoint at 32 px (4x4 grid), trained for 2 steps."""
    from pretrain.config import PretrainConfig
    from pretrain.task import MPPTask
    from vitcore.train.engine import main

    out = tmp_path_factory.mktemp("pretrain") / "run"
    main(PretrainConfig, MPPTask, [f"data.shards={cifar_shards}", f"run.out_dir={out}", "model.variant=Pico/8",
                                   "model.image_size=32", "data.batch_size=16", "data.num_workers=0", "run.steps=2",
                                   "optim.warmup_steps=1"])
    return out / "checkpoints" / "latest"


@pytest.fixture(scope="session")
def classifier(cifar_shards, val_shards, pretrained, tmp_path_factory) -> Path:
    """A finished Pico/8 classifier run at 32 px (10 CIFAR classes): `pretrained` fine-tuned for 4 steps
    (a large learning rate, so that the head is far from zero) and evaluated on `val_shards`."""
    from finetune.config import FinetuneConfig
    from finetune.task import ClassifyTask
    from vitcore.train.engine import main

    out = tmp_path_factory.mktemp("classifier") / "run"
    main(FinetuneConfig, ClassifyTask, [f"init_from={pretrained}", f"data.shards={cifar_shards}",
                                        f"eval.shards={val_shards}", f"run.out_dir={out}", "model.variant=Pico/8",
                                        "model.image_size=32", "data.batch_size=16", "data.num_workers=0",
                                        "eval.num_workers=0", "optim.lr=0.05", "optim.warmup_steps=1",
                                        "run.steps=4", "run.image_every=0"])
    return out


def real_images(dest: Path, count: int) -> Path:
    """`count` real images in class folders under `dest`: JPEGs of the CIFAR-10 test split from the
    shared data (every 50th), or synthetic PNGs where it is absent."""
    import tarfile

    if not CIFAR_TAR.exists():
        return _synthetic_folder(dest, count)
    with tarfile.open(CIFAR_TAR) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and "/test/" in m.name), key=lambda m: m.name)
        for m in members[::50][:count]:
            target = dest / Path(m.name).parent.name / Path(m.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
    return dest


@pytest.fixture
def make_data(cifar_shards, val_shards, tmp_path) -> Path:
    """The folder `make experiment`, `make sweep` and `make pretrain-curve` read (EXP_DATA), tiny:
    every training set they name is the CIFAR shards and every held-out one the validation shards;
    with an empty docs/figures/ beside it for their copies (EXP_DOCS, SWEEP_DOCS, CURVE_DOCS)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "train-10pct", "monitor-train", "sweep-train"):
        os.symlink(cifar_shards, data / name)
    for name in ("val", "monitor-val", "sweep-holdout"):
        os.symlink(val_shards, data / name)
    (tmp_path / "docs" / "figures").mkdir(parents=True)
    return data
