"""Shard writing throughput: our writer with 1 and 2 workers, as 2 tasks, vs the loop people write by hand.

The source is a folder of full-size JPEGs made once from the shared Imagenette images: the first
`--images` train images (seeded order), enlarged (bicubic) to about ImageNet's average size,
470x390, and saved at JPEG quality 90 in class subfolders. Each writer turns it into 112 px
shards (shorter side, bicubic, quality 90, `--samples-per-shard` samples each):

  ours, N workers   `write_shards(folder, out, resize=112, workers=N)`: shuffled order, skipped-image
                    accounting, progress file; decodes JPEGs with a DCT draft (libjpeg 1/2, 1/4,
                    1/8 scale, never below 112 px), so it decodes fewer pixels
  ours, 2 tasks     the same, as 2 independent tasks of 1 worker each (`num_tasks=2`, task 0 and task
                    1 in two processes forked at once, as two SLURM array tasks would run): each lists
                    the source and writes every other shard; the last one writes the index
  stock             `wds.ShardWriter(pattern, maxcount=..., verbose=0)` fed by a PIL loop: open,
                    convert RGB, resize the shorter side to 112 (bicubic), save JPEG to bytes,
                    write {"__key__", "jpg", "cls"}; in the same (shuffled) order

The writers take turns, `--repeats` times, so background load hits them alike; the table gives
median images/s (wall time of the whole write, start-up and source listing included), the
2-vs-1 worker and 2-tasks-vs-1 ratios, ours (1 worker) vs stock, and an extrapolation to
ImageNet-1k on 16 cores. It also times the listing pass over the tar archive (`--tar`: every member
header, no image data; what each task of a tar source repeats before it writes).

    python benchmarks/shard_writer.py [--images 2000] [--repeats 3] [--size 112]

Prints a markdown table and writes benchmarks/results/shard_writer.json.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from vitcore.data.shards import shuffled_order, write_shards
from vitcore.data.sources import FolderSource, open_source

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "imagenette2-224.tar"
RESULTS = ROOT / "benchmarks" / "results"
IMAGENET_SIZE = (470, 390)  # about the average ImageNet-1k train image (w, h)
IMAGENET_IMAGES = 1_281_167
CORES = 16  # the extrapolation's machine


def make_full_size_folder(tar: Path, out: Path, images: int) -> Path:
    """The first `images` Imagenette train images, enlarged to IMAGENET_SIZE, as class folders of
    quality-90 JPEGs; made once per (tar, images)."""
    done = out / ".complete"
    recipe = f"{tar} {images} {IMAGENET_SIZE}"
    if done.is_file() and done.read_text() == recipe:
        return out
    shutil.rmtree(out, ignore_errors=True)
    with open_source(str(tar), split="train") as src:
        for record in src.read(shuffled_order(len(src), 0, images)):
            with Image.open(io.BytesIO(record.image)) as image:
                big = image.convert("RGB").resize(IMAGENET_SIZE, Image.Resampling.BICUBIC)
            path = out / f"{record.key}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            big.save(path, format="JPEG", quality=90)
    done.write_text(recipe)
    return out


def stock_writer(folder: Path, out: Path, size: int, samples_per_shard: int) -> int:
    """The hand-written webdataset path: PIL loop into wds.ShardWriter. Returns the samples written."""
    src = FolderSource(folder)  # only for the file list and labels, in the same order as ours
    labels = src.labels()
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for i in shuffled_order(len(src), 0, None):
            relpath = src.relpaths[i]
            with Image.open(folder / relpath) as opened:
                image = opened.convert("RGB")
            scale = size / min(image.size)
            if scale < 1:
                image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                                     Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            sink.write({"__key__": relpath.replace(".", "_"), "jpg": buf.getvalue(), "cls": labels[i]})
            written += 1
    return written


def timed_runs(writers: dict[str, Callable[[Path], int]], repeats: int, scratch: Path) -> dict[str, list[float]]:
    """Images/s of each writer, `repeats` times, taking turns; each run writes into an empty folder."""
    rates: dict[str, list[float]] = {name: [] for name in writers}
    for _ in range(repeats):
        for name, write in writers.items():
            out = scratch / name.replace(" ", "-").replace(",", "")
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            images = write(out)
            rates[name].append(images / (time.perf_counter() - start))
    return rates


def listing_seconds(tar: Path, repeats: int) -> list[float]:
    """Seconds to open the archive as a source: one pass over its member headers (the train split)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with open_source(str(tar), split="train") as src:
            len(src)
        times.append(time.perf_counter() - start)
    return times


def as_tasks(write: Callable[..., Any], tasks: int) -> Callable[[Path], int]:
    """`write(out, num_tasks=tasks, task_index=i)` in `tasks` processes forked at once; the images written."""
    def run(out: Path) -> int:
        context = multiprocessing.get_context("fork")
        procs = [context.Process(target=write, args=(out,), kwargs={"num_tasks": tasks, "task_index": i})
                 for i in range(tasks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"shard_writer: a task exited with {p.exitcode}")
        return json.loads((out / "index.json").read_text())["total"]
    return run


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("shard-*.tar"))
    return names == sorted(p.name for p in b.glob("shard-*.tar")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tar", type=Path, default=DEFAULT_TAR)
    p.add_argument("--images", type=int, default=2000, help="at 400 the fixed costs (workers, listing) weigh")
    p.add_argument("--size", type=int, default=112, help="shorter side of the written images")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="runs per writer (the median is reported)")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache" / "shard_writer",
                   help="where the full-size JPEG folder is kept between runs")
    p.add_argument("--out", type=Path, default=RESULTS / "shard_writer.json", help="the JSON report")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.tar.is_file():
        raise SystemExit(f"shard_writer: {args.tar} not found")
    folder = make_full_size_folder(args.tar, args.cache / "full-size", args.images)
    source_mib = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20

    def write(out: Path, workers: int = 1, **task: int) -> dict[str, Any] | None:
        return write_shards(str(folder), out, resize=args.size, samples_per_shard=args.samples_per_shard,
                            workers=workers, progress=False, **task)

    writers = {
        "ours, 1 worker": lambda out: write(out)["total"],
        "ours, 2 workers": lambda out: write(out, 2)["total"],
        "ours, 2 tasks x 1 worker": as_tasks(write, 2),
        "stock wds.ShardWriter + PIL loop": lambda out: stock_writer(folder, out, args.size, args.samples_per_shard),
    }
    with tempfile.TemporaryDirectory(prefix="shard_writer-") as tmp:
        rates = timed_runs(writers, args.repeats, Path(tmp))
        identical = same_shards(Path(tmp) / "ours-1-worker", Path(tmp) / "ours-2-workers") and same_shards(
            Path(tmp) / "ours-1-worker", Path(tmp) / "ours-2-tasks-x-1-worker")
    listing = listing_seconds(args.tar, args.repeats)
    median = {name: statistics.median(r) for name, r in rates.items()}
    one, two, stock = median["ours, 1 worker"], median["ours, 2 workers"], median["stock wds.ShardWriter + PIL loop"]
    tasks = median["ours, 2 tasks x 1 worker"]
    per_worker = one  # one worker's rate: the unit a linear extrapolation scales
    extrapolated = per_worker * CORES
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "source": {"images": args.images, "size": list(IMAGENET_SIZE), "jpeg_quality": 90,
                   "mib": round(source_mib, 1)},
        "images_per_s": {name: {"median": median[name], "runs": r} for name, r in rates.items()},
        "ratio_2_vs_1_workers": two / one,
        "ratio_2_tasks_vs_1_worker": tasks / one,
        "ratio_ours_1_worker_vs_stock": one / stock,
        "identical_output_1_vs_2_workers_vs_2_tasks": identical,
        "tar_listing": {"archive": str(args.tar), "mib": round(args.tar.stat().st_size / 2**20, 1),
                        "seconds": {"median": statistics.median(listing), "runs": listing}},
        "extrapolation": {
            "what": f"ImageNet-1k train ({IMAGENET_IMAGES} images) on {CORES} cores, assuming linear scaling: "
                    f"ours 1-worker images/s x {CORES}; an extrapolation, not a measurement",
            "images_per_s": extrapolated,
            "minutes": IMAGENET_IMAGES / extrapolated / 60,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pillow": Image.__version__,
                    "webdataset": getattr(wds, "__version__", "?")},
    }
    print(f"\n{args.images} JPEGs {IMAGENET_SIZE[0]}x{IMAGENET_SIZE[1]} q90 ({source_mib:.0f} MiB) -> "
          f"{args.size}px shards of {args.samples_per_shard}; median of {args.repeats} alternating runs, "
          f"{os.cpu_count()} CPUs\n")
    print("| writer | images/s (median) | runs | vs stock |")
    print("|---|---:|---|---:|")
    for name, r in rates.items():
        print(f"| {name} | {median[name]:.0f} | {', '.join(f'{x:.0f}' for x in r)} | {median[name] / stock:.2f}x |")
    print(f"\n2 vs 1 workers: {two / one:.2f}x; 2 tasks vs 1 (1 worker each): {tasks / one:.2f}x; ours (1 worker) vs "
          f"stock: {one / stock:.2f}x; 1 worker, 2 workers and 2 tasks wrote byte-identical shards: {identical}")
    print(f"Listing {args.tar.name} ({report['tar_listing']['mib']:.0f} MiB, every member header): "
          f"{statistics.median(listing):.2f} s (median of {args.repeats})")
    print(f"Extrapolation (not measured): ImageNet-1k, {IMAGENET_IMAGES:,} images, on {CORES} cores at "
          f"{per_worker:.0f} images/s per worker x {CORES} = {extrapolated:.0f} images/s, about "
          f"{report['extrapolation']['minutes']:.0f} min, if scaling were linear (I/O and memory bandwidth "
          "are not modelled).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
