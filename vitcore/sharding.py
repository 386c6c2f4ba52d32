"""Checkpoint state of a model sharded by FSDP (Accelerate's FSDP1 or FSDP2), in the layout of
`vitcore.checkpoint`: full weights in `model.safetensors`, the full optimizer state in
`train_state.pt`, both written by rank 0.

Why full state on rank 0 rather than torch's distributed checkpoint (DCP): DCP's file-system
reader loads its `.metadata` file with `pickle.load` and every non-tensor entry (param groups)
with `torch.load(weights_only=False)` (torch 2.14: checkpoint/filesystem.py `read_metadata`,
checkpoint/default_planner.py `load_bytes`), so loading a DCP checkpoint can run pickled code,
which our checkpoints never do. Gathering costs rank 0 host memory (ViT-H/14, 632M parameters:
2.5 GB of weights and 5 GB of AdamW moments in fp32) but keeps one format for DDP and FSDP runs
and lets a run resume on any number of processes.

Every function here is a collective: all ranks call it, in the same order.

Forwards outside the training step (evaluation, the monitor's features, images) are collectives too
under FSDP, since each FSDP unit all-gathers its parameters in its forward: `standalone_forwards`
lets them run on a submodule, and `even_batches` keeps ranks with fewer batches in step.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import chain
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

# gather: every rank takes part, rank 0 receives each tensor whole and moves it to the host at once
# (one parameter at a time on the device, never the whole model)
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# scatter: rank 0 holds the full state, the others pass an empty dict and receive their shards
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)


def is_sharded(accelerator: Accelerator) -> bool:
    """True when the prepared model's parameters are sharded across processes (FSDP1 or FSDP2)."""
    return accelerator.distributed_type == DistributedType.FSDP


def full_model_state(model: nn.Module, accelerator: Accelerator) -> dict[str, torch.Tensor] | None:
    """Rank 0: the full state dict on the CPU, keyed as the unwrapped model's (no FSDP prefixes),
    a snapshot that later steps leave alone; other ranks: None."""
    state = get_model_state_dict(model, options=GATHER)
    return _snapshot(state, model.state_dict().values()) if accelerator.is_main_process else None


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Rank 0: the full optimizer state on the CPU, keyed by parameter name ({"state": {name:
    {"step", "exp_avg", ...}}, "param_groups": [...]}), tensors and plain values only, so that
    `torch.load(weights_only=True)` reads it back; other ranks: None. `optimizer` may be
    Accelerate's wrapper."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    state = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if not state:  # ranks other than 0 receive nothing
        return None
    live = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
    return {"state": {name: _snapshot(entry, live) for name, entry in state["state"].items()},
            "param_groups": [dict(group) for group in state["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
    """Load `optimizer_state`'s output (rank 0; None elsewhere) into the optimizer of a prepared
    model: under FSDP each rank keeps the slices of the moments that match its parameter shards.
    Unsharded on the CPU, the optimizer adopts `state`'s tensors: read it from disk for each load."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, optimizer, _own_steps(state) if state else {}, options=_load_options())


@contextmanager
def standalone_forwards(model: nn.Module) -> Iterator[None]:
    """Lets the code inside run forwards of the prepared `model` or of a submodule alone (the
    encoder, say), outside the training step. FSDP2's `fully_shard` changes the module in place
    (`unwrap_model` returns it as it is): each Block all-gathers its own parameters in its forward,
    but the root's (patch and position embeddings, heads: everything outside the Blocks) are
    gathered only by the root's forward, so a submodule called alone would meet shards. They are
    gathered here until the block ends. FSDP2 also takes the first module to run forward as the
    root, so the root is initialised first (torch 2.14 has no public call for it). Without FSDP2, nothing.
    Every rank enters, and runs the same number of forwards inside (see `even_batches`)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    # Private FSDP2 API, pinned to torch 2.14.1 by tests/test_fsdp.py: in torch 2.14 only the root's
    # forward pre-hook (`FSDPState._root_pre_forward`) runs `_lazy_init`, which marks this module the
    # root and every Block's state a non-root. `model.unshard()` initialises only the module's own
    # parameter groups, so a Block that ran forward first would make itself a root, and the next
    # training forward would raise. A no-op once the root has run forward.
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()  # the next training forward gathers them again


def even_batches(accelerator: Accelerator, batches: Iterable[dict[str, Any]], count: int
                 ) -> Iterator[tuple[dict[str, Any], bool]]:
    """(batch, True) for each batch of an exactly-once stream; when sharded, then (stand-in, False)
    until this rank has yielded as many as the rank with the most batches. `count` is this rank's
    upper bound (`len(stream)`: corrupt samples only lower it). The caller runs the same forward on a
    stand-in and discards what it returns: ranks hold different batch counts, and a rank that
    stopped its forwards early would leave the others waiting in an all-gather forever. A stand-in
    is this rank's last batch; on a rank with none, a one-image batch of zeros shaped as another
    rank's. One small collective before the loop; without sharding, the batches as they are."""
    if not is_sharded(accelerator):
        yield from ((batch, True) for batch in batches)
        return
    it = iter(batches)
    first = next(it, None)
    layout = None if first is None else {k: (tuple(v.shape[1:]), v.dtype) if torch.is_tensor(v) else None
                                         for k, v in first.items()}
    counts, layouts = zip(*gather_object([(count, layout)]))  # every rank's, in rank order
    most, done, last = max(counts), 0, first
    for batch in chain([] if first is None else [first], it):
        if done == most:  # never: len(stream) bounds what the stream reads; stop before a forward no one matches
            raise RuntimeError(f"rank {accelerator.process_index} read more batches than len(stream)={count}")
        yield batch, True
        done, last = done + 1, batch
    if last is None and done < most:
        shapes = next(lay for lay in layouts if lay is not None)
        last = {k: torch.zeros((1, *s[0]), dtype=s[1]) if s is not None else [""] for k, s in shapes.items()}
    for _ in range(most - done):
        yield last, False


def _load_options() -> StateDictOptions:
    # one process (no process group) has nothing to scatter: the same functions then serve it too
    return SCATTER if dist.is_initialized() else StateDictOptions(strict=True)


def _snapshot(state: dict[str, Any], live: Any) -> dict[str, Any]:
    """`state` with a copy of every tensor that shares storage with a `live` one. Torch gathers
    new tensors for sharded parameters, but hands back the live ones where there is nothing to
    gather or move (0-d optimizer steps; any tensor of an unsharded model on the CPU): shared, a
    saved checkpoint would hold whatever training has reached by the time it is written."""
    held = {_storage(t) for t in live}
    return {k: v.clone() if torch.is_tensor(v) and _storage(v) in held else v for k, v in state.items()}


def _storage(t: torch.Tensor) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()


def _own_steps(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of an optimizer state dict with its own 0-d `step` tensors: an optimizer adopts the
    loaded ones, so a state loaded twice would otherwise resume at the first load's step."""
    return {"state": {name: {k: v.clone() if torch.is_tensor(v) and v.dim() == 0 else v for k, v in entry.items()}
                      for name, entry in state["state"].items()},
            "param_groups": [dict(group) for group in state["param_groups"]]}
