"""Data: image sources -> WebDataset shards (`shards`) -> streamed uint8 batches (`stream`: planned
in `plan`, read, decoded and batched in `pipeline`).

The shard writer is not imported here: it runs as `python -m vitcore.data.shards`.
"""

from vitcore.data.index import read_index
from vitcore.data.sources import Record, Source, open_source
from vitcore.data.plan import resolve_shards
from vitcore.data.stream import ShardStream
from vitcore.data.transforms import (
    RandomResizedCropFlip,
    ResizeCenterCrop,
    decode_image,
    eval_transform,
    open_image,
    train_transform,
)

__all__ = [
    "RandomResizedCropFlip",
    "Record",
    "ResizeCenterCrop",
    "ShardStream",
    "Source",
    "decode_image",
    "eval_transform",
    "open_image",
    "open_source",
    "train_transform",
    "read_index",
    "resolve_shards",
]
