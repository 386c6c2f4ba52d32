"""The one evaluation loop, shared by every stage and by `python -m finetune.evaluate`.

It walks an exactly-once `ShardStream` (`ShardStream.exactly_once`): each
rank reads its own share of the validation samples (see `vitcore.data.plan` for how the work
is divided, within shards when there are fewer shards than ranks). Per rank it adds up on the
device the sums the task returns for each batch (`Task.eval_sums`: hits, loss sums, counts, a
confusion matrix), then does ONE all-reduce after the loop: ranks may hold different batch counts, so
a per-batch collective could hang. Under FSDP the forward itself is a collective (it all-gathers
parameters): `vitcore.sharding.even_batches` then pads ranks with fewer batches with discarded
forwards, so that every rank runs as many as the rank with the most.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor
from tqdm.auto import tqdm

from vitcore.data import ShardStream
from vitcore.eval.metrics import ROWS, sum_dtype
from vitcore.sharding import even_batches, standalone_forwards

# One batch -> additive sums (`vitcore.train.task.Task.eval_sums`)
EvalStep = Callable[[dict[str, Any]], dict[str, Tensor]]


@contextmanager
def eval_mode(module: nn.Module, prepared: nn.Module | None = None) -> Iterator[nn.Module]:
    """`module` in eval() mode inside the block, its mode restored after. Given the prepared model
    it belongs to, forwards of `module` alone may run inside (FSDP2's root parameters gathered, see
    `vitcore.sharding.standalone_forwards`): then every rank enters and runs as many forwards."""
    was_training = module.training
    module.eval()
    try:
        with standalone_forwards(prepared) if prepared is not None else nullcontext():
            yield module
    finally:
        module.train(was_training)


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
def evaluate(accelerator: Accelerator, step: EvalStep, stream: ShardStream, desc: str = "eval",
             rows: bool = False) -> dict[str, Any]:
    """One pass of `stream`: the sums `step` returns per batch, added over batches and all ranks.

    Returns {"sums": {name: reduced tensor on the CPU}, "count" (images), "skipped", "expected"}.
    With `rows`, also "rows": one dict per image of every rank, sorted by its sample key: {"key",
    and each per-image value `step` returns under `ROWS` ("rows/top5" as "top5"), as plain lists}
    (without, those values are dropped). The caller runs `step` on the unwrapped model in eval()
    under the run's precision (under FSDP, on every rank inside `vitcore.sharding.standalone_forwards`).
    """
    device = accelerator.device
    dtype = sum_dtype(device)
    sums: dict[str, Tensor] = {}
    kept: list[dict[str, Any]] = []  # this rank's per-image rows
    images, skipped_before = 0, stream.skipped  # known from shapes: counted on the host, no sync
    for batch, real in device_batches(accelerator, stream, desc):
        with accelerator.autocast():
            out = step(batch)
        if not real:  # a stand-in forward: FSDP's all-gathers stay matched across ranks
            continue
        per_image = {name.removeprefix(ROWS): out.pop(name) for name in [n for n in out if n.startswith(ROWS)]}
        if rows:  # to the host: a sync, so only when asked
            values = {name: value.tolist() for name, value in per_image.items()}
            kept += [{"key": key, **{name: v[i] for name, v in values.items()}} for i, key in enumerate(batch["key"])]
        for name, value in out.items():
            sums[name] = sums[name] + value if name in sums else value.to(dtype)
        images += batch["image"].shape[0]
    if accelerator.num_processes > 1:  # a rank with no batch learns the sums' shapes from the others
        for shapes in gather_object([{k: tuple(v.shape) for k, v in sums.items()}]):
            for name, shape in shapes.items():
                sums.setdefault(name, torch.zeros(shape, dtype=dtype, device=device))
    names = sorted(sums)
    counts = torch.tensor([images, stream.skipped - skipped_before], dtype=dtype).to(device)
    flat = torch.cat([*(sums[k].flatten() for k in names), counts])
    total = accelerator.reduce(flat, "sum").cpu()  # the one collective over the data
    reduced, offset = {}, 0
    for name in names:
        reduced[name] = total[offset:offset + sums[name].numel()].view(sums[name].shape)
        offset += sums[name].numel()
    images, skipped = total[offset:].tolist()
    result = {"sums": reduced, "count": int(images), "skipped": int(skipped), "expected": stream.epoch_samples}
    if rows:
        result["rows"] = sorted((row for part in gather_object([kept]) for row in part), key=lambda row: row["key"])
    return result


def coverage_problem(result: dict[str, Any]) -> str | None:
    """A line saying that evaluation did not see every validation sample exactly once, or None."""
    if result["count"] + result["skipped"] == result["expected"]:
        return None
    return (f"warning: evaluation counted {result['count']} images + {result['skipped']} skipped, but the index "
            f"lists {result['expected']}: some validation samples were missed or seen twice")
