"""Training throughput on the same cores: 1 CPU process vs 2 CPU processes (gloo DDP) of one run,
and (`--independent`) 2 independent runs side by side.

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

`--independent` adds the layout `make experiment` and `make pretrain-curve` can use for their many
runs (EXP_JOBS): two whole runs at once (each the full batch and its own data workers), each on
half the threads; its images/s is the two runs' sum. `--script finetune/run.py` measures the fine-tuning
(from scratch, no evaluation) instead of the MPP pretraining.

    python benchmarks/scaling.py [--script pretrain/run.py] [--variant Nano/8] [--image-size 64]
        [--batch-size 32] [--steps 60] [--independent]

Prints a table and writes benchmarks/results/scaling.json (scaling_finetune.json for finetune/run.py).
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


def start(processes: int, threads: int, workers: int, batch: int, out_dir: Path,
          args: argparse.Namespace) -> tuple[subprocess.Popen, list[str]]:
    """One training run at `processes` x `threads`, `batch` split over the processes, started."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    layout = ["--multi_gpu"] if processes > 1 else []
    stage = ["init_from=null", "eval.shards=null"] if args.script == "finetune/run.py" else []
    cmd = [accelerate, "launch", *layout, "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
           "--main_process_port", str(free_port()), args.script, *stage,
           f"model.variant={args.variant}", f"model.image_size={args.image_size}", f"data.shards={args.shards}",
           f"data.batch_size={batch // processes}", f"data.num_workers={workers}",
           f"run.steps={args.steps}", f"run.log_every={args.log_every}", f"run.ckpt_every={args.steps}",
           "run.image_every=0", "run.resume=never", f"run.out_dir={out_dir}"]
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # CPU even where a GPU is visible
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out_dir}.log", "w") as log:  # a file, not a pipe: a full pipe would stall a run beside another
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, cmd


def launch(runs: int, processes: int, threads: int, workers: int, out_dir: Path,
           args: argparse.Namespace) -> dict[str, Any]:
    """`runs` independent runs side by side (1: one run), each at `processes` x `threads`; images/s summed."""
    load_before, begin = os.getloadavg()[0], time.perf_counter()
    started = [(start(processes, threads, workers, args.batch_size, out_dir / f"run{i}", args), out_dir / f"run{i}")
               for i in range(runs)]
    results = []
    try:
        for (proc, cmd), run_dir in started:
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise SystemExit(f"scaling: run abandoned after {args.timeout:g} s ({' '.join(cmd)})") from None
            if proc.returncode != 0:
                log = Path(f"{run_dir}.log").read_text()
                raise SystemExit(f"scaling: run failed ({' '.join(cmd)}):\n{log[-3000:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
            if summary["processes"] != processes:  # `--cpu`-style launches silently start one process
                raise SystemExit(f"scaling: asked for {processes} processes, the run had {summary['processes']}")
            results.append((steady_img_s(run_dir / "metrics.jsonl", args.warmup_windows), summary["img_s"]))
    finally:  # a failed or abandoned run does not leave the other one training beside what comes next
        for (proc, _), _ in started:
            if proc.poll() is None:
                proc.kill()
    return {"img_s_steady": sum(r[0] for r in results), "img_s_summary": sum(r[1] for r in results),
            "launch_wall_s": round(time.perf_counter() - begin, 2), "processes": processes,
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
    p.add_argument("--script", default="pretrain/run.py", choices=["pretrain/run.py", "finetune/run.py"],
                   help="the stage to time (fine-tuning from scratch, without evaluation)")
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
    p.add_argument("--independent", action="store_true",
                   help="also run 2 independent runs at once, each on half the threads with a whole run's workers")
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
    # name: (independent runs, processes each, threads each, data workers each)
    half = (args.cores // 2, args.workers // 2)
    layouts = {"1 process": (1, 1, args.cores, args.workers), "2 processes (DDP)": (1, 2, *half)}
    if args.half_machine_reference:
        layouts["1 process, half the machine"] = (1, 1, *half)
    if args.independent:
        # each with a whole run's data workers, as in `make experiment`: their number sets the data order
        layouts["2 independent runs"] = (2, 1, args.cores // 2, args.workers)
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in layouts}
    for i in range(args.repeats):
        for name in list(layouts) if i % 2 == 0 else list(layouts)[::-1]:
            runs, n, threads, workers = layouts[name]
            slug = name.split(",")[0].replace(" ", "-").replace("(", "").replace(")", "")
            measured[name].append(launch(runs, n, threads, workers, args.cache / f"{slug}-threads{threads}-run{i}", args))
            print(f"run {i}, {name} x {threads} thread(s): {measured[name][-1]}", flush=True)

    rows = []
    for name, (runs, n, threads, workers) in layouts.items():
        best = max(measured[name], key=lambda r: r["img_s_steady"])
        images = runs * args.steps * args.batch_size
        rows.append({"layout": name, "runs": runs, "processes": n, "threads_each": threads, "workers_each": workers,
                     "batch_each": args.batch_size // n, "img_s": best["img_s_steady"],
                     "img_s_summary": best["img_s_summary"],
                     # start to finish, process starts and the last checkpoint included: what a queue of runs sees
                     "img_s_end_to_end": max(images / r["launch_wall_s"] for r in measured[name]),
                     "runs_measured": measured[name]})
    for row in rows:
        row["vs_1_process"] = row["img_s"] / rows[0]["img_s"]
        row["end_to_end_vs_1_process"] = row["img_s_end_to_end"] / rows[0]["img_s_end_to_end"]

    what = "fine-tuning from scratch" if args.script == "finetune/run.py" else "MPP pretraining"
    print(f"\n{what}, {args.variant} at {args.image_size} px, batch {args.batch_size} per run, {args.steps} "
          f"steps, {args.cores} cores; img/s over logging windows {args.warmup_windows + 1}.. "
          f"(first {args.warmup_windows * args.log_every} steps dropped), best of {args.repeats}")
    print(f"{'layout':<28}{'threads each':>13}{'batch each':>11}{'workers each':>13}{'img/s':>8}"
          f"{'whole loop':>11}{'end to end':>11}{'vs 1 process':>13}{'end to end':>11}")
    for r in rows:
        print(f"{r['layout']:<28}{r['threads_each']:>13}{r['batch_each']:>11}{r['workers_each']:>13}"
              f"{r['img_s']:>8.1f}{r['img_s_summary']:>11.1f}{r['img_s_end_to_end']:>11.1f}"
              f"{r['vs_1_process']:>13.2f}{r['end_to_end_vs_1_process']:>11.2f}")
    print("img/s of several runs is their sum; end to end = images / wall from the launch to the last exit")
    by_name = {r["layout"]: r for r in rows}
    per_half = (by_name["2 processes (DDP)"]["img_s"] / (2 * by_name["1 process, half the machine"]["img_s"])
                if args.half_machine_reference else None)
    if per_half is not None:
        print(f"2 processes / (2 x 1 process on half the cores, single-threaded when 2 cores): {per_half:.2f} "
              "(ideal 1.00; no layout here runs more than one thread per process on 2 cores)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": rows,
        "scaling_efficiency": by_name["2 processes (DDP)"]["vs_1_process"],
        "efficiency_vs_half_machine": per_half,
        "independent_runs_vs_1_process": by_name["2 independent runs"]["vs_1_process"] if args.independent else None,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    out = RESULTS / ("scaling_finetune.json" if args.script == "finetune/run.py" else "scaling.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
