"""vitcore.data.index: index.json, written atomically and read with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_helpers import CLASSES

from pretrain.task import CROP_SCALE
from vitcore.data import ShardStream, read_index, train_transform
from vitcore.data.index import write_index


def test_a_corrupt_index_names_the_file_and_says_it_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{'shards': []}")
    with pytest.raises(ValueError, match=r"^\S+/index.json is not valid JSON \(Expecting property name"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"index.json is not valid JSON"):
        ShardStream(str(tmp_path), train_transform(8, CROP_SCALE), 2)
    (tmp_path / "index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"index.json is not a shard index"):
        read_index(tmp_path / "index.json")


def test_index_shard_names_cannot_be_commands_or_escape_the_folder(shard_dir: Path, tmp_path: Path) -> None:
    first = read_index(shard_dir)["shards"][0]
    for name in ("pipe:touch pwned", "../elsewhere.tar", "/abs/shard.tar", "https://host/x.tar"):
        folder = tmp_path / str(abs(hash(name)))
        folder.mkdir()
        write_index(folder, [{**first, "name": name}], CLASSES)  # the writer writes any name; readers refuse
        with pytest.raises(ValueError, match="is not a file name in that folder"):
            ShardStream(str(folder), train_transform(8, CROP_SCALE), 2)
        with pytest.raises(ValueError, match=r"^/\S+/index.json: shard name .* is not a file name in that folder"):
            read_index(folder)
    assert not Path("pwned").exists()


def test_write_index_round_trips_and_a_malformed_index_is_named(tmp_path: Path) -> None:
    shards = [{"name": "a.tar", "samples": 3}, {"name": "b.tar", "samples": 4}]
    written = write_index(tmp_path, shards, CLASSES, source="somewhere", skipped=1)
    assert list(written)[:3] == ["shards", "total", "classes"] and written["total"] == 7
    assert read_index(tmp_path) == read_index(tmp_path / "index.json") == written
    assert written["source"] == "somewhere" and written["skipped"] == 1 and "created" in written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]  # no temporary file left
    for shards_field in ({"a.tar": 3}, [{"name": "a.tar"}], ["a.tar"]):
        (tmp_path / "index.json").write_text(json.dumps({**written, "shards": shards_field}))
        with pytest.raises(ValueError, match=r"^\S+/index.json is not a shard index \(shards must be a list"):
            read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"shards": shards, "total": 7}))
    with pytest.raises(ValueError, match=r"index.json is not a shard index \(missing \['classes'\]\)"):
        read_index(tmp_path)
