"""Evaluate a fine-tuned checkpoint on labelled shards, at any resolution divisible by the patch size.

    python -m finetune.evaluate --checkpoint runs/finetune/checkpoints/best --data data/imagenette-112/val \
        [--image-size 128] [--ema]

Runs the engine's one evaluation loop with the fine-tuning task's own evaluation (`ClassifyTask`;
also under `accelerate launch`, every rank reading its own share of the shards) and prints the
result as JSON on its last line:
{"top1": ..., "top5": ..., "count": N} (fractions), the object `summary.json` holds as "eval".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from finetune.config import FinetuneConfig
from finetune.task import ClassifyTask
from vitcore import checkpoint
from vitcore.data import ShardStream
from vitcore.data.classes import check_same_classes
from vitcore.data.transforms import eval_transform
from vitcore.eval.loop import coverage_problem, evaluate
from vitcore.model.pos_embed import grid_size
from vitcore.model.pretrained import load_model
from vitcore.model.vit import ViT
from vitcore.train.ending import Ending, run_process


def load_classifier(path: str | Path, image_size: tuple[int, int] | None = None,
                    ema: bool = False) -> tuple[ViT, dict[str, Any]]:
    """The classifier ViT of a fine-tuning checkpoint (its EMA weights with `ema`), built at
    `image_size` (default: the fine-tuning resolution), position embeddings resampled once."""
    meta = checkpoint.load_meta(path)
    if meta.get("stage") != ClassifyTask.name:
        raise ValueError(f"--checkpoint: {path} is a {meta.get('stage')} checkpoint, not a fine-tuned classifier")
    if ema and not meta.get("ema"):
        raise ValueError(f"--ema: {path} was trained without an EMA (finetune.ema_decay=0)")
    try:
        grid_size(image_size or tuple(meta["arch"]["image_size"]), meta["arch"]["patch_size"])
    except ValueError as e:
        raise ValueError(f"--image-size: {e}") from None
    return load_model(path, image_size, prefix="ema." if ema else None)


def add_image_size(parser: argparse.ArgumentParser) -> None:
    """`--image-size S` (square) or `--image-size H W`; `image_size(args)` reads it back."""
    parser.add_argument("--image-size", type=int, nargs="+", metavar="S",
                        help="one size (square) or height width; default: the fine-tuning resolution")


def image_size(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, int] | None:
    """(height, width) from `--image-size`, or None for the checkpoint's own resolution."""
    if args.image_size is None:
        return None
    if len(args.image_size) > 2:
        parser.error("--image-size takes one size (square) or two (height width)")
    return args.image_size[0], args.image_size[-1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a fine-tuning checkpoint dir, `latest`, `best` or run dir")
    parser.add_argument("--data", required=True, help="labelled shard dir (with index.json)")
    add_image_size(parser)
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    size = image_size(parser, args)
    with Ending() as end:  # stops the data workers and ends the process group on every way out
        accelerator = Accelerator()
        try:
            vit, meta = load_classifier(args.checkpoint, size, args.ema)
            stream = end.closing(ShardStream.exactly_once(
                args.data, eval_transform(tuple(vit.cfg.image_size)), args.batch_size,
                rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=args.num_workers))
            check_same_classes(meta["classes"], stream.classes, "the checkpoint", args.data)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        vit.to(accelerator.device)
        cfg = FinetuneConfig()
        cfg.data.shards = args.data  # the task's classes: --data's, the checkpoint's (checked above)
        task = ClassifyTask(cfg)
        result = evaluate(accelerator, lambda batch: task.eval_sums(vit, batch), stream)
        problem = coverage_problem(result)
        if problem:
            accelerator.print(problem)
        metrics = task.eval_metrics(result["sums"])
        out = {"top1": metrics["top1"], "top5": metrics["top5"], "count": result["count"]}
        accelerator.print(json.dumps(out))
        return out


if __name__ == "__main__":
    run_process(main)
