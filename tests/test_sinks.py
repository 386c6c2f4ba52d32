"""The logger's sinks: TensorBoard and Weights & Biases (offline: no network here) get what metrics.jsonl
gets, read back from their own files; `run.log_with` chooses them, and a bad choice stops before work."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from test_toy_task import run

from vitcore.rundir import read_metrics
from vitcore.train.logger import RunLogger
from vitcore.train.sinks import tag

wandb = pytest.importorskip("wandb")  # a dev dependency: installed by `make test`


def wandb_records(run_dir: Path) -> list:
    """The records of the W&B run under `run_dir`, from its .wandb file: W&B's 7-byte header, then
    LevelDB's log format (32 KiB blocks of records: crc32c, length, type; type 1 whole, 2-4 first,
    middle, last fragment), each record a protobuf `Record`."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    data, records, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the rest of the block is padding
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_tensorboard_and_wandb_get_what_metrics_jsonl_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    logger = RunLogger(out, 4, 0, True, sinks=("tensorboard", "wandb"), config={"optim": {"lr": 0.5}})
    for step in (2, 4):
        logger.log(step, 32 * step, {"loss": 2.0 / step, "lr": 0.1 * step, "img_s": 100.0 + step})
    logger.log_section("val", 4, 128, {"top1": 0.25, "count": 100.0}, 100)
    logger.image(4, "val/attention", torch.rand(3, 8, 8))
    logger.close({"steps": 4})

    rows = read_metrics(out)
    expected = {(r["step"], tag("train", k) if "/" not in k else k): v for r in rows for k, v in r.items()
                if k not in ("step", "samples")}
    assert len(expected) == 8 and expected[(4, "sys/img_s")] == 104.0 and expected[(4, "val/top1")] == 0.25

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    scalars = {(e.step, t): e.value for t in events.Tags()["scalars"] for e in events.Scalars(t)}
    assert scalars == pytest.approx(expected)  # float32 in the event file
    assert events.Tags()["images"] == ["val/attention"]

    import json

    def items(update) -> dict:  # a record's key: value pairs (a key is `key` or, lately, `nested_key`)
        return {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in update}

    records = wandb_records(out)
    rows = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    history = {(row["_step"], k): v for row in rows for k, v in row.items() if "/" in k}
    assert {k: v for k, v in history.items() if "." not in k[1]} == expected
    assert history[(4, "val/attention._type")] == "image-file"  # an image's fields are keys of their own
    assert list(out.glob("wandb/*run-*/files/media/images/val/attention_4_*.png"))
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert items(run_record.config.update)["optim"] == {"lr": 0.5}  # the run's config, for W&B's UI
    assert run_record.display_name == "run"  # the run directory's name


def test_log_with_chooses_the_sinks_and_a_bad_choice_stops_before_work(cifar_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    run(cifar_shards, out, "run.steps=2", "run.log_with=[]")
    assert read_metrics(out) and not list(out.glob("events.out.tfevents.*")) and not (out / "wandb").exists()
    with pytest.raises(SystemExit, match=r"run.log_with: 'mlflow' is not one of tensorboard, wandb"):
        run(cifar_shards, tmp_path / "bad", "run.log_with=[tensorboard,mlflow]")
    assert not (tmp_path / "bad").exists()
