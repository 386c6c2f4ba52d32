"""Evaluation metrics as additive sums: a task's `eval_sums` returns them per batch, the evaluation
loop adds them over batches and ranks, and the `*_metrics` functions turn the totals into metrics.
Classification (image classes, or the colour classes of corrupted patches): top-1, top-5 and mean
cross-entropy. Means of per-item values (a regression's squared errors): `mean_sums`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROWS = "rows/"  # a name of `eval_sums` under this prefix is per image, kept (not added) for predictions


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 sums (exact counts to 2^53), float32 where the device has no float64 (MPS)."""
    return torch.float64 if device.type != "mps" else torch.float32


def classification_sums(logits: Tensor, targets: Tensor, num_classes: int | None = None) -> dict[str, Tensor]:
    """(M, C) logits and (M,) targets -> {"top1", "top5" (hits), "loss" (cross-entropy sum),
    "count" (M)} and, with `num_classes`, "confusion": (C*C,) counts, row-major (row: true class)."""
    dtype = sum_dtype(logits.device)
    logits = logits.float()
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (M, 5)
    hits = top5 == targets[:, None]  # (M, 5)
    sums = {"top1": hits[:, 0].sum().to(dtype), "top5": hits.any(-1).sum().to(dtype),
            "loss": F.cross_entropy(logits, targets, reduction="sum").to(dtype), "count": _count(targets)}
    if num_classes:
        confusion = torch.zeros(num_classes * num_classes, device=logits.device, dtype=dtype)
        sums["confusion"] = confusion.index_add_(0, targets * num_classes + top5[:, 0],
                                                 torch.ones_like(targets, dtype=dtype))
    return sums


def prediction_rows(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-image rows of a classification (not sums: the evaluation loop keeps them apart, see
    `vitcore.eval.loop.ROWS`): the label and the top-5 classes, (M,) and (M, 5)."""
    return {f"{ROWS}label": targets, f"{ROWS}top5": logits.topk(min(5, logits.shape[-1]), dim=-1).indices}


def classification_metrics(sums: dict[str, Tensor]) -> dict[str, float]:
    """Top-1 and top-5 (fractions) and mean loss from `classification_sums` added up."""
    count = max(float(sums["count"]), 1.0)
    return {k: float(sums[k]) / count for k in ("top1", "top5", "loss")}


def mean_sums(**values: Tensor) -> dict[str, Tensor]:
    """{name: the sum of `values[name]`, "count": how many} for per-item values of one shape;
    `mean_metrics` turns the totals into means."""
    first = next(iter(values.values()))
    return {**{k: v.sum().to(sum_dtype(v.device)) for k, v in values.items()}, "count": _count(first)}


def mean_metrics(sums: dict[str, Tensor]) -> dict[str, float]:
    count = max(float(sums["count"]), 1.0)
    return {k: float(v) / count for k, v in sums.items() if k != "count"}


def _count(values: Tensor) -> Tensor:
    """How many items `values` holds, as a 0-d sum on its device (known from its shape: no sync)."""
    return torch.tensor(float(values.numel()), dtype=sum_dtype(values.device), device=values.device)
