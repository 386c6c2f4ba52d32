"""Peer parity: our fine-tuning loop against a reference loop built from timm's own library parts,
on the same images, model and recipe, from scratch and from an MPP checkpoint.

The reference is what timm's `train.py` does with these flags, written with timm's parts and no
code of ours in its training path: `timm.data.create_dataset`/`create_loader` (a permutation of all
images each epoch, RandomResizedCrop + flip, bilinear, crop_pct 0.875 at evaluation), timm's
`VisionTransformer`, `timm.optim.create_optimizer_v2`, `timm.scheduler.create_scheduler_v2` (one
"epoch" per update, so its cosine and warmup count updates), `timm.loss.LabelSmoothingCrossEntropy`
and timm's gradient clipping. Our arm is `finetune/run.py`'s `main` with the experiment's recipe
(configs/finetune/experiment_<arm>.yaml). Both read the JPEG bytes of the same shards: the
reference from an image folder written from them once.

    python benchmarks/peer_parity.py --shards data/imagenette-112 --pretrained runs/experiment/pretrain \
        [--arms scratch pretrained] [--steps-scratch 1550] [--steps-pretrained 1000] [--seeds 0 1] [--docs]

Prints a table and writes benchmarks/results/peer_parity.json (--out; and docs/peer-parity.json with --docs).
Each run's result, with the commit it ran at, is kept in its folder under --work and reused by a
later call with the same steps: seeds and arms can be added one call at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.task import ClassifyTask  # noqa: E402
from vitcore.config import load_config  # noqa: E402
from vitcore.data import read_index  # noqa: E402
from vitcore.data.tar import iter_tar_samples  # noqa: E402
from vitcore.report.export import export  # noqa: E402
from vitcore.train.engine import main as train_main  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def image_folder(shards: Path, out: Path) -> Path:
    """The shards' JPEG bytes as an ImageFolder (class folders sorted as the index orders them), once."""
    if (out / ".complete").exists():
        return out
    index = read_index(shards)
    for shard in index["shards"]:
        with open(shards / shard["name"], "rb") as f:
            for sample in iter_tar_samples(f):
                folder = out / f"{int(sample['cls']):03d}-{index['classes'][int(sample['cls'])]}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{sample['__key__'].replace('/', '_')}.jpg").write_bytes(sample["jpg"])
    (out / ".complete").touch()
    return out


def reference(cfg: Any, train_dir: Path, val_dir: Path, steps: int, seed: int, init: Path | None,
              workdir: Path) -> dict[str, Any]:
    """timm's training loop, as train.py runs it, for `steps` optimizer updates; val top-1 at the end."""
    import timm
    from safetensors.torch import load_file
    from timm.data import create_dataset, create_loader
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import dispatch_clip_grad, random_seed

    m, o, size = cfg.model, cfg.optim, cfg.model.image_size
    random_seed(seed, 0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=size,
                              patch_size=8, embed_dim=128, depth=6, num_heads=4, drop_path_rate=m.drop_path)
    if init is not None:  # our MPP encoder, exported to timm's format at this resolution
        exported = export(init, workdir / "exported", image_size=(size, size))
        missing, unexpected = model.load_state_dict(load_file(exported / "model.safetensors"), strict=False)
        assert set(missing) == {"head.weight", "head.bias"} and not unexpected, (missing, unexpected)
    common = dict(input_size=(3, size, size), batch_size=cfg.data.batch_size, interpolation="bilinear",
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_workers=cfg.data.num_workers,
                  device=torch.device("cpu"), use_prefetcher=False, crop_pct=0.875)
    train = create_loader(create_dataset("", root=str(train_dir), is_training=True), is_training=True,
                          color_jitter=0.0, **common)
    val = create_loader(create_dataset("", root=str(val_dir)), is_training=False, **common)
    optimizer = create_optimizer_v2(model, o.name, lr=o.lr, weight_decay=o.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=steps, warmup_epochs=o.warmup_steps,
                                       warmup_lr=1e-5, min_lr=o.min_lr, step_on_epochs=False, updates_per_epoch=1)
    loss_fn = LabelSmoothingCrossEntropy(cfg.finetune.label_smoothing)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    while len(losses) < steps:
        for images, labels in train:
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            dispatch_clip_grad(model.parameters(), o.grad_clip, mode="norm")
            optimizer.step()
            losses.append(loss.item())
            scheduler.step_update(num_updates=len(losses))
            if len(losses) == steps:
                break
    seconds = time.perf_counter() - start
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in val:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return {"top1": correct / total, "train_loss": statistics.fmean(losses[-cfg.run.log_every:]),
            "steps": steps, "count": total, "seconds": round(seconds, 1)}


def ours(recipe: Path, shards: Path, steps: int, seed: int, init: Path | None, out: Path) -> dict[str, Any]:
    summary = train_main(FinetuneConfig, ClassifyTask, [
        "--config", str(recipe), f"data.shards={shards / 'train'}", f"eval.shards={shards / 'val'}",
        f"init_from={init if init is not None else 'null'}", f"run.steps={steps}", f"run.seed={seed}",
        "run.eval_every=0", "run.image_every=0", f"run.out_dir={out}", "run.resume=never"])
    return {"top1": summary["eval"]["top1"], "train_loss": summary["final"]["loss"], "steps": summary["steps"],
            "count": summary["eval"]["count"], "seconds": summary["wall_time_s"]}


def commit() -> str:
    """The code's commit (with `+dirty` when the tree has changes): a number belongs to the code it ran."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else "unknown"


def aggregate(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    runs = list(per_seed.values())
    return {"top1": round(statistics.fmean(r["top1"] for r in runs), 4),
            "train_loss": round(statistics.fmean(r["train_loss"] for r in runs), 4),
            "steps": runs[0]["steps"], "per_seed": per_seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=ROOT / "data" / "imagenette-112",
                        help="a folder holding train/ and val/ labelled shards")
    parser.add_argument("--pretrained", type=Path, default=ROOT / "runs" / "experiment" / "pretrain")
    parser.add_argument("--arms", nargs="+", default=["scratch", "pretrained"], choices=["scratch", "pretrained"])
    parser.add_argument("--steps-scratch", type=int, default=1550, help="make experiment's scratch_same_compute")
    parser.add_argument("--steps-pretrained", type=int, default=1000, help="make experiment's pretrained arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--loops", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "peer_parity")
    parser.add_argument("--out", type=Path, default=OUT / "peer_parity.json")
    parser.add_argument("--docs", action="store_true", help="also write docs/peer-parity.json")
    args = parser.parse_args()
    folders = {split: image_folder(args.shards / split, args.work / "images" / split) for split in ("train", "val")}
    results: dict[str, Any] = {}
    for arm in args.arms:
        recipe = ROOT / "configs" / "finetune" / f"experiment_{arm}.yaml"
        cfg = load_config(FinetuneConfig, str(recipe), [])
        steps = args.steps_scratch if arm == "scratch" else args.steps_pretrained
        init = args.pretrained if arm == "pretrained" else None
        results[arm] = {}
        for loop in args.loops:
            per_seed = {}
            for seed in args.seeds:
                work = args.work / arm / f"{loop}-s{seed}"
                done = work / "result.json"  # a run's result is kept: delete it (or --work) to run it again
                kept = json.loads(done.read_text()) if done.exists() else {}
                if kept.get("steps") == steps and kept.get("init") == (str(init) if init else None):
                    per_seed[str(seed)] = kept
                else:
                    per_seed[str(seed)] = {**(ours(recipe, args.shards, steps, seed, init, work) if loop == "ours" else
                                              reference(cfg, folders["train"], folders["val"], steps, seed, init, work)),
                                           "init": str(init) if init else None, "commit": commit()}
                    work.mkdir(parents=True, exist_ok=True)
                    done.write_text(json.dumps(per_seed[str(seed)], indent=2) + "\n")
                print(f"{arm} {loop} seed {seed}: {per_seed[str(seed)]}", flush=True)
            results[arm][loop] = aggregate(per_seed)
    print("\n| arm | loop | steps | val top-1 (mean) | per seed | train loss (last window) |\n|---|---|---|---|---|---|")
    for arm, loops in results.items():
        for loop, r in loops.items():
            seeds = ", ".join(f"{100 * s['top1']:.1f}" for s in r["per_seed"].values())
            print(f"| {arm} | {loop} | {r['steps']} | {100 * r['top1']:.1f}% | {seeds} | {r['train_loss']:.3f} |")
        if {"ours", "reference"} <= loops.keys():
            print(f"| {arm} | ours - reference | | {100 * (loops['ours']['top1'] - loops['reference']['top1']):+.1f} | | "
                  f"{100 * (loops['ours']['train_loss'] / loops['reference']['train_loss'] - 1):+.1f}% |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.docs:
        (ROOT / "docs" / "peer-parity.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
