"""The one evaluation loop, shared by every stage and by `python -m finetune.evaluate`.

It walks an exactly-once `ShardStream` (`ShardStream.exactly_once`): each
rank reads its own share of the validation samples (see `vitcore.data.plan` for how the work
is divided, within shards when there are fewer shards than ranks). Per rank it keeps additive
sums on the device (top-1 and top-5 hits, loss sum, predictions, images, and a confusion matrix
when asked), then does ONE all-reduce after the loop: ranks may hold different batch counts, so
a per-batch collective could hang. Under FSDP the forward itself is a collective (it all-gathers
parameters): `vitcore.sharding.even_batches` then pads ranks with fewer batches with discarded
forwards, so that every rank runs as many as the rank with the most.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from vitcore.data import ShardStream
from vitcore.sharding import even_batches

# (logits (M, C), targets (M,)) for one batch: M is the batch size for classification, the number
# of corrupted patches for MPP.
Predict = Callable[[dict[str, Any]], tuple[Tensor, Tensor]]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on `device` (asynchronous copies); keys and other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def device_batches(accelerator: Accelerator, stream: ShardStream, desc: str) -> Iterator[tuple[dict[str, Any], bool]]:
    """One exactly-once pass of `stream`, batches on the device, a progress bar on the main process:
    (batch, real) pairs, where real=False marks a stand-in that only keeps FSDP's forwards matched
    across ranks (its results are to be discarded)."""
    bar = tqdm(stream, desc=desc, total=len(stream), leave=False, dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    for batch, real in even_batches(accelerator, bar, len(stream)):
        yield to_device(batch, accelerator.device), real


@torch.no_grad()
def evaluate(accelerator: Accelerator, predict: Predict, stream: ShardStream, num_classes: int | None = None,
             desc: str = "eval") -> dict[str, Any]:
    """Top-1/top-5 accuracy and mean loss over one pass of `stream`, summed over all ranks.

    Returns {"top1", "top5" (fractions), "loss", "count" (images), "skipped", "predictions",
    "expected"} and, with `num_classes`, "confusion": a (C, C) tensor of counts (rows: true class).
    The caller runs `predict` on the unwrapped model in eval() under the run's precision (under FSDP,
    on every rank inside `vitcore.sharding.standalone_forwards`).
    """
    device = accelerator.device
    dtype = torch.float64 if device.type != "mps" else torch.float32
    sums = torch.zeros(3, device=device, dtype=dtype)  # top-1 hits, top-5 hits, loss sum
    predictions, images = 0, 0  # known from shapes: counted on the host, no sync
    confusion = torch.zeros((num_classes or 0) ** 2, device=device, dtype=dtype)  # (C*C,) flattened
    skipped_before = stream.skipped
    for batch, real in device_batches(accelerator, stream, desc):
        with accelerator.autocast():
            logits, targets = predict(batch)  # (M, C), (M,)
        if not real:  # a stand-in forward: FSDP's all-gathers stay matched across ranks
            continue
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (M, 5)
        hits = top5 == targets[:, None]  # (M, 5)
        sums += torch.stack([hits[:, 0].sum().to(dtype), hits.any(-1).sum().to(dtype),
                             F.cross_entropy(logits, targets, reduction="sum").to(dtype)])  # (3,)
        predictions, images = predictions + targets.numel(), images + batch["image"].shape[0]
        if num_classes:
            confusion.index_add_(0, targets * num_classes + top5[:, 0], torch.ones_like(targets, dtype=dtype))
    counts = torch.tensor([predictions, images, stream.skipped - skipped_before], dtype=dtype).to(device)
    total = accelerator.reduce(torch.cat([sums, counts, confusion]), "sum").cpu()  # the one collective
    hit1, hit5, loss, predictions, images, n_skipped = total[:6].tolist()
    result: dict[str, Any] = {
        "top1": hit1 / max(predictions, 1), "top5": hit5 / max(predictions, 1), "loss": loss / max(predictions, 1),
        "count": int(images), "skipped": int(n_skipped), "predictions": int(predictions),
        "expected": stream.epoch_samples,
    }
    if num_classes:
        result["confusion"] = total[6:].view(num_classes, num_classes)
    return result


def coverage_problem(result: dict[str, Any]) -> str | None:
    """A line saying that evaluation did not see every validation sample exactly once, or None."""
    if result["count"] + result["skipped"] == result["expected"]:
        return None
    return (f"warning: evaluation counted {result['count']} images + {result['skipped']} skipped, but the index "
            f"lists {result['expected']}: some validation samples were missed or seen twice")
