"""How useful an encoder's features are, measured during pretraining: weighted kNN and a linear probe.

The monitor (the `monitor` config section) extracts features of a labelled train subset and a
validation set once per monitoring step, then scores both probes on them:

- weighted kNN top-1 as DINO reports it: cosine similarity of each validation feature to every train
  feature, the k nearest vote for their class with weight exp(similarity / T);
- linear probe top-1: multinomial logistic regression fitted on the standardised train features with
  full-batch L-BFGS on the device (the features are in memory: no data is read again).

Both run on two features per image: the final-norm [CLS] token and the mean of the patch tokens.
Nothing here draws random numbers (the probe starts from zeros), so monitoring leaves training
bit-identical. Feature extraction walks exactly-once streams: every rank reads its share, the rows
are gathered to every rank, and the count is checked against the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from vitcore.data import ShardStream
from vitcore.eval.loop import device_batches
from vitcore.model.vit import ViT

FEATURES = ("cls", "patch_mean")  # the two features each probe is scored on


@dataclass
class Features:
    """Every image of one stream, over all ranks (rank-major order)."""

    features: dict[str, Tensor]  # name -> (M, D) float32
    labels: Tensor  # (M,) int64
    keys: list[str]  # the samples' keys, for the exactly-once check
    skipped: int  # corrupt samples, summed over ranks
    expected: int  # samples the index lists

    def coverage_problem(self, name: str) -> str | None:
        """A line saying that the stream was not read exactly once, or None."""
        unique = len(set(self.keys))
        if unique == len(self.keys) and unique + self.skipped == self.expected:
            return None
        return (f"warning: monitor {name}: {len(self.keys)} images ({unique} distinct) + {self.skipped} skipped, "
                f"but the index lists {self.expected}")


@torch.no_grad()
def extract_features(accelerator: Accelerator, vit: ViT, stream: ShardStream, desc: str = "features") -> Features:
    """[CLS] and mean patch features of every image of an exactly-once labelled stream, on every rank.

    `vit` is the unwrapped encoder (ranks may hold different batch counts: a DDP forward could hang);
    the caller puts it in eval() mode. Under FSDP every rank calls this inside
    `vitcore.sharding.standalone_forwards`, and ranks with fewer batches run stand-in forwards.
    """
    device = accelerator.device
    rows: dict[str, list[Tensor]] = {name: [] for name in FEATURES}
    labels: list[Tensor] = []
    keys: list[str] = []
    skipped_before = stream.skipped
    for batch, real in device_batches(accelerator, stream, desc):
        with accelerator.autocast():
            out = vit(batch["image"])
        if not real:  # a stand-in forward: FSDP's all-gathers stay matched across ranks
            continue
        rows["cls"].append(out.cls.float())  # (B, D)
        rows["patch_mean"].append(out.patches.float().mean(dim=1))  # (B, D)
        labels.append(batch["label"])
        keys.extend(batch["key"])
    dim = vit.cfg.dim
    mine = {name: torch.cat(r) if r else torch.zeros(0, dim, device=device) for name, r in rows.items()}
    gathered = {name: gather_rows(accelerator, x) for name, x in mine.items()}
    label_rows = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    skipped = torch.tensor([stream.skipped - skipped_before], device=device)
    return Features(
        features=gathered,
        labels=gather_rows(accelerator, label_rows),
        keys=[k for rank_keys in gather_object([keys]) for k in rank_keys],
        skipped=int(accelerator.reduce(skipped, "sum").item()),
        expected=stream.epoch_samples,
    )


def gather_rows(accelerator: Accelerator, x: Tensor) -> Tensor:
    """(M_r, ...) rows on each rank -> (sum of M_r, ...) on every rank, rank-major. Ranks may hold
    different row counts: they are padded to the largest for the collective, then cut back."""
    if accelerator.num_processes == 1:
        return x
    counts = accelerator.gather(torch.tensor([x.shape[0]], device=x.device)).tolist()  # (world,)
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    everything = accelerator.gather(padded).view(len(counts), max(counts), *x.shape[1:])  # (world, max, ...)
    return torch.cat([everything[r, :n] for r, n in enumerate(counts)])


def knn_top1(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int, k: int = 20,
             temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (DINO's): cosine similarity, the k nearest train samples vote for their
    class with weight exp(sim / T). Ties in the votes go to the lowest class id."""
    train = F.normalize(train_x.float(), dim=1)  # (N, D)
    k = min(k, train.shape[0])
    hits = 0
    for start in range(0, val_x.shape[0], chunk):  # bounds the (chunk, N) similarity matrix
        val = F.normalize(val_x[start:start + chunk].float(), dim=1)  # (b, D)
        sims, nearest = (val @ train.T).topk(k, dim=1)  # (b, k), (b, k)
        votes = torch.zeros(val.shape[0], num_classes, device=val.device, dtype=torch.float64)  # (b, C)
        votes.scatter_add_(1, train_y[nearest], (sims.double() / temperature).exp())
        hits += int((votes.argmax(dim=1) == val_y[start:start + chunk]).sum())  # argmax: first of equals
    return hits / max(val_x.shape[0], 1)


def linear_probe_top1(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                      steps: int = 300, weight_decay: float = 1e-4) -> float:
    """Top-1 of a multinomial logistic regression fitted on (train_x, train_y) by full-batch L-BFGS
    (at most `steps` iterations, from zero weights: deterministic), scored on (val_x, val_y).
    Features are standardised with the train statistics; the L2 penalty keeps separable data finite."""
    mean, std = train_x.float().mean(0), train_x.float().std(0, unbiased=False).clamp_min(1e-6)  # (D,)
    train, val = (train_x.float() - mean) / std, (val_x.float() - mean) / std  # (N, D), (M, D)
    with torch.enable_grad():
        weight = torch.zeros(train.shape[1], num_classes, device=train.device, requires_grad=True)  # (D, C)
        bias = torch.zeros(num_classes, device=train.device, requires_grad=True)  # (C,)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(train @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        predicted = (val @ weight + bias).argmax(dim=1)  # (M,)
    return float((predicted == val_y).float().mean()) if val_y.numel() else 0.0


def probe_scores(train: Features, val: Features, num_classes: int, k: int, temperature: float,
                 probe_steps: int) -> dict[str, float]:
    """{"knn_top1_<feature>", "linear_top1_<feature>"} for each feature in FEATURES."""
    scores: dict[str, Any] = {}
    for name in FEATURES:
        args = (train.features[name], train.labels, val.features[name], val.labels, num_classes)
        scores[f"knn_top1_{name}"] = knn_top1(*args, k=k, temperature=temperature)
        scores[f"linear_top1_{name}"] = linear_probe_top1(*args, steps=probe_steps)
    return scores
