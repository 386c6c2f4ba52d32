"""Corruption of patch embeddings for masked patch prediction (ViT paper, appendix B.1.2).

Applied after the patch projection and before position embeddings are added, so a corrupted
slot keeps its position and the encoder knows *where* it must predict. Of the selected patches
most get a learnable [mask] embedding, some another patch's embedding and some stay unchanged,
as BERT does for words: the model cannot tell from the input alone which patches it is asked about.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

MASK, RANDOM, KEPT = 0, 1, 2  # values of `Corruption.kind`


class Corruption(NamedTuple):
    """What `corrupt` did, for the loss and the visualisation (a NamedTuple so DDP and
    Accelerate can walk the model's output)."""

    positions: torch.Tensor  # (B, K) int64 patch indices (row-major over the grid) selected for prediction
    kind: torch.Tensor  # (B, K) int64: MASK, RANDOM or KEPT
    source: torch.Tensor  # (B, K) int64 flat index b * N + n of the copied patch where RANDOM, else -1


def round_half_up(x: float) -> int:
    """floor(x + 0.5), with ties judged to 1e-9 so that 0.7 * 5 = 3.4999999999999996 rounds like 3.5."""
    return math.floor(x + 0.5 + 1e-9)


def corruption_counts(n: int, corrupt_ratio: float, mask_prob: float, random_prob: float) -> tuple[int, int, int]:
    """The per-image counts (K, K_mask, K_rand) for N = `n` patches; the rest K - K_mask - K_rand are kept.

    K = max(1, round_half_up(corrupt_ratio * N)), capped at N: at least one patch, so the loss is
    never an empty mean. K_mask = round_half_up(mask_prob * K). K_rand = round_half_up(random_prob * K),
    capped at K - K_mask (two halves rounded up could otherwise exceed K: K=2, 0.75/0.25 -> 2 + 1).
    Python's round() is banker's rounding (round(2.5) == 2), which we do not use.
    """
    k = min(n, max(1, round_half_up(corrupt_ratio * n)))
    k_mask = min(k, round_half_up(mask_prob * k))
    k_rand = min(k - k_mask, round_half_up(random_prob * k))
    return k, k_mask, k_rand


def corrupt(
    embeddings: torch.Tensor,
    mask_token: torch.Tensor,
    corrupt_ratio: float,
    mask_prob: float,
    random_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Corruption]:
    """Corrupt (B, N, D) patch embeddings; returns the corrupted (B, N, D) copy and the record.

    Per image exactly K positions are chosen uniformly at random (see `corruption_counts`). Since
    the selection is a uniformly random order, giving its first K_mask the [mask] token (1, 1, D),
    the next K_rand a random other patch and keeping the rest assigns the kinds uniformly too.
    A random replacement is drawn uniformly from the other B * N - 1 patches of the whole batch.
    Static shapes and no loops, so it runs the same on any device and under torch.compile.
    """
    B, N, D = embeddings.shape
    device = embeddings.device
    k, k_mask, k_rand = corruption_counts(N, corrupt_ratio, mask_prob, random_prob)
    if k_rand > 0 and B * N < 2:
        raise ValueError("random replacement needs at least two patches in the batch")

    noise = torch.rand(B, N, device=device, generator=generator)  # (B, N)
    positions = noise.argsort(dim=1)[:, :k]  # (B, K) a uniformly random K-subset, in random order
    kind = torch.full((k,), KEPT, dtype=torch.long, device=device)  # (K,)
    kind[:k_mask] = MASK
    kind[k_mask : k_mask + k_rand] = RANDOM
    kind = kind.expand(B, k)  # (B, K) the same layout for every image

    rows = torch.arange(B, device=device)[:, None] * N + positions  # (B, K) flat indices b * N + n
    # The source of each RANDOM slot: adding 1..B*N-1 (mod B*N) to its own index picks any patch but itself.
    own = rows[:, k_mask : k_mask + k_rand]  # (B, K_rand)
    offset = torch.randint(1, max(B * N, 2), (B, k_rand), device=device, generator=generator)  # (B, K_rand)
    src = (own + offset) % (B * N)  # (B, K_rand)

    flat = embeddings.reshape(B * N, D)  # (B*N, D)
    replacement = torch.cat(
        [
            mask_token.to(embeddings.dtype).expand(B, k_mask, D),  # (B, K_mask, D) cast: autocast may give bf16
            flat.index_select(0, src.flatten()).view(B, k_rand, D),  # (B, K_rand, D) gradients reach the source
        ],
        dim=1,
    )  # (B, K_mask + K_rand, D)
    # Whole-row copies on the flat view: on CPU several times faster than scatter with a (B, K, D) index.
    changed = rows[:, : k_mask + k_rand].flatten()  # (B * (K_mask + K_rand),)
    corrupted = flat.index_copy(0, changed, replacement.reshape(-1, D)).view(B, N, D)  # (B, N, D) rest untouched

    minus_one = torch.full((B, k_mask), -1, dtype=torch.long, device=device)  # (B, K_mask)
    rest = torch.full((B, k - k_mask - k_rand), -1, dtype=torch.long, device=device)  # (B, K_kept)
    source = torch.cat([minus_one, src, rest], dim=1)  # (B, K)
    return corrupted, Corruption(positions=positions, kind=kind, source=source)
