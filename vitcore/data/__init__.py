"""Data: image sources -> WebDataset shards (`shards`) -> streamed uint8 batches (`stream`: planned
in `plan`, read, decoded and batched in `pipeline`).

The shard writer is not imported here: it runs as `python -m vitcore.data.shards`.
"""

from vitcore.data.index import read_index
from vitcore.data.sources import Record, Source, open_source
from vitcore.data.plan import resolve_shards
from vitcore.data.stream import ShardStream
from vitcore.data.transforms import (
    MEAN,
    STD,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    decode_image,
    eval_transform,
    finetune_train_transform,
    normalize,
    open_image,
    pretrain_transform,
)

__all__ = [
    "MEAN",
    "STD",
    "RandomResizedCropFlip",
    "Record",
    "ResizeCenterCrop",
    "ShardStream",
    "Source",
    "decode_image",
    "eval_transform",
    "finetune_train_transform",
    "normalize",
    "open_image",
    "open_source",
    "pretrain_transform",
    "read_index",
    "resolve_shards",
]
