"""Top-k classes of a fine-tuned classifier for image files and folders.

    python -m finetune.predict --checkpoint runs/finetune/checkpoints/best photo.jpg photos/ \\
        [--top-k 5] [--image-size S [W]] [--json] [--batch-size 64] [--ema]
    accelerate launch finetune/predict.py --checkpoint ... photos/          # several processes or GPUs

Each image goes through the evaluation transform at the model's resolution (the one
`finetune.evaluate` measures accuracy with), in batches. A folder is read recursively (image
extensions only, hidden files skipped, in sorted order); a file named on the command line is tried
whatever its extension. One line per image, in input order:

    PATH<TAB>CLASS PROB<TAB>CLASS PROB ...                                     (PROB: softmax, 4 decimals)
    {"image": PATH, "top_k": [{"class": NAME, "index": I, "prob": P}, ...]}   (--json)

An unreadable image is one line too, `PATH<TAB>error: ...` or `{"image": PATH, "error": "..."}`, and
the others are still predicted. Under `accelerate launch` the images are dealt to the ranks in turn
(image i to rank i mod N); after every batch the ranks gather their results on rank 0, which alone
prints, so the output is the same lines in the same order as with one process, streamed batch by batch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from finetune.evaluate import add_image_size, image_size, load_classifier
from vitcore.data.sources import is_image_name
from vitcore.data.transforms import DECODE_ERRORS, ResizeCenterCrop, eval_transform, open_image
from vitcore.model.vit import ViT
from vitcore.train.ending import Ending, run_process

Item = tuple[int, Tensor | None, str | None]  # (input position, uint8 (3, H, W) image or None, error or None)


def image_paths(inputs: list[str]) -> list[str]:
    """Files as given, folders expanded recursively to their image files in sorted order."""
    paths: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += [str(p) for p in sorted(path.rglob("*")) if p.is_file() and is_image_name(p.name)]
        else:
            paths.append(item)  # a missing or unreadable file becomes an error line, not an exit
    return paths


class ImageFiles(Dataset):
    """(position, image, error) for the paths at `positions`: a file that cannot be read or decoded
    gives its error message instead of an image."""

    def __init__(self, paths: list[str], positions: list[int], transform: ResizeCenterCrop) -> None:
        self.paths, self.positions, self.transform = paths, positions, transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Item:
        position = self.positions[i]
        try:
            return position, self.transform(open_image(Path(self.paths[position]).read_bytes())), None
        except UnidentifiedImageError:  # its message names an in-memory buffer, not the file
            return position, None, "UnidentifiedImageError: not an image file PIL can read"
        except DECODE_ERRORS as e:  # OSError covers a missing file, a folder, a truncated image
            return position, None, f"{type(e).__name__}: {e}"


def collate(items: list[Item]) -> dict[str, Any]:
    """The readable images stacked (B, 3, H, W) uint8 with their positions, and the errors."""
    good = [(position, image) for position, image, _ in items if image is not None]
    return {"positions": [p for p, _ in good], "images": torch.stack([x for _, x in good]) if good else None,
            "errors": [(p, error) for p, _, error in items if error is not None]}


@torch.no_grad()
def predict_batch(vit: ViT, batch: dict[str, Any], paths: list[str], classes: list[str],
                  k: int, device: torch.device) -> list[tuple[int, dict[str, Any]]]:
    """(position, result) for every image of a batch: its top-k classes, or its error."""
    results = [(p, {"image": paths[p], "error": error}) for p, error in batch["errors"]]
    if batch["images"] is not None:
        logits = vit(batch["images"].to(device)).logits  # (B, C)
        probs, indices = logits.float().softmax(dim=-1).topk(k, dim=-1)  # (B, k) each
        for p, row_p, row_i in zip(batch["positions"], probs.tolist(), indices.tolist()):
            top = [{"class": classes[i], "index": i, "prob": prob} for i, prob in zip(row_i, row_p)]
            results.append((p, {"image": paths[p], "top_k": top}))
    return results


def format_line(result: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(result)
    if "error" in result:
        return f"{result['image']}\terror: {result['error']}"
    return "\t".join([result["image"], *(f"{t['class']} {t['prob']:.4f}" for t in result["top_k"])])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a fine-tuning checkpoint dir, `latest`, `best` or run dir")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--top-k", type=int, default=5)
    add_image_size(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--ema", action="store_true", help="predict with the EMA weights")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    size = image_size(parser, args)
    with Ending():  # stops the data workers and ends the process group on every way out
        accelerator = Accelerator()
        try:
            vit, meta = load_classifier(args.checkpoint, size, args.ema)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        vit.to(accelerator.device)
        paths = image_paths(args.images)
        if not paths:
            raise SystemExit(f"error: no image files in {' '.join(args.images)}")
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = list(range(rank, len(paths), world))  # image i goes to rank i mod world
        loader = DataLoader(ImageFiles(paths, mine, eval_transform(tuple(vit.cfg.image_size))),
                            batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate)
        batches = iter(loader)
        # Every rank takes part in every gather: as many rounds as the largest share has batches. Round r
        # holds inputs [r * B * world, (r + 1) * B * world), so rank 0 prints in input order as it goes.
        rounds = math.ceil(math.ceil(len(paths) / world) / args.batch_size)
        k = min(args.top_k, meta["num_classes"])
        printed: list[dict[str, Any]] = []
        for _ in range(rounds):
            batch = next(batches, None)
            results = [] if batch is None else predict_batch(vit, batch, paths, meta["classes"], k, accelerator.device)
            results = gather_object(results) if world > 1 else results
            if accelerator.is_main_process:
                for _, result in sorted(results, key=lambda pr: pr[0]):
                    print(format_line(result, args.json), flush=True)
                    printed.append(result)
        return printed


if __name__ == "__main__":
    run_process(main)
