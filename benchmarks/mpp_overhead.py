"""How much of an MPP training step goes to corruption and target computation.

On the demo config (PretrainConfig() defaults: Nano/8 at 64 px, batch 64) it times, in one run:
  step       the full training step: normalise, forward, loss, backward, AdamW step;
  ablated    the same step with corruption replaced by the identity (a fixed, precomputed
             record) and the targets precomputed, interleaved with `step` so drift hits both;
  overhead   corruption forward + backward and target computation alone, on the same inputs.
Reports medians and overhead / step (target <= 3%); writes benchmarks/results/mpp_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import pretrain.task as task_module
from pretrain.config import PretrainConfig
from pretrain.corruption import corrupt
from pretrain.task import MPPTask
from vitcore.train.optim import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results" / "mpp_overhead.json"


def timed(fn, repeats: int) -> list[float]:
    """Wall times of `repeats` calls of `fn`, in seconds."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats of each measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = PretrainConfig()
    task = MPPTask(cfg)
    model = task.build_model()[0].train()
    optimizer = build_optimizer(model, cfg.optim)
    size, batch_size, mpp = cfg.model.image_size, cfg.data.batch_size, cfg.mpp
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    batch = {"image": images, "label": None, "key": [str(i) for i in range(batch_size)]}

    def step() -> None:
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # The ablation: the same step, with corruption the identity and the targets looked up.
    with torch.no_grad():
        _, fixed = model(images)
        fixed_targets = task.targets(images, fixed.positions)
    real_corrupt, real_targets = task_module.corrupt, task.targets

    def ablated_step() -> None:
        task_module.corrupt = lambda tokens, *a, **k: (tokens, fixed)
        task.targets = lambda *a: fixed_targets
        try:
            step()
        finally:
            task_module.corrupt, task.targets = real_corrupt, real_targets

    # Corruption (forward and backward) and targets alone, on the step's own embeddings.
    with torch.no_grad():
        embeddings, _ = model.encoder.embed_patches(images)  # (B, N, D)
    embeddings.requires_grad_(True)
    grad_out = torch.randn_like(embeddings)

    def overhead() -> None:
        out, rec = corrupt(embeddings, model.mask_token, mpp.corrupt_ratio, mpp.mask_prob, mpp.random_prob)
        out.backward(grad_out)
        task.targets(images, rec.positions)

    for _ in range(3):  # warm-up: allocator, thread pool, optimizer state
        step(), ablated_step(), overhead()
    full, ablated = [], []
    for i in range(args.repeats):  # interleaved, order alternating, so machine noise hits both alike
        if i % 2:
            ablated += timed(ablated_step, 1)
            full += timed(step, 1)
        else:
            full += timed(step, 1)
            ablated += timed(ablated_step, 1)
    alone = timed(overhead, 10 * args.repeats)

    t_full, t_ablated, t_alone = (statistics.median(x) for x in (full, ablated, alone))
    t_diff = statistics.median(f - a for f, a in zip(full, ablated))  # paired: robust to slow drift
    result = {
        "config": {"variant": cfg.model.variant, "image_size": size, "batch_size": batch_size,
                   "target": mpp.target, "corrupt_ratio": mpp.corrupt_ratio},
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "step_ms": 1e3 * t_full, "ablated_step_ms": 1e3 * t_ablated, "corruption_targets_ms": 1e3 * t_alone,
        "share_measured": t_alone / t_full, "share_by_ablation": t_diff / t_full,
        "target_share": 0.03,
    }
    print(f"MPP overhead on {cfg.model.variant} @ {size}px, batch {batch_size}, {result['threads']} threads "
          f"(median of {args.repeats} steps)")
    print(f"{'measurement':<40}{'ms':>10}{'share':>10}")
    print(f"{'full step (fwd+bwd+AdamW)':<40}{1e3 * t_full:>10.2f}{'100.0%':>10}")
    print(f"{'step, corruption identity, targets fixed':<40}{1e3 * t_ablated:>10.2f}{100 * t_ablated / t_full:>9.1f}%")
    print(f"{'corruption fwd+bwd + targets alone':<40}{1e3 * t_alone:>10.2f}{100 * result['share_measured']:>9.2f}%")
    print(f"{'paired difference (step - ablated)':<40}{1e3 * t_diff:>10.2f}"
          f"{100 * result['share_by_ablation']:>9.2f}%")
    verdict = "OK" if result["share_measured"] <= 0.03 else "ABOVE TARGET"
    print(f"measured share {100 * result['share_measured']:.2f}% vs target <= 3%: {verdict}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
