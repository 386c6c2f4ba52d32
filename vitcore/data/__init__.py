"""Data: image sources -> WebDataset shards (`shards`) -> streamed uint8 batches (`stream`)."""

from vitcore.data.shards import encode_jpeg, write_shards
from vitcore.data.sources import Record, Source, open_source
from vitcore.data.stream import ShardStream, read_index, resolve_shards
from vitcore.data.transforms import (
    MEAN,
    STD,
    ImageTransform,
    decode_image,
    eval_transform,
    finetune_train_transform,
    normalize,
    pretrain_transform,
)

__all__ = [
    "MEAN",
    "STD",
    "ImageTransform",
    "Record",
    "ShardStream",
    "Source",
    "decode_image",
    "encode_jpeg",
    "eval_transform",
    "finetune_train_transform",
    "normalize",
    "open_source",
    "pretrain_transform",
    "read_index",
    "resolve_shards",
    "write_shards",
]
