"""MPP pretraining throughput: 1 CPU process vs 2 CPU processes (gloo DDP) on the same cores.

Both run `pretrain/run.py` through `accelerate launch` (2 processes: `ACCELERATE_USE_CPU=1` with
`--multi_gpu`, as tests/test_distributed.py does) with the same total batch, steps, model and data,
and split the machine's cores and data workers evenly: 1 process x C threads x W workers vs
2 processes x C/2 threads x W/2 workers each. With the cores fixed, perfect scaling keeps the
images/s of the 1-process run (ratio 1.00); what the 2-process run loses is the gradient
all-reduce, the duplicated per-step Python work and the smaller per-process matmuls.

Throughput comes from each run's metrics.jsonl: every logging window holds `samples` and `img_s`
(all ranks' images over rank 0's window time), so a window's time is its samples / img_s. The
first `--warmup-windows` windows (data workers forking, shuffle buffers filling, first-step
allocations) are dropped; the rest are summed. The engine's whole-loop `img_s` from summary.json
(warm-up and the last checkpoint included) is reported beside it. Runs of the two layouts
alternate, `--repeats` times, so that load from other users hits both; the best run is kept.
Each run records the machine's load average: with more runnable threads than cores, a process
of several OpenMP threads loses far more than single-threaded ones (its threads wait for each
other at every parallel region), so read the ratio beside the load. `--half-machine-reference`
adds 1 process on half the cores and workers: 2 processes ideally double it, and on a 2-core
machine no layout then runs more than one thread per process.

    python benchmarks/scaling.py [--variant Nano/8] [--image-size 64] [--batch-size 32] [--steps 60]

Prints a table and writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vitcore.data.index import index_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEMO_SHARDS = ROOT / "data" / "imagenette-112" / "train"  # written by `make demo`


def free_port() -> int:
    """A free TCP port for the gloo rendezvous: other runs on this machine may hold the default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, threads: int, workers: int, out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One pretraining run at `processes` x `threads`, the total batch split over the processes."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    layout = ["--multi_gpu"] if processes > 1 else []
    cmd = [accelerate, "launch", *layout, "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
           "--main_process_port", str(free_port()), "pretrain/run.py",
           f"model.variant={args.variant}", f"model.image_size={args.image_size}", f"data.shards={args.shards}",
           f"data.batch_size={args.batch_size // processes}", f"data.num_workers={workers}",
           f"run.steps={args.steps}", f"run.log_every={args.log_every}", f"run.ckpt_every={args.steps}",
           "run.image_every=0", "run.resume=never", f"run.out_dir={out_dir}"]
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # CPU even where a GPU is visible
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"scaling: run failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    if summary["processes"] != processes:  # `--cpu`-style launches silently start one process
        raise SystemExit(f"scaling: asked for {processes} processes, the run had {summary['processes']}")
    return {"img_s_steady": steady_img_s(out_dir / "metrics.jsonl", args.warmup_windows),
            "img_s_summary": summary["img_s"], "launch_wall_s": round(wall, 2), "processes": summary["processes"],
            # 1-minute load average before and after: other users' work on a shared machine shows here
            "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def steady_img_s(metrics: Path, warmup_windows: int) -> float:
    """Images over seconds of the logging windows after the first `warmup_windows`."""
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "img_s" in r]
    rows.sort(key=lambda r: r["step"])
    samples, seconds, before = 0, 0.0, 0
    for i, row in enumerate(rows):
        window = row["samples"] - before  # images of all ranks in this window
        before = row["samples"]
        if i >= warmup_windows:
            samples, seconds = samples + window, seconds + window / row["img_s"]
    if not seconds:
        raise SystemExit(f"scaling: {metrics} has no logging window after the first {warmup_windows}; "
                         "raise --steps or lower --log-every")
    return samples / seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="Nano/8")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="total batch, split over the processes")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10, help="steps per logging window")
    p.add_argument("--warmup-windows", type=int, default=1, help="logging windows dropped at the start")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="threads of the 1-process run")
    p.add_argument("--workers", type=int, default=2, help="data workers in all, split over the processes")
    p.add_argument("--half-machine-reference", action="store_true",
                   help="also run 1 process with half the threads and workers: 2 processes ideally double it")
    p.add_argument("--repeats", type=int, default=2, help="runs of each layout, alternating; the best is kept")
    p.add_argument("--shards", type=Path, default=DEMO_SHARDS)
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run is abandoned")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache" / "scaling", help="run directories")
    args = p.parse_args(argv)
    if args.cores < 2 or args.cores % 2 or args.batch_size % 2 or args.workers % 2:
        p.error("--cores, --batch-size and --workers must be even (they are split over 2 processes)")
    if not index_path(args.shards).is_file():
        p.error(f"no shards at {args.shards} (run `make demo` or pass --shards)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # (processes, threads each, data workers each); the optional third: one process on half the machine
    layouts = [(1, args.cores, args.workers), (2, args.cores // 2, args.workers // 2)]
    if args.half_machine_reference:
        layouts.append((1, args.cores // 2, args.workers // 2))
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {(n, t): [] for n, t, _ in layouts}
    for i in range(args.repeats):
        for n, threads, workers in layouts if i % 2 == 0 else layouts[::-1]:
            runs[n, threads].append(launch(n, threads, workers, args.cache / f"proc{n}-threads{threads}-run{i}", args))
            print(f"run {i}, {n} process(es) x {threads} thread(s): {runs[n, threads][-1]}", flush=True)

    rows = []
    for n, threads, workers in layouts:
        best = max(runs[n, threads], key=lambda r: r["img_s_steady"])
        rows.append({"processes": n, "threads_each": threads, "workers_each": workers,
                     "batch_each": args.batch_size // n, "img_s": best["img_s_steady"],
                     "img_s_summary": best["img_s_summary"], "runs": runs[n, threads]})
    for row in rows:
        row["vs_1_process"] = row["img_s"] / rows[0]["img_s"]

    print(f"\nMPP pretraining, {args.variant} at {args.image_size} px, total batch {args.batch_size}, {args.steps} "
          f"steps, {args.cores} cores; img/s over logging windows {args.warmup_windows + 1}.. "
          f"(first {args.warmup_windows * args.log_every} steps dropped), best of {args.repeats}")
    print(f"{'processes':>9}{'threads each':>14}{'batch each':>12}{'workers each':>14}{'img/s':>9}"
          f"{'whole loop':>12}{'vs 1 process':>14}")
    for r in rows:
        print(f"{r['processes']:>9}{r['threads_each']:>14}{r['batch_each']:>12}{r['workers_each']:>14}"
              f"{r['img_s']:>9.1f}{r['img_s_summary']:>12.1f}{r['vs_1_process']:>14.2f}")
    print("scaling efficiency = img/s of 2 processes / img/s of 1 process on the same cores (ideal 1.00)")
    per_half = rows[1]["img_s"] / (2 * rows[2]["img_s"]) if args.half_machine_reference else None
    if per_half is not None:
        print(f"2 processes / (2 x 1 process on half the cores, single-threaded when 2 cores): {per_half:.2f} "
              "(ideal 1.00; no layout here runs more than one thread per process on 2 cores)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": rows,
        "scaling_efficiency": rows[1]["vs_1_process"],
        "efficiency_vs_half_machine": per_half,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    (RESULTS / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / 'scaling.json'}")


if __name__ == "__main__":
    main()
