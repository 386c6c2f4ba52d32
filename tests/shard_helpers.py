"""Helpers for the data tests: a class-folder image source, shard folders built by hand, and a
writer killed part-way (`kill_after`).

The `image_folder`, `shard_dir` and `make_shards` fixtures in conftest.py use these; tests import
the constants and the readers (`read_tar`, `folder_keys`, `encode`) directly.
"""

from __future__ import annotations

import io
import random
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from vitcore.data.index import write_index

CLASSES = ["cat", "dog", "eel"]
PER_CLASS = 13
Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def make_image(rng: random.Random, i: int) -> tuple[Image.Image, str]:
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


def write_image_folder(root: Path) -> Path:
    """CLASSES x PER_CLASS valid images in class folders, plus a garbage file and a truncated JPEG."""
    rng = random.Random(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            image, ext = make_image(rng, i)
            (root / c / f"{i:02d}.{ext}").write_bytes(encode(image, "PNG" if ext == "png" else "JPEG"))
    (root / "dog" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    whole = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    (root / "eel" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def folder_keys(root: Path) -> set[str]:
    """The sample keys the shard writer gives the valid images of `write_image_folder`."""
    return {f"{c}/{p.name.replace('.', '_')}" for c in CLASSES for p in (root / c).iterdir() if p.stem.isdigit()}


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples, {key: {extension: bytes}}, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def build_shards(folder: Path, shards: dict[str, list[Sample]], classes: list[str] | None,
                 index: bool = True) -> Path:
    """Write each `shards` entry as a tar of its samples, in order, into `folder`, and (with `index`)
    an index.json listing them, written as the shard writer writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, samples in shards.items():
        with tarfile.open(folder / name, "w") as tar:
            for key, files in samples:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if index:
        write_index(folder, [{"name": name, "samples": len(samples)} for name, samples in shards.items()], classes)
    return folder


def kill_after(writer: subprocess.Popen, record: Path, settle: float = 0.0,
               before_kill: Callable[[], Any] | None = None) -> Any:
    """SIGKILL a shard writer once `record` (a shard's progress record: the shard and its record are
    both on disk) exists, `settle` seconds later; it must still be running then (killed mid-way, not
    done). Returns what `before_kill` returns (called just before the signal)."""
    try:
        deadline = time.monotonic() + 120
        while not record.exists():
            assert writer.poll() is None, f"the writer exited (status {writer.returncode}) before {record.name}"
            assert time.monotonic() < deadline, f"no {record.name} after 120 s"
            time.sleep(0.01)
        time.sleep(settle)
        seen = before_kill() if before_kill else None
        writer.send_signal(signal.SIGKILL)
        assert writer.wait() == -signal.SIGKILL, "the writer had finished before the kill"
        return seen
    finally:
        if writer.poll() is None:
            writer.kill()
