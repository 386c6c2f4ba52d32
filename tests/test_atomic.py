"""vitcore.atomic: the one way files that must survive a crash are written."""

import os

import pytest

from vitcore import atomic
from vitcore.atomic import atomic_write_bytes, atomic_write_text, commit


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "index.json"
    atomic_write_text(path, "old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["index.json"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert path.stat().st_mode == plain.stat().st_mode  # the umask's permissions, as a plain write


@pytest.mark.parametrize("dies_in", ["fsync", "replace"])
def test_a_crash_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, dies_in):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"step": 1}')

    def crash(*args):
        raise KeyboardInterrupt  # like a signal: not an OSError

    monkeypatch.setattr(atomic.os, dies_in, crash)  # after the data went to the temporary file
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"step": 2, "much": "' + "x" * 100_000 + '"}')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}'
    assert os.listdir(tmp_path) == ["summary.json"]


def test_commit_moves_a_finished_file_into_place(tmp_path):
    (tmp_path / "a.tar.tmp").write_bytes(b"data")
    commit(tmp_path / "a.tar.tmp", tmp_path / "a.tar")
    assert os.listdir(tmp_path) == ["a.tar"] and (tmp_path / "a.tar").read_bytes() == b"data"
