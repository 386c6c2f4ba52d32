"""One-GPU-machine check: ViT-B/16 training images/s and MFU through the engine's own training step.

Run it once on a machine lent with a GPU (8 minutes by default; without a CUDA device it stops at
once with exit status 2):

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--budget-s 480]

Parts, in this order, each in a process of its own under its own time cap; a part that fails, runs
out of memory or outlives its cap is recorded with its error and the next one starts:

  mpp          ViT-B/16 MPP pretraining step at 224 px, bf16, eager  (configs/pretrain/vit_b16_mpp.yaml)
  finetune     ViT-B/16 fine-tuning step at 384 px, bf16, eager      (configs/finetune/vit_b16_384.yaml)
  mpp_2gpu     the mpp step in 2 processes (`accelerate launch --multi_gpu --num_processes 2`, DDP
               over NCCL), images/s against mpp's 1 process; skipped with fewer than 2 GPUs
  mpp_compile  the mpp step under torch.compile (the engine's run.compile: Accelerate's inductor)

Each part builds its recipe's model and optimizer and runs the training step with the engine's
own code (`RunState.restore` and `vitcore.train.step.TrainStep`: Accelerate's bf16 autocast and
backward, gradient clipping, the fused optimizer's non-finite guard, the fine-tuning EMA), without
data streams, monitor or checkpoints, at the recipe's per-process batch with one micro-batch
per optimizer step (optim.accum_steps=1). The data are synthetic, as in train_throughput.py: one
random uint8 batch kept on the GPU, so the numbers are the step's, without JPEG decoding or copies.
Attention is `F.scaled_dot_product_attention`; the kernels it dispatched to are recorded. Images/s
is the batch over the median per-step time of blocks of 10 steps after the warm-up (compilation
happens in the warm-up); MFU is the engine's: images/s per GPU x the task's training FLOPs per image
(3x the encoder's forward matmul FLOPs) over the datasheet dense bf16 peak (vitcore.train.meter.PEAK_FLOPS).

--budget-s is shared out by weight (mpp 1, finetune 1, mpp_2gpu 1.5, mpp_compile 3) over the parts
still to run, so the seconds a part leaves unused go to the parts after it. Writes ONE JSON file
(rewritten after every part; "complete": true once all have run) and prints a table. Exits 1 when
a part failed or ran out of time, else 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

# Only the standard library at import time: --help, argument errors and the no-CUDA exit cost no torch.
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PARTS: dict[str, tuple[float, str]] = {  # name: (share of the budget, what it measures), in running order
    "mpp": (1.0, "ViT-B/16 MPP pretraining step, 224 px, bf16, eager"),
    "finetune": (1.0, "ViT-B/16 fine-tuning step, 384 px, bf16, eager"),
    "mpp_2gpu": (1.5, "the mpp step in 2 processes (DDP over NCCL) vs 1 process"),
    "mpp_compile": (3.0, "the mpp step under torch.compile (inductor)"),
}
RECIPES = {"mpp": "configs/pretrain/vit_b16_mpp.yaml", "finetune": "configs/finetune/vit_b16_384.yaml"}
NUM_CLASSES = 1000  # the fine-tuning head's classes (ImageNet-1k's)
BLOCK = 10  # timed steps per block; the step time is the median block's
MIN_PART_S = 30.0  # a part offered less is skipped: starting a process, building and warming up take about that
MIN_BUDGET_S = 60.0
LOG_TAIL = 1500  # characters of a failed part's output kept in the JSON
DATA = ("synthetic: one random uint8 batch at the recipe's resolution kept on the device and reused every step "
        "(no decoding, no host-to-device copy), as benchmarks/train_throughput.py")
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine"


# ---- pure helpers: the budget, the arithmetic, the records -------------------------------------

def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def part_list(text: str) -> list[str]:
    """`mpp,finetune` -> the named parts, in running order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part {(unknown or [text])[0]!r}; choose from {', '.join(PARTS)}")
    return [n for n in PARTS if n in names]


def part_cap(remaining_s: float, weight: float, weights_left: float) -> float:
    """Seconds for the next part: its weight's share of the time left, which it shares with the parts
    after it (`weights_left` counts its own weight too). What a part leaves unused goes to the later
    ones; the last gets all that is left. Caps never add up to more than `remaining_s`."""
    return max(0.0, remaining_s) * weight / weights_left


def reserve_s(budget_s: float) -> float:
    """Seconds kept back from the parts: killing a part that outlived its cap, writing the JSON."""
    return min(15.0, 0.05 * budget_s)


def peak_flops(device_name: str, table: Mapping[str, float]) -> float | None:
    """The first entry of `table` whose key the device's name contains (the engine's rule), or None."""
    return next((v for k, v in table.items() if k in device_name), None)


def throughput(batch: int, processes: int, blocks: Sequence[tuple[float, int]], flops_per_image: float,
               peak: float | None) -> dict[str, Any]:
    """Images/s and MFU from timed blocks of (seconds, steps), each step `batch` images per process.
    The step time is the median block's mean; MFU is per GPU, as the engine logs it."""
    per_step = [seconds / steps for seconds, steps in blocks]
    step_s = statistics.median(per_step)
    per_gpu = batch / step_s
    return {"step_ms": round(1e3 * step_s, 3), "img_s": round(per_gpu * processes, 2),
            "img_s_per_gpu": round(per_gpu, 2), "tflops_per_gpu": round(per_gpu * flops_per_image / 1e12, 3),
            "mfu": round(per_gpu * flops_per_image / peak, 4) if peak else None,
            "timed_steps": sum(n for _, n in blocks), "block_step_ms": [round(1e3 * s, 3) for s in per_step]}


def scaling(img_s: float, reference_img_s: float | None, processes: int) -> dict[str, Any]:
    """Images/s of `processes` processes (each the reference's per-process batch) against 1 process:
    ideally `processes` times as many, an efficiency of 1."""
    if not reference_img_s:
        return {"vs_1_process": None, "efficiency": None}
    ratio = img_s / reference_img_s
    return {"vs_1_process": round(ratio, 3), "efficiency": round(ratio / processes, 3)}


def last_phase(output: str) -> str | None:
    """What a part was doing when it stopped: its last `phase: ...` line."""
    phases = [line[len("phase: "):].strip() for line in output.splitlines() if line.startswith("phase: ")]
    return phases[-1] if phases else None


def outcome(returncode: int | None, result: dict[str, Any] | None, output: str, cap_s: float) -> dict[str, Any]:
    """A part's record from how its process ended: `returncode` None when killed at `cap_s`,
    `result` what the part wrote (None: nothing), `output` its stdout and stderr."""
    tail = output[-LOG_TAIL:]
    if result is not None and result.get("status") == "ok":  # measured, whatever happened on the way out
        if returncode == 0:
            return result
        how = f"was killed at its {cap_s:.0f} s cap" if returncode is None else f"exited with status {returncode}"
        return {**result, "warning": f"the part {how} after writing its result", "log_tail": tail}
    if returncode is None:
        phase = last_phase(output)
        return {"status": "timeout", "error": f"no result within its {cap_s:.0f} s cap" +
                (f" (it was at: {phase})" if phase else ""), "log_tail": tail}
    if result is not None and result.get("status") == "failed":
        return {**result, "log_tail": tail}  # the part's own account of its error
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    return {"status": "failed", "error": f"exited with status {returncode} without a result" +
            (f"; last line: {last}" if last else ""), "log_tail": tail}


def part_command(name: str, cap_s: float, steps: int, warmup: int, result: Path, port: int,
                 python: str = sys.executable, accelerate: str = "accelerate") -> list[str]:
    """The command line of one part: this script in worker mode, launched by Accelerate for mpp_2gpu."""
    worker = [str(Path(__file__).resolve()), "--worker", "finetune" if name == "finetune" else "mpp",
              "--result", str(result), "--cap-s", f"{cap_s:.1f}", "--steps", str(steps), "--warmup", str(warmup)]
    if name == "mpp_compile":
        worker.append("--compile")
    if name == "mpp_2gpu":
        return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(port),
                *worker, "--processes", "2"]
    return [python, *worker]


def table(parts: Mapping[str, Mapping[str, Any]]) -> str:
    """The printed summary: one row per part, then a line per part that did not measure."""
    head = (f"| {'part':11s} | {'status':7s} | {'batch':>5s} | {'img/s':>8s} | {'img/s/GPU':>9s} | {'step ms':>8s} "
            f"| {'TFLOP/s/GPU':>11s} | {'MFU':>6s} | {'wall s':>6s} |")
    rows = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    notes = []
    for name, r in parts.items():
        if r.get("status") == "ok":
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            rows.append(f"| {name:11s} | {'ok':7s} | {r['config']['batch_per_process']:>5d} | {r['img_s']:>8.1f} "
                        f"| {r['img_s_per_gpu']:>9.1f} | {r['step_ms']:>8.1f} | {r['tflops_per_gpu']:>11.1f} "
                        f"| {mfu:>6s} | {r.get('wall_s', 0):>6.0f} |")
            if r.get("warning"):
                notes.append(f"{name}: {r['warning']}")
            if r.get("vs_1_process") is not None:
                notes.append(f"{name}: {r['vs_1_process']:.2f}x the images/s of 1 process "
                             f"(efficiency {r['efficiency']:.0%}, ideal 100%)")
        else:
            rows.append(f"| {name:11s} | {r.get('status', '?'):7s} | {'':>5s} | {'':>8s} | {'':>9s} | {'':>8s} "
                        f"| {'':>11s} | {'':>6s} | {r.get('wall_s', 0):>6.0f} |")
            notes.append(f"{name}: {r.get('error') or r.get('reason') or r.get('status')}")
    return "\n".join(rows + notes)


# ---- the worker: one part, in its own process (or one per GPU under accelerate launch) --------

def phase(text: str) -> None:
    print(f"phase: {text}", flush=True)


def recipe(kind: str, tmp: Path, compile: bool, overrides: Sequence[str]) -> tuple[Any, Any]:
    """The stage's config (its B/16 recipe, with `overrides`) and its task, needing no data on disk."""
    from vitcore.config import load_config

    common = [f"run.out_dir={tmp / 'run'}", "run.resume=never", "optim.accum_steps=1",
              f"run.compile={'true' if compile else 'false'}"]
    if kind == "mpp":
        from pretrain.config import PretrainConfig
        from pretrain.task import MPPTask

        cfg = load_config(PretrainConfig, ROOT / RECIPES[kind], [f"data.shards={tmp}", *common, *overrides])
        return cfg, MPPTask(cfg)
    from finetune.config import FinetuneConfig
    from finetune.task import ClassifyTask
    from vitcore.data.index import write_index

    # The task reads its class names from the shards' index; an index of no shards is all it needs.
    write_index(tmp, [], [f"class{i}" for i in range(NUM_CLASSES)], source="gpu_check: synthetic batches")
    cfg = load_config(FinetuneConfig, ROOT / RECIPES[kind],
                      ["init_from=null", f"data.shards={tmp}", "eval.shards=null", *common, *overrides])
    return cfg, ClassifyTask(cfg)


def sdpa_ops(device: Any, heads: int, tokens: int, head_dim: int, dtype: Any) -> list[str]:
    """The aten kernels `F.scaled_dot_product_attention` dispatches to at the model's attention shape,
    forward and backward (flash, memory-efficient, cuDNN or the math fallback)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    return sorted({e.name for e in prof.events() if e.name.startswith("aten::_") and "attention" in e.name})


def measure(kind: str, *, compile: bool = False, steps: int = 50, warmup: int = 5, cap_s: float = 300.0,
            overrides: Sequence[str] = (), processes: int = 1, started: float | None = None) -> dict[str, Any]:
    """Time the training step of `kind` ("mpp" | "finetune") on this process's device through the
    engine; stops timing early (after at least one block) when `cap_s` seconds after `started` (a
    `time.monotonic()`, default now) are nearly spent."""
    start = time.monotonic() if started is None else started
    soft_deadline = start + 0.85 * cap_s - 3  # time left after it to report, free the GPU and exit
    import torch
    from accelerate import Accelerator
    from train_throughput import matmul_peak, sync  # benchmarks/, this script's folder

    from vitcore.train.ending import exit_with_launcher
    from vitcore.train.meter import TrainMeter
    from vitcore.train.runstate import RunState
    from vitcore.train.step import TrainStep

    exit_with_launcher()  # under `accelerate launch`: die with the launcher (a cap's kill)
    phase("building the model")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        cfg, task = recipe(kind, Path(tmp), compile, overrides)
        # as the Trainer builds it
        accel = Accelerator(mixed_precision=cfg.run.mixed_precision,
                            dynamo_backend="inductor" if cfg.run.compile else "no")
        if accel.num_processes != processes:
            raise RuntimeError(f"asked for {processes} process(es), the launch started {accel.num_processes}")
        # the engine's step, without streams, monitor or checkpoints: a stream only to resume one
        model, optimizer, _, _ = RunState(cfg, task, accel, stream=None).restore(None)  # seeded, prepared
        train_step = TrainStep(cfg, task, accel)
        device = accel.device
        B, size = cfg.data.batch_size, cfg.model.image_size
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=g).to(device) if task.labeled else None
        batch = {"image": torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g).to(device),
                 "label": labels, "key": []}
        batches = itertools.repeat(batch)
        meter = TrainMeter(device)
        step = 0

        def train(n: int) -> None:
            nonlocal step
            for _ in range(n):
                train_step(model, optimizer, batches, meter, step)
                step += 1

        def agreed(stop: bool) -> bool:
            """Rank 0's decision on every rank: all ranks must run the same steps."""
            if accel.num_processes == 1:
                return stop
            flag = torch.tensor(float(stop), device=device)
            torch.distributed.broadcast(flag, src=0)
            return bool(flag.item())

        model.train()
        phase("warm-up and compilation" if compile else "warm-up")
        sync(device)
        t = time.perf_counter()
        train(warmup)
        sync(device)
        warmup_s = time.perf_counter() - t
        phase("timing")
        blocks: list[tuple[float, int]] = []
        while (timed := sum(n for _, n in blocks)) < steps:
            n = min(BLOCK, steps - timed)
            if blocks and agreed(time.monotonic() + n * statistics.median(s / k for s, k in blocks) > soft_deadline):
                break
            t = time.perf_counter()
            train(n)
            sync(device)
            blocks.append((time.perf_counter() - t, n))

        phase("reporting")
        vit = task.encoder(accel.unwrap_model(model)).cfg
        flops = task.train_flops(accel.unwrap_model(model), (size, size))
        cuda = device.type == "cuda"
        name = torch.cuda.get_device_name(device) if cuda else device.type
        peak = peak_flops(name, engine.PEAK_FLOPS) if cuda and cfg.run.mixed_precision != "no" else None
        dtype = torch.bfloat16 if cfg.run.mixed_precision == "bf16" else torch.float32
        result: dict[str, Any] = {
            "status": "ok",
            "config": {"recipe": RECIPES[kind], "variant": cfg.model.variant, "image_size": size,
                       "batch_per_process": B, "processes": accel.num_processes,
                       "distributed": accel.distributed_type.value,
                       "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                       "mixed_precision": cfg.run.mixed_precision, "compile": cfg.run.compile,
                       "optimizer": cfg.optim.name, "grad_clip": cfg.optim.grad_clip, "accum_steps": 1,
                       "ema_decay": cfg.finetune.ema_decay if kind == "finetune" else None,
                       "overrides": list(overrides)},
            **throughput(B, accel.num_processes, blocks, flops, peak),
            "steps_asked": steps, "warmup_steps": warmup, "warmup_s": round(warmup_s, 2),
            "train_flops_per_image": flops, "device": name, "peak_flops": peak,
            "loss_mean": round(float(meter.sums["loss"]) / max(meter.steps, 1), 4),
            "nonfinite_steps": int(meter.nonfinite.item()),
            "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        }
        try:
            result["sdpa_ops"] = sdpa_ops(device, vit.heads, vit.grid[0] * vit.grid[1] + 1, vit.dim // vit.heads, dtype)
        except Exception as e:  # a record of the kernels, not a reason to lose the measurement
            result["sdpa_ops"] = f"could not profile: {type(e).__name__}: {e}"
        if cuda:  # the ceiling a step could approach on this GPU today, beside the datasheet's
            result["matmul_bf16_tflops"] = round(statistics.median(
                matmul_peak(device, torch.bfloat16, n=8192) for _ in range(3)) / 1e12, 1)
        result["part_s"] = round(time.monotonic() - start, 2)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return result


def worker(args: argparse.Namespace, start: float) -> int:
    """One part: measure, and (rank 0) write the result, or the error, to `--result`."""
    from vitcore.atomic import atomic_write_text

    try:
        result, status = measure(args.worker, compile=args.compile, steps=args.steps, warmup=args.warmup,
                                 cap_s=args.cap_s, processes=args.processes, started=start), 0
    except Exception as e:
        traceback.print_exc()
        result, status = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}, 1
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(args.result, json.dumps(result) + "\n")
    return status


# ---- the check: every part under its cap, one JSON -------------------------------------------

def run_part(cmd: list[str], cap_s: float, result_path: Path) -> tuple[int | None, dict[str, Any] | None, str]:
    """Run one part's process group for at most `cap_s` seconds: (return code or None when killed,
    the result it wrote or None, its output)."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: the kill takes compile workers along
    try:
        out, _ = proc.communicate(timeout=cap_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's workers die with it (PR_SET_PDEATHSIG)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired as e:
            out = e.output if isinstance(e.output, str) else ""
    finally:
        if proc.poll() is None:  # interrupted: leave nothing running on the GPU
            os.killpg(proc.pid, signal.SIGKILL)
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    return code, result, out or ""


def machine_info(torch: Any) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    info = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "driver": None}
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["driver"] = smi.stdout.splitlines()[0].strip() if smi.returncode == 0 and smi.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return info


def check(args: argparse.Namespace, start: float) -> int:
    import torch
    from scaling import free_port  # benchmarks/, this script's folder

    from vitcore.atomic import atomic_write_text
    from vitcore.train.meter import PEAK_FLOPS

    deadline = start + args.budget_s - reserve_s(args.budget_s)
    machine = machine_info(torch)
    gpu = machine["gpus"][0]
    peak = peak_flops(gpu, PEAK_FLOPS)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    report: dict[str, Any] = {
        "check": "gpu_check", "complete": False,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv], "budget_s": args.budget_s, "wall_s": None,
        "machine": machine, "peak_flops": peak,
        "peak_source": f"{gpu}: datasheet dense bf16 (vitcore.train.meter.PEAK_FLOPS)" if peak else
                       f"{gpu} is not in vitcore.train.meter.PEAK_FLOPS: no MFU",
        "data": DATA, "steps": args.steps, "warmup_steps": args.warmup,
        "parts": {name: {"status": "pending", "what": PARTS[name][1]} for name in args.parts},
    }

    def write() -> None:
        report["wall_s"] = round(time.monotonic() - start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")

    runnable = list(args.parts)
    if "mpp_2gpu" in runnable and len(machine["gpus"]) < 2:
        runnable.remove("mpp_2gpu")
        report["parts"]["mpp_2gpu"].update(status="skipped", reason=f"{len(machine['gpus'])} CUDA device visible; "
                                           "the 2-process NCCL run needs 2")
    print(f"gpu_check: {len(machine['gpus'])} x {gpu}, torch {torch.__version__}, peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}, budget {args.budget_s:.0f} s, "
          f"writing {args.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for i, name in enumerate(runnable):
            record = report["parts"][name]
            remaining = deadline - time.monotonic()
            cap = part_cap(remaining, PARTS[name][0], sum(PARTS[n][0] for n in runnable[i:]))
            if cap < MIN_PART_S:
                record.update(status="skipped", reason=f"budget: {max(remaining, 0):.0f} s left, {cap:.0f} s for this "
                              f"part (under {MIN_PART_S:.0f} s); raise --budget-s")
                print(f"[{name}] skipped: {record['reason']}", flush=True)
                write()
                continue
            print(f"[{name}] {PARTS[name][1]} (cap {cap:.0f} s) ...", flush=True)
            result_path = Path(tmp) / f"{name}.json"
            cmd = part_command(name, cap, args.steps, args.warmup, result_path, free_port(), accelerate=accelerate)
            t = time.monotonic()
            code, result, output = run_part(cmd, cap, result_path)
            record.update(cap_s=round(cap, 1), wall_s=round(time.monotonic() - t, 1),
                          **outcome(code, result, output, cap))
            if name == "mpp_2gpu" and record["status"] == "ok":
                reference = report["parts"].get("mpp", {})
                record.update(scaling(record["img_s"], reference.get("img_s"), 2),
                              reference="mpp: 1 process, the same step and per-process batch" if reference.get("img_s")
                              else "mpp was not measured in this run: no ratio")
            if record["status"] == "ok":
                mfu = f", MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
                print(f"[{name}] {record['img_s']:.1f} img/s{mfu} ({record['wall_s']:.0f} s)", flush=True)
            else:
                print(f"[{name}] {record['status']}: {record['error']}", flush=True)
            write()
    report["complete"] = True
    write()
    print("\n" + table(report["parts"]))
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s of {args.budget_s:.0f})")
    return 1 if any(r["status"] in ("failed", "timeout") for r in report["parts"].values()) else 0


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json",
                   help="the JSON file written (default: benchmarks/results/gpu_check.json)")
    p.add_argument("--budget-s", type=positive_seconds, default=480.0,
                   help=f"wall-clock seconds for the whole check, at least {MIN_BUDGET_S:.0f} (default 480)")
    p.add_argument("--steps", type=positive_int, default=50, help="timed steps per part after the warm-up (default 50)")
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first, compilation included (default 5)")
    p.add_argument("--parts", type=part_list, default=list(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    # worker mode: how the check runs each part in a process of its own
    p.add_argument("--worker", choices=("mpp", "finetune"), help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cap-s", type=positive_seconds, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--processes", type=positive_int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s < MIN_BUDGET_S:
        p.error(f"argument --budget-s: {args.budget_s:g} s is under the {MIN_BUDGET_S:.0f} s minimum "
                f"(a part needs about {MIN_PART_S:.0f} s)")
    if args.worker and args.result is None:
        p.error("--worker needs --result")
    return p, args


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()
    parser, args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # before any work, and before any file is written
        print(f"{parser.prog}: error: {NO_CUDA}", file=sys.stderr)
        return 2
    return worker(args, start) if args.worker else check(args, start)


if __name__ == "__main__":
    sys.exit(main())
