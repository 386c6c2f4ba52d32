"""Confidence intervals for the difference between two arms (A minus B), two kinds:

- over seeds: `t_interval` of the paired differences (one per seed), Student's t with n - 1
  degrees of freedom. It says how much the gain moves with the run's randomness (initialisation,
  data order, augmentation); with 2 or 3 seeds it is wide, honestly so.
- over validation images: `paired_bootstrap` resamples the images (with replacement, the same
  draw for both arms and every seed), the statistic the difference of top-1 averaged over seeds,
  and reports the percentile interval. It says how much the gain moves with the choice of the
  validation images, and pairs what the two arms got right on the same image.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vitcore.rundir import read_predictions


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (0.5 < p < 1): bisection on the CDF, integrated by Simpson's rule."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, intervals: int = 2000) -> float:  # 0.5 + the density's integral over [0, x]
        h = x / intervals
        pdf = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(intervals + 1)]
        return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * sum(pdf[1:-1:2]) + 2 * sum(pdf[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """[low, high] for the mean of paired `differences` (one per seed); None with fewer than 2."""
    n = len(differences)
    if n < 2:
        return None
    mean, sem = statistics.fmean(differences), statistics.stdev(differences) / math.sqrt(n)
    half = t_quantile((1 + confidence) / 2, n - 1) * sem
    return [mean - half, mean + half]


def paired_bootstrap(a: Tensor, b: Tensor, resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> list[float]:
    """[low, high] for top-1 of A minus top-1 of B: `a`, `b` are (S, N) (or (N,)) 0/1 hits on the
    same N validation images, row s of both from seed s. Deterministic for a `seed`."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"paired arms need hits of the same images: shapes {tuple(a.shape)} and {tuple(b.shape)}")
    per_image = (a - b).reshape(-1, a.shape[-1]).mean(0)  # (N,): the seeds' mean difference on each image
    n = per_image.numel()
    generator = torch.Generator().manual_seed(seed)
    stats = []
    for start in range(0, resamples, 500):  # (chunk, N) indices at a time: memory stays small
        picks = torch.randint(n, (min(500, resamples - start), n), generator=generator)
        stats.append(per_image[picks].mean(1))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(torch.cat(stats), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [low, high]


def runs_interval(pairs: Sequence[tuple[Path, Path]], resamples: int = 10_000, seed: int = 0) -> list[float] | None:
    """`paired_bootstrap` of run A's top-1 minus run B's from their predictions (`predictions.jsonl`),
    pooled over `pairs` (one (A, B) pair of run directories per seed); None when a run wrote none.
    Raises ValueError when a pair was not evaluated on the same images."""
    predictions = [(read_predictions(a), read_predictions(b)) for a, b in pairs]
    if not all(pa and pb for pa, pb in predictions):
        return None
    hits = [paired_hits(pa, pb) for pa, pb in predictions]  # per pair: (N,) each, in one image order
    return paired_bootstrap(torch.stack([h[0] for h in hits]), torch.stack([h[1] for h in hits]), resamples, seed)


def paired_hits(a: list[dict], b: list[dict]) -> tuple[Tensor, Tensor]:
    """Two runs' top-1 hits, (N,) each, from their predictions (`vitcore.rundir.read_predictions`),
    in one image order; refused when the runs were not evaluated on the same images."""
    a_keys, b_keys = [row["key"] for row in a], [row["key"] for row in b]
    if a_keys != b_keys:
        only = sorted(set(a_keys) ^ set(b_keys))
        raise ValueError(f"the runs were evaluated on different images ({len(a_keys)} and {len(b_keys)}; "
                         f"{len(only)} in one only, e.g. {only[:3]}): a paired comparison needs the same ones")
    return (torch.tensor([row["top5"][0] == row["label"] for row in a]),
            torch.tensor([row["top5"][0] == row["label"] for row in b]))
