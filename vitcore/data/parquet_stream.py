"""Parquet data streamed with `datasets` (`streaming=True`): a source that is never materialised.

    vit-shards --source hf:user/big-dataset --split train --streaming --no-shuffle --num-tasks 64 ...
    vit-shards --source data/parquet/ --streaming --no-shuffle --out shards/train

The rows are records in their stored order: the data files sorted by name (a hub dataset's in the
order the hub lists them), each file's rows in order. Each file's row count comes from its parquet
footer, without reading any data, so the source has a length, the writer can plan shards of
`--samples-per-shard` records and give each task a contiguous block of them, and a task opens the
stream at the file holding its first record and reads only up to its last. Reading in another
order works but restarts the stream at every jump, so a streamed source is written unshuffled:
shuffle the rows when the files are made (the training stream shuffles shards and samples again).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vitcore.data.sources import HF_SAVED_MARKERS, Record, Source, hf_columns, hf_record


class ParquetStreamSource(Source):
    """Parquet files (local paths or fsspec URLs such as `hf://datasets/...`) read as one stream."""

    sequential = True

    def __init__(self, files: list[str], description: str) -> None:
        import datasets
        import fsspec
        import pyarrow.parquet as pq

        if not files:
            raise ValueError(f"no parquet files found in {description} (--streaming reads parquet data: hf:NAME, "
                             "a .parquet file or a folder of them)")
        self.files, self.description = files, description
        counts = []
        for name in files:
            with fsspec.open(name, "rb") as f:  # the footer only: a few KiB of a file of any size
                metadata = pq.read_metadata(f)
                counts.append(metadata.num_rows)
                if name == files[0]:
                    schema = metadata.schema.to_arrow_schema()
        self._starts = [0]  # the global position of each file's first row
        for count in counts:
            self._starts.append(self._starts[-1] + count)
        if self._starts[-1] == 0:
            raise ValueError(f"no images found in {description}")
        self._features = datasets.Features.from_arrow_schema(schema)
        self._image_col, self._label_col, self.classes = hf_columns(self._features, description)

    def __len__(self) -> int:
        return self._starts[-1]

    def labels(self) -> list[int | None]:
        """The label column alone, file after file (parquet is columnar: no image bytes are read)."""
        import fsspec
        import pyarrow.parquet as pq

        if self._label_col is None:
            return [None] * len(self)
        labels: list[int | None] = []
        for name in self.files:
            with fsspec.open(name, "rb") as f:
                column = pq.read_table(f, columns=[self._label_col]).column(0).to_pylist()
            labels += [None if t is None or t < 0 else int(t) for t in column]
        return labels

    def read(self, order: Iterable[int]) -> Iterator[Record]:
        rows: Iterator[dict[str, Any]] | None = None
        position = -1  # the position of the stream's next row
        for i in order:
            i = int(i)
            if rows is None or i != position:  # a jump: start the stream again where `i` is
                file = bisect.bisect_right(self._starts, i) - 1
                rows = iter(self._open(file).skip(i - self._starts[file]))
                position = i
            yield hf_record(i, next(rows), self._image_col, self._label_col)
            position += 1

    def _open(self, file: int) -> Any:
        """A stream of the rows from file `file` on, images left encoded."""
        import datasets

        stream = datasets.load_dataset("parquet", data_files={"train": self.files[file:]}, split="train",
                                       streaming=True, features=self._features)
        return stream.cast_column(self._image_col, datasets.Image(decode=False))


def open_stream(spec: str, split: str | None) -> ParquetStreamSource:
    """`hf:NAME` (a hub dataset's parquet files for `split`), a .parquet file, or a folder of them
    (`split`: a subfolder); anything else raises ValueError naming what streaming reads."""
    if spec.startswith("hf:") and not Path(spec[3:]).exists():
        return ParquetStreamSource(_hub_parquet_files(spec[3:], split or "train"), f"{spec} [{split or 'train'}]")
    path = Path(spec.removeprefix("hf:"))
    if path.is_dir() and any((path / m).exists() for m in HF_SAVED_MARKERS):
        raise ValueError(f"{path} is a save_to_disk folder, which is memory-mapped, never copied or held in memory: "
                         "drop --streaming (it reads parquet files)")
    if path.is_dir():
        folder = path / split if split else path
        return ParquetStreamSource(sorted(str(p) for p in folder.rglob("*.parquet")), str(folder))
    if path.is_file() and path.suffix.lower() == ".parquet":
        return ParquetStreamSource([str(path)], str(path))
    raise ValueError(f"--streaming reads parquet data (hf:NAME, a .parquet file or a folder of them), not {spec}")


def _hub_parquet_files(name: str, split: str) -> list[str]:
    """The `hf://` URLs of a hub dataset's parquet files for `split`, as `datasets` resolves them."""
    import datasets

    files = datasets.load_dataset_builder(name).config.data_files
    if files is None or split not in files:
        raise ValueError(f"hf:{name} has no split {split!r}" + (f" (splits: {sorted(files)})" if files else ""))
    urls = [str(f) for f in files[split]]
    if not all(url.endswith(".parquet") for url in urls):
        raise ValueError(f"hf:{name} is not stored as parquet; --streaming reads parquet files only")
    return urls
