"""Training-step throughput and model FLOPs utilisation: our ViT vs timm's VisionTransformer.

Both encoders run the same step on the same inputs, interleaved round by round so machine noise
hits both alike: encoder forward on (B, 3, H, W) images, a linear 512-way head on the patch
tokens, cross-entropy, backward, AdamW. Our full MPP step (corruption and targets included) is
timed beside them. MFU is model FLOPs (fwd + bwd = 3x forward matmul FLOPs) per second over a
peak: on CPU the fp32 (or bf16) matmul peak measured in this same run, on known GPUs the
datasheet's dense bf16 peak.

    python benchmarks/train_throughput.py                              # the demo config, CPU
    python benchmarks/train_throughput.py --variant B/16 --image-size 224 --batch-size 128 \\
        --device cuda --bf16 --compile                                 # a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore.config import load_config
from vitcore.train.meter import PEAK_FLOPS
from vitcore.model.vit import ViT, ViTConfig, flops_per_image

RESULTS = Path(__file__).parent / "results"


def timm_twin(cfg: ViTConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.dim, depth=cfg.depth,
                             num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, num_classes=0, global_pool="token")


def encoder_step(encoder: nn.Module, ours: bool):
    """The same training step around either encoder: patch tokens -> 512-way head -> CE."""
    dim = encoder.cfg.dim if ours else encoder.embed_dim
    head = nn.Linear(dim, 512).to(next(encoder.parameters()).device)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        tokens = encoder(images).patches if ours else encoder.forward_features(images)[:, 1:]  # (B, N, D)
        loss = F.cross_entropy(head(tokens).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 20) -> float:
    """Measured FLOP/s of a large square matmul: the ceiling a training step can approach."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default=None, help="default: the demo recipe's")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile each step's model")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    args = parser.parse_args()

    over = [f"model.variant={args.variant}"] * bool(args.variant) + [f"model.image_size={args.image_size}"] * bool(
        args.image_size) + [f"data.batch_size={args.batch_size}"] * bool(args.batch_size)
    cfg = load_config(PretrainConfig, None, over)
    device = torch.device(args.device)
    torch.manual_seed(0)
    task = MPPTask(cfg)
    mpp_model = task.build_model()[0].to(device)
    vit_cfg = mpp_model.encoder.cfg
    ours = ViT(vit_cfg).to(device)
    theirs = timm_twin(vit_cfg).to(device)
    ours_step = encoder_step(torch.compile(ours) if args.compile else ours, ours=True)
    theirs_step = encoder_step(torch.compile(theirs) if args.compile else theirs, ours=False)
    mpp_opt = torch.optim.AdamW(mpp_model.parameters(), lr=1e-4, fused=True)
    mpp_run = torch.compile(mpp_model) if args.compile else mpp_model  # as the engine's run.compile

    def mpp_step(images_u8: torch.Tensor) -> None:
        loss, _ = task.loss(mpp_run, {"image": images_u8, "label": None, "key": []})
        loss.backward()
        mpp_opt.step()
        mpp_opt.zero_grad(set_to_none=True)

    B, size = cfg.data.batch_size, cfg.model.image_size
    images_u8 = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, device=device)
    images = images_u8.float() / 127.5 - 1
    n = vit_cfg.grid[0] * vit_cfg.grid[1]
    targets = torch.randint(0, 512, (B, n), device=device)
    runs = {"ours (encoder step)": lambda: ours_step(images, targets),
            "timm VisionTransformer (same step)": lambda: theirs_step(images, targets),
            "ours (full MPP step)": lambda: mpp_step(images_u8)}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with amp:
        for name, fn in runs.items():  # warm-up (and compilation)
            for _ in range(3):
                fn()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                sync(device)
                t = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - t) / args.steps)

    step_flops = 3 * flops_per_image(vit_cfg) * B
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        peak_source = f"{name} datasheet dense bf16"
    else:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        peak = statistics.median(matmul_peak(device, dtype) for _ in range(3))
        peak_source = f"measured {dtype} 2048^3 matmul on this CPU"
    rows = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        rows[name] = {"step_ms": 1e3 * t, "img_s": B / t, "tflops": step_flops / t / 1e12,
                      "mfu": step_flops / t / peak if peak else None}
    # The ratio of each round's adjacent blocks, then the median: a burst of load from other jobs
    # lands on one round of both models, not on one model's median.
    paired = [theirs / ours for ours, theirs in zip(times["ours (encoder step)"],
                                                     times["timm VisionTransformer (same step)"])]
    ratio = statistics.median(paired)

    print(f"{cfg.model.variant} at {size} px, batch {B}, {device}, bf16={args.bf16}, compile={args.compile}, "
          f"threads={torch.get_num_threads()}; median of {args.rounds} rounds x {args.steps} steps")
    print(f"peak: {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s ({peak_source})\n")
    print(f"| {'step':36s} | {'ms':>8s} | {'img/s':>8s} | {'TFLOP/s':>8s} | {'MFU':>6s} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    for name, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {name:36s} | {r['step_ms']:8.1f} | {r['img_s']:8.1f} | {r['tflops']:8.3f} | {mfu:>6s} |")
    print(f"\nours / timm images/s: {ratio:.3f}, the median of the rounds' ratios "
          f"({', '.join(f'{r:.3f}' for r in paired)}; target >= 0.95)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "train_throughput.json"
    out.write_text(json.dumps({
        "config": {"variant": cfg.model.variant, "image_size": size, "batch_size": B, "device": str(device),
                   "bf16": args.bf16, "compile": args.compile, "threads": torch.get_num_threads(),
                   "rounds": args.rounds, "steps": args.steps},
        "peak_flops": peak, "peak_source": peak_source, "results": rows, "ours_over_timm": ratio,
        "ours_over_timm_per_round": paired,
        "machine": {"torch": torch.__version__, "python": platform.python_version()},
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
