"""The shard writer with N worker processes (the same bytes for any N) and its resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_helpers import kill_after, write_image_folder

from vitcore.data.shard_resume import PLAN_NAME, PROGRESS_DIR
from vitcore.data.shards import main, shuffled_order, write_shards
from vitcore.data.sources import FolderSource

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes (not the writer's progress), index.json without its `created` time
    (the one field that may differ)."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        if path.name == "index.json":
            index = json.loads(data)
            index.pop("created")
            data = json.dumps(index).encode()
        files[path.name] = data
    return files


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """41 images of varied modes and sizes (a garbage file and a truncated JPEG among them) plus
    three more unreadable .jpg files, so that some shards hold skipped images."""
    root = write_image_folder(tmp_path / "src")
    for i, junk in enumerate((b"", b"\xff\xd8\xff\xe0 not really", b"GIF89a" + bytes(20))):
        (root / "cat" / f"junk{i}.jpg").write_bytes(junk)
    return root


@pytest.mark.parametrize("size", [{"samples_per_shard": 4}, {"max_bytes": 6000}])
def test_any_worker_count_writes_the_same_bytes(source: Path, tmp_path: Path, size: dict[str, int]) -> None:
    outputs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        index = write_shards(str(source), out, resize=24, workers=workers, progress=False, **size)
        outputs[workers] = snapshot(out)
    assert index["skipped"] == 5 and index["total"] == 39 and len(index["shards"]) > 3
    assert outputs[2] == outputs[1] and outputs[3] == outputs[1]
    skipped = outputs[1]["skipped.txt"].decode().splitlines()
    assert len(skipped) == 5 and any(line.startswith("cat/junk0_jpg\t") for line in skipped)


def test_a_rerun_with_other_arguments_is_refused_and_touches_nothing(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--source", str(source), "--out", str(out), "--samples-per-shard", "10", "--workers", "1"]
    main([*common, "--resize", "24"])
    def files() -> dict[str, tuple[bytes, int]]:
        return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(SystemExit) as exc:
        main([*common, "--resize", "32", "--no-shuffle"])
    message = str(exc.value.code)  # a string: Python prints it and exits with status 1
    assert "\n" not in message and message.startswith("vit-shards: error: --out")
    assert "written with --resize 24 --shuffle-seed 0, now --resize 32 --no-shuffle" in message
    assert files() == before

    # --workers is not an argument of the output: a rerun with another count keeps every shard.
    shards_before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    main([*common[:-1], "2", "--resize", "24"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == shards_before
    # --overwrite starts over with the new arguments.
    main([*common, "--resize", "32", "--overwrite"])
    assert json.loads((out / PROGRESS_DIR / PLAN_NAME).read_text())["args"]["resize"] == 32


@pytest.mark.parametrize("size", [{"samples_per_shard": 5}, {"max_bytes": 6000}])
def test_a_damaged_shard_is_rewritten(source: Path, tmp_path: Path, size: dict[str, int]) -> None:
    """Fixed-size shards: only the damaged one is written again; byte-cut shards: it and the ones
    after it (each starts where the one before it ended)."""
    write_shards(str(source), tmp_path / "whole", resize=24, workers=1, progress=False, **size)
    out = tmp_path / "out"
    write_shards(str(source), out, resize=24, workers=1, progress=False, **size)
    inodes = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}
    (out / "shard-000002.tar").write_bytes((out / "shard-000002.tar").read_bytes()[:3000])
    (out / "index.json").unlink()
    write_shards(str(source), out, resize=24, workers=2, progress=False, **size)
    kept = {n for n, inode in inodes.items() if (out / n).stat().st_ino == inode}
    fixed = "samples_per_shard" in size
    assert kept == (set(inodes) - {"shard-000002.tar"} if fixed else {"shard-000000.tar", "shard-000001.tar"})
    assert snapshot(out) == snapshot(tmp_path / "whole")


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(c) for c in path.read_text().split()} if path.exists() else set()


@pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform != "linux", reason="needs Linux FIFOs")
def test_a_writer_killed_midway_resumes_to_the_same_files(source: Path, tmp_path: Path) -> None:
    """The writer is SIGKILLed while it waits for image 27 (a FIFO nobody writes to, so the moment
    is the same in every run), after it finished some shards of 5; a rerun finishes the rest."""
    write_shards(str(source), tmp_path / "whole", resize=24, samples_per_shard=5, workers=1, progress=False)
    relpaths = FolderSource(source).relpaths
    blocker = source / relpaths[shuffled_order(len(relpaths), 0, None)[27]]
    data = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vitcore.data.shards", "--source", str(source), "--out", str(out),
           "--resize", "24", "--samples-per-shard", "5", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "log.txt", "wb") as log:
        writer = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    # 0.3 s to run into the FIFO; its workers' pids read just before the kill
    workers = kill_after(writer, out / PROGRESS_DIR / "shard-000002.json", 0.3, lambda: _children(writer.pid))
    assert not (out / "index.json").exists() and (out / PROGRESS_DIR / PLAN_NAME).exists()
    kept = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}
    assert 3 <= len(kept) < len(list((tmp_path / "whole").glob("shard-*.tar")))
    assert len(workers) == 2 or not Path(f"/proc/{os.getpid()}/task").exists()
    # The workers notice the parent is gone and exit (they would otherwise wait forever).
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers):
        assert time.monotonic() < deadline, f"orphaned workers {workers} still running"
        time.sleep(0.1)

    blocker.unlink()
    blocker.write_bytes(data)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert snapshot(out) == snapshot(tmp_path / "whole")
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # finished shards were kept, not rewritten


def _state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "zombie"  # gone
    return next((line for line in status.splitlines() if line.startswith("State:")), "").lower()
