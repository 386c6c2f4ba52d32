"""Data loading throughput: WebDataset shards (ShardStream) vs torchvision ImageFolder + DataLoader.

Both read the same Imagenette train images with the same augmentation (random resized crop to the
pretraining size + flip, uint8 out), batch size and worker count; shards are built once by the
project's shard writer into a cache folder, with and without a pre-resize. Each path runs with the
fused transform (`train_transform`: crop box from the JPEG header, DCT-reduced decode, one
resize) and with the torchvision v2 pipeline it replaced. ImageFolder's default loader decodes the
whole image before any transform, so it gets no draft; the fused transform still saves it the v2
dispatch. The headline compares the best shard path with the best ImageFolder path.
Also measures peak RSS streaming from 4 vs 40 shards of the same images.

The anchor users would otherwise pick: the stock webdataset pipeline as open_clip builds it
(`wds.DataPipeline`: shard list, seeded shard shuffle, split by node and worker, tar to samples,
sample shuffle, decode "pilrgb", the transform, batched, `with_epoch`, a persistent `WebLoader`),
with the same transform, shards (`make demo`'s 112 px Imagenette by default), batch size, workers
and shuffle buffer as ShardStream. Decoding "pilrgb" decodes every pixel before the transform, so
that baseline gets no DCT draft; a second baseline hands the transform the header-only image
(`open_image`) as ShardStream does, so the ratio against it is the pipeline alone.

    python benchmarks/data_throughput.py [--images 3000] [--size 64] [--resize 80] [--workers 2] \
        [--wds-shards data/imagenette-112/train]

Prints a table and writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from pretrain.task import CROP_SCALE
from vitcore.data import ShardStream, open_image, open_source, read_index, resolve_shards, train_transform
from vitcore.data.shards import write_shards
from vitcore.data.shards import shuffled_order

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "imagenette2-224.tar"
DEMO_SHARDS = ROOT / "data" / "imagenette-112" / "train"  # written by `make demo`
IMAGE_EXTS = "jpg;png;jpeg;webp"  # open_clip's image keys
RESULTS = ROOT / "benchmarks" / "results"


class V2Transform:
    """The pipeline before the fused transform: decode (a JPEG drafted to >= the output size, as
    the stream did; a no-op on ImageFolder's decoded images), then torchvision v2."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pipeline = v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                                    v2.RandomHorizontalFlip(), v2.PILToTensor()])

    def __call__(self, image: Image.Image) -> Tensor:
        image.draft("RGB", (self.size, self.size))
        return self.pipeline(image if image.mode == "RGB" else image.convert("RGB"))


def build_shards(tar: Path, out: Path, images: int, resize: int | None, shards: int) -> Path:
    """Shards of the first `images` (shuffled) train images, rebuilt only when the recipe changed."""
    try:
        index = read_index(out)
        recipe = (index["source"], index["total"] + index["skipped"], index["resize"], len(index["shards"]))
        if recipe == (str(tar), images, resize, shards):
            return out
    except FileNotFoundError:
        pass
    write_shards(str(tar), out, split="train", resize=resize, limit=images, samples_per_shard=-(-images // shards),
                 overwrite=True)  # another recipe: the cache folder is rewritten, not resumed
    return out


def extract_folder(tar: Path, out: Path, images: int) -> Path:
    """The same images as the shards, as class folders of JPEG files for ImageFolder."""
    done = out / ".complete"
    if done.is_file() and done.read_text() == f"{tar} {images}":
        return out
    with open_source(str(tar), split="train") as src:
        for record in src.read(shuffled_order(len(src), 0, images)):
            path = out / f"{record.key}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(record.image)
    done.write_text(f"{tar} {images}")
    return out


def webdataset_loader(shards: str, transform: Callable, batch_size: int, workers: int, shuffle_buffer: int,
                      header_only: bool) -> wds.WebLoader:
    """The stock webdataset pipeline the way open_clip's get_wds_dataset builds it for training
    (not resampled), around our transform; sample shuffle sized like ShardStream's (open_clip: 5000).

    `header_only=False` decodes "pilrgb" as open_clip does (every pixel, before the transform);
    `header_only=True` hands the transform `open_image`'s undecoded image, as ShardStream does.
    """
    urls, _, index = resolve_shards(shards)
    decode = (wds.decode(wds.handle_extension(IMAGE_EXTS.replace(";", " "), open_image), handler=wds.warn_and_continue)
              if header_only else wds.decode("pilrgb", handler=wds.warn_and_continue))
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.detshuffle(bufsize=2000, initial=500, seed=0),  # open_clip's shard shuffle
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=shuffle_buffer, initial=min(100, shuffle_buffer)),  # ShardStream's buffer
        decode,
        wds.rename(image=IMAGE_EXTS, label="cls"),
        wds.map_dict(image=transform),
        wds.to_tuple("image", "label"),
        wds.batched(batch_size, partial=False, collation_fn=default_collate),
    )
    # open_clip's epoch: ceil(samples / batch) batches, rounded up to a multiple of the workers
    worker_batches = math.ceil(math.ceil(index["total"] / batch_size) / max(1, workers))
    return wds.WebLoader(dataset.with_epoch(worker_batches), batch_size=None, shuffle=False,
                         num_workers=workers, persistent_workers=workers > 0)


def images_per_second(loaders: dict[str, Callable[[], Iterable[Any]]], epochs: int) -> dict[str, dict[str, float]]:
    """Best epoch throughput of each loader: end to end (worker start-up included, as a training
    run pays it each epoch) and steady (from the first batch on).

    Loaders take turns epoch by epoch, so background load on a shared machine hits them alike.
    """
    best = {name: {"end_to_end": 0.0, "steady": 0.0} for name in loaders}
    for _ in range(epochs):
        for name, make_epoch in loaders.items():
            start, first, count, first_count = time.perf_counter(), 0.0, 0, 0
            for batch in make_epoch():
                count += len(batch["image"] if isinstance(batch, dict) else batch[0])
                if not first:
                    first, first_count = time.perf_counter(), count
            end = time.perf_counter()
            best[name]["end_to_end"] = max(best[name]["end_to_end"], count / (end - start))
            best[name]["steady"] = max(best[name]["steady"], (count - first_count) / (end - first))
    return best


def peak_rss_mib(shard_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS of a fresh process streaming one epoch from `shard_dir` (main and worker processes)."""
    cmd = [sys.executable, __file__, "--rss-probe", str(shard_dir), "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rss_probe(args: argparse.Namespace) -> None:
    stream = ShardStream(args.rss_probe, train_transform(args.size, CROP_SCALE), args.batch_size, num_workers=args.workers)
    for _ in stream:
        pass
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({
        "main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
    }))


WDS_OURS, WDS_STOCK, WDS_SAME_DECODE = ("ShardStream (ours)", "webdataset, open_clip pipeline, decode pilrgb",
                                        "webdataset, open_clip pipeline, header-only open")


def webdataset_anchor(shards: Path, transform: Callable, args: argparse.Namespace) -> dict[str, Any]:
    """ShardStream vs the stock webdataset pipeline on the same shards, transform, batch and workers."""
    bs, workers, buffer = args.batch_size, args.workers, args.shuffle_buffer
    stream = ShardStream(str(shards), transform, bs, num_workers=workers, shuffle_buffer=buffer)
    stock = webdataset_loader(str(shards), transform, bs, workers, buffer, header_only=False)
    same_decode = webdataset_loader(str(shards), transform, bs, workers, buffer, header_only=True)
    rates = images_per_second({WDS_OURS: lambda: stream, WDS_STOCK: lambda: stock,
                               WDS_SAME_DECODE: lambda: same_decode}, args.epochs)
    ratio = {name: {k: rates[WDS_OURS][k] / r[k] for k in r} for name, r in rates.items() if name != WDS_OURS}
    return {
        "shards": str(shards), "images": read_index(shards)["total"], "batch_size": bs, "workers": workers,
        "shuffle_buffer": buffer, "transform": f"train_transform({args.size}, CROP_SCALE)",
        "decode": {WDS_OURS: "header-only open; the transform decodes with a DCT draft when the crop allows",
                   WDS_STOCK: "wds.decode('pilrgb'): full decode + RGB copy before the transform (no draft)",
                   WDS_SAME_DECODE: "header-only open_image, as ours: the same draft"},
        "webdataset_persistent_workers": True,  # as open_clip's WebLoader
        "images_per_s": rates,
        "ours_over_wds": ratio[WDS_STOCK],
        "ours_over_wds_same_decode": ratio[WDS_SAME_DECODE],
    }


def print_anchor(anchor: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\nvs stock webdataset: {anchor['images']} images from {anchor['shards']}, {anchor['transform']}, "
          f"batch {anchor['batch_size']}, {anchor['workers']} workers, shuffle buffer {anchor['shuffle_buffer']}; "
          f"images/s, best of {args.epochs} epochs")
    print(f"{'loader':<50}{'end-to-end':>12}{'steady':>9}{'ours / it':>18}")
    ratios = {WDS_OURS: None, WDS_STOCK: anchor["ours_over_wds"], WDS_SAME_DECODE: anchor["ours_over_wds_same_decode"]}
    for name, r in anchor["images_per_s"].items():
        ratio = ratios[name]
        cell = f"{ratio['end_to_end']:>10.2f}x /{ratio['steady']:>5.2f}x" if ratio else ""
        print(f"{name:<50}{r['end_to_end']:>12.0f}{r['steady']:>9.0f}{cell:>18}")
    for name, how in anchor["decode"].items():
        print(f"  decode, {name}: {how}")
    print("  webdataset loaders keep their workers across epochs (open_clip's persistent_workers=True)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tar", type=Path, default=DEFAULT_TAR)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=64, help="pretraining resolution")
    p.add_argument("--resize", type=int, default=80, help="shorter side of the pre-resized shards")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per loader (best is kept)")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache" / "data_throughput")
    p.add_argument("--wds-shards", type=Path, default=DEMO_SHARDS if DEMO_SHARDS.is_dir() else None,
                   help="shards for the webdataset comparison (default: make demo's, else the pre-resized ones)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="sample shuffle buffer of both shard pipelines")
    p.add_argument("--rss-probe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_probe:
        return rss_probe(args)
    if not args.tar.is_file():
        raise SystemExit(f"data_throughput: {args.tar} not found")
    t = time.perf_counter()
    full = build_shards(args.tar, args.cache / "shards-full", args.images, None, 4)
    small = build_shards(args.tar, args.cache / f"shards-{args.resize}", args.images, args.resize, 4)
    small_40 = build_shards(args.tar, args.cache / f"shards-{args.resize}-x40", args.images, args.resize, 40)
    folder = extract_folder(args.tar, args.cache / "folder", args.images)
    prep_s = time.perf_counter() - t

    fused, old = train_transform(args.size, CROP_SCALE), V2Transform(args.size)
    bs, workers = args.batch_size, args.workers

    def image_folder(tf: Callable) -> Callable[[], DataLoader]:
        dataset = ImageFolder(str(folder), transform=tf)
        return lambda: DataLoader(dataset, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True)

    def shards(path: Path, tf: Callable) -> Callable[[], ShardStream]:
        stream = ShardStream(str(path), tf, bs, num_workers=workers)
        return lambda: stream

    base, best = "ImageFolder, 224px JPEG files, fused", f"shards, pre-resized {args.resize}px, fused"
    old_base, old_best = "ImageFolder, 224px JPEG files, v2", f"shards, pre-resized {args.resize}px, v2"
    loaders = {
        old_base: image_folder(old),
        base: image_folder(fused),
        "shards, 224px, v2 (whole-image draft)": shards(full, old),
        "shards, 224px, fused": shards(full, fused),
        old_best: shards(small, old),
        best: shards(small, fused),
    }
    rates = images_per_second(loaders, args.epochs)
    speedup = {name: {k: r[k] / rates[base][k] for k in r} for name, r in rates.items()}
    old_speedup = {k: rates[old_best][k] / rates[old_base][k] for k in ("end_to_end", "steady")}
    rss = {f"{n} shards": peak_rss_mib(d, args) for n, d in ((4, small), (40, small_40))}
    anchor = webdataset_anchor(args.wds_shards or small, fused, args)

    print(f"\n{args.images} Imagenette train images -> {args.size}px pretrain transform, batch {bs}, "
          f"{workers} workers ({prep_s:.0f}s preparing); images/s, best of {args.epochs} epochs")
    print(f"{'loader (transform)':<44}{'end-to-end':>12}{'steady':>9}{'vs ImageFolder fused':>22}")
    for name, r in rates.items():
        print(f"{name:<44}{r['end_to_end']:>12.0f}{r['steady']:>9.0f}"
              f"{speedup[name]['end_to_end']:>15.2f}x /{speedup[name]['steady']:>5.2f}x")
    print(f"headline, {best} vs {base}: {speedup[best]['end_to_end']:.2f}x end-to-end, "
          f"{speedup[best]['steady']:.2f}x steady (both v2: {old_speedup['end_to_end']:.2f}x / "
          f"{old_speedup['steady']:.2f}x)")
    print(f"\npeak RSS streaming {args.resize}px shards   {'main MiB':>10}{'worker MiB':>12}")
    for name, r in rss.items():
        print(f"{name:<36}{r['main_mib']:>10.0f}{r['worker_mib']:>12.0f}")
    print_anchor(anchor, args)

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "rss_probe"},
        "images_per_s": rates,
        "speedup_vs_imagefolder": speedup,  # vs ImageFolder with the fused transform
        "headline": {"shards": best, "baseline": base, **speedup[best], "both_v2": old_speedup},
        "peak_rss_mib": rss,
        "webdataset_anchor": anchor,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    (RESULTS / "data_throughput.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
