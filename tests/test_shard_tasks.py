"""The shard writer as independent tasks: N tasks (processes, a SLURM array, accelerate launch) write
the same bytes as one process; each resumes on its own; the last one writes index.json."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import CPU_ENV, ROOT, launch_command
from shard_helpers import kill_after, write_image_folder
from test_shards_parallel import snapshot

from vitcore.data.plan import resolve_shards
from vitcore.data.shard_resume import PLAN_NAME, PROGRESS_DIR, task_shards
from vitcore.data.shards import main, merge, shuffled_order, task_from_env, write_shards
from vitcore.data.sources import FolderSource

CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-10k.tar"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """41 images, two of them unreadable, plus three more unreadable .jpg files."""
    root = write_image_folder(tmp_path / "src")
    for i, junk in enumerate((b"", b"\xff\xd8\xff\xe0 not really", b"GIF89a" + bytes(20))):
        (root / "cat" / f"junk{i}.jpg").write_bytes(junk)
    return root


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest()[:16] for name, data in snapshot(folder).items()}


def test_any_number_of_tasks_writes_the_same_bytes(source: Path, tmp_path: Path) -> None:
    whole = write_shards(str(source), tmp_path / "one", resize=24, samples_per_shard=4, workers=1, progress=False)
    assert whole["skipped"] == 5 and len(whole["shards"]) == 11
    for tasks in (2, 3, 11, 12):  # 12 tasks for 11 shards: the last task has none and still finishes
        out = tmp_path / f"n{tasks}"
        first_owner = min(t for t in range(tasks) if task_shards(11, tasks, t))
        for task in reversed(range(tasks)):  # in any order: the one that finishes the last shard writes the index
            index = write_shards(str(source), out, resize=24, samples_per_shard=4, workers=2, progress=False,
                                 num_tasks=tasks, task_index=task)
            assert (index is not None) == (task <= first_owner) == (out / "index.json").exists()
        assert snapshot(out) == snapshot(tmp_path / "one"), f"{tasks} tasks"


def test_a_folder_with_tasks_missing_is_refused_by_training_and_by_merge(source: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    common = ["--source", str(source), "--out", str(out), "--resize", "24", "--samples-per-shard", "4",
              "--workers", "1", "--num-tasks", "4"]
    main([*common, "--task-index", "2"])
    assert "task 2 of 4 wrote its shards" in capsys.readouterr().out
    main([*common, "--task-index", "0"])
    with pytest.raises(FileNotFoundError) as exc:
        resolve_shards(str(out))
    line = str(exc.value)
    assert "\n" not in line and "6 of 11 shards are missing" in line and "task(s) 1, 3 of 4" in line
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), "--merge"])
    assert str(exc.value.code).startswith("vit-shards: error: ") and "task(s) 1, 3 of 4" in str(exc.value.code)

    for task in (1, 3):
        main([*common, "--task-index", str(task)])
    assert resolve_shards(str(out))[1] is not None  # finished: the last task wrote the index
    before = digests(out)
    (out / "index.json").unlink()  # as if the last task died before writing it
    assert "has every shard but no index.json" in str(pytest.raises(FileNotFoundError, resolve_shards, str(out)).value)
    main(["--out", str(out), "--merge"])
    assert digests(out) == before  # the index's time is the newest shard's: the same bytes again
    assert merge(out)["total"] == 39


def test_max_bytes_with_several_tasks_is_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--max-bytes cuts each shard .* one task writes them all, not 2"):
        write_shards(str(source), tmp_path / "out", max_bytes=6000, num_tasks=2, task_index=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_task_comes_from_a_slurm_array_or_the_launcher() -> None:
    assert task_from_env({}) == (1, 0)
    assert task_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (4, 3)
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "8"}) == (8, 7)
    # --array=1-8 and --array=10-24:2 (a step): the task index counts from the first id
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8",
                          "SLURM_ARRAY_TASK_MIN": "1"}) == (8, 0)
    assert task_from_env({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "10",
                          "SLURM_ARRAY_TASK_STEP": "2", "RANK": "0", "WORLD_SIZE": "1"}) == (8, 2)


@pytest.mark.slow  # 7 processes and a launcher: about a minute on 2 cores (make test-all)
def test_real_data_as_processes_a_slurm_array_and_under_accelerate_launch(tmp_path: Path) -> None:
    """CIFAR-10 images: 1 process; 2 and 3 tasks as concurrent processes (3 of them through
    launch/shards_slurm.sh with SLURM's array variables); 2 ranks of accelerate launch."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"needs {CIFAR_TAR}")
    args = ["--source", str(CIFAR_TAR), "--split", "train", "--limit", "600", "--samples-per-shard", "50"]
    whole = tmp_path / "one"
    main([*args, "--out", str(whole), "--workers", "1"])
    expected = digests(whole)
    assert len(expected) == 13  # 12 shards and the index

    def run_all(commands: list[list[str]], envs: list[dict[str, str]]) -> None:
        procs = [subprocess.Popen(c, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c, e in zip(commands, envs)]
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out

    writer = [sys.executable, "-m", "vitcore.data.shards", *args, "--workers", "1"]
    run_all([[*writer, "--out", str(tmp_path / "n2"), "--num-tasks", "2", "--task-index", str(i)] for i in range(2)],
            [ENV] * 2)
    assert digests(tmp_path / "n2") == expected

    slurm = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_CPUS_PER_TASK": "1",
             "SLURM_ARRAY_JOB_ID": "99", "PYTHON": sys.executable}
    run_all([["bash", str(ROOT / "launch" / "shards_slurm.sh"), *args, "--out", str(tmp_path / "n3")]] * 3,
            [{**ENV, **slurm, "SLURM_ARRAY_TASK_ID": str(i)} for i in range(3)])
    assert digests(tmp_path / "n3") == expected

    run_all([launch_command("-m", "vitcore.data.shards", *args, "--out", str(tmp_path / "launch"))],
            [{**CPU_ENV, "PYTHONPATH": str(ROOT)}])
    assert digests(tmp_path / "launch") == expected
    assert json.loads((tmp_path / "launch" / PROGRESS_DIR / PLAN_NAME).read_text())["num_tasks"] == 2


@pytest.mark.slow  # 15 s; make test keeps the real-data kill below, make test-all both
@pytest.mark.skipif(not hasattr(os, "mkfifo") or sys.platform != "linux", reason="needs Linux FIFOs")
def test_a_task_killed_midway_resumes_to_the_same_files(source: Path, tmp_path: Path) -> None:
    """Task 1 of 2 (shards 4 to 8 of 9) is SIGKILLed while it waits for image 27 (shard 5's; a FIFO
    nobody writes to) after task 0 finished; the folder stays unfinished; a rerun of task 1 finishes it."""
    write_shards(str(source), tmp_path / "whole", resize=24, samples_per_shard=5, workers=1, progress=False)
    relpaths = FolderSource(source).relpaths
    blocker = source / relpaths[shuffled_order(len(relpaths), 0, None)[27]]
    data = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vitcore.data.shards", "--source", str(source), "--out", str(out),
           "--resize", "24", "--samples-per-shard", "5", "--workers", "1", "--num-tasks", "2", "--task-index"]
    task0 = subprocess.run([*cmd, "0"], env=ENV, capture_output=True, text=True, timeout=120)
    assert task0.returncode == 0 and "task 0 of 2 wrote its shards" in task0.stdout, task0.stderr
    task1 = subprocess.Popen([*cmd, "1"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after(task1, out / PROGRESS_DIR / "shard-000004.json", settle=0.3)  # blocked on the FIFO by then
    assert not (out / "index.json").exists() and not (out / "shard-000005.tar").exists()
    assert "task(s) 1 of 2" in str(pytest.raises(FileNotFoundError, resolve_shards, str(out)).value)
    kept = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}

    blocker.unlink()
    blocker.write_bytes(data)
    rerun = subprocess.run([*cmd, "1"], env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr
    assert snapshot(out) == snapshot(tmp_path / "whole")
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # finished shards were kept, not rewritten


@pytest.fixture
def parquet(tmp_path: Path) -> tuple[Path, Path]:
    """36 labelled images stored as bytes (JPEG, PNG; row 7 is not an image) in a folder of 3 parquet
    files of 12 rows, and the same rows in one file."""
    import random

    import datasets
    from shard_helpers import encode, make_image

    rng = random.Random(0)
    images = []
    for i in range(36):
        image, ext = make_image(rng, i)
        images.append({"bytes": b"not an image" if i == 7 else encode(image, "PNG" if ext == "png" else "JPEG"),
                       "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    table = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(36)]}, features=features)
    (tmp_path / "parts").mkdir()
    for j in range(3):
        table.select(range(12 * j, 12 * j + 12)).to_parquet(tmp_path / "parts" / f"part-{j}.parquet", batch_size=5)
    table.to_parquet(tmp_path / "all.parquet", batch_size=5)
    return tmp_path / "parts", tmp_path / "all.parquet"


def test_a_streamed_parquet_source_writes_what_the_materialised_one_does(parquet: tuple[Path, Path], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from vitcore.data.parquet_stream import ParquetStreamSource

    parts, single = parquet
    common = {"samples_per_shard": 6, "shuffle_seed": None, "resize": 24, "workers": 1, "progress": False}
    materialised = write_shards(str(single), tmp_path / "materialised", **common)
    assert (materialised["total"], materialised["skipped"], len(materialised["shards"])) == (35, 1, 6)
    assert materialised["classes"] == ["a", "b", "c"]

    opened: list[tuple[int, int]] = []  # (task, first file of each stream it opens)
    task = 0
    real_open = ParquetStreamSource._open
    monkeypatch.setattr(ParquetStreamSource, "_open", lambda self, file: opened.append((task, file)) or
                        real_open(self, file))
    write_shards(str(parts), tmp_path / "streamed", streaming=True, **common)
    for task in range(3):  # 6 shards of 6 rows, 3 tasks: each task's block is one file's 12 rows
        write_shards(str(parts), tmp_path / "tasks", streaming=True, num_tasks=3, task_index=task, **common)
    assert opened == [(0, 0), (0, 0), (1, 1), (2, 2)]  # each task opened its own file only

    def output(folder: Path) -> dict[str, bytes]:
        return {k: v for k, v in snapshot(folder).items() if k != "index.json"}  # its `source` differs
    assert output(tmp_path / "streamed") == output(tmp_path / "materialised") == output(tmp_path / "tasks")
    assert len(output(tmp_path / "tasks")) == 7  # 6 shards and skipped.txt

    with pytest.raises(SystemExit) as exc:  # a stream is not shuffled: one line says what to do
        main(["--source", str(parts), "--out", str(tmp_path / "shuffled"), "--streaming"])
    assert "add --no-shuffle" in str(exc.value.code) and "\n" not in str(exc.value.code)
    with pytest.raises(SystemExit, match="no parquet files found in .*--streaming reads parquet data"):
        main(["--source", str(tmp_path / "materialised"), "--out", str(tmp_path / "x"), "--streaming", "--no-shuffle"])
    with pytest.raises(SystemExit, match="--streaming reads parquet data .*, not .*cifar"):
        main(["--source", "cifar10.tar", "--out", str(tmp_path / "x"), "--streaming", "--no-shuffle"])


# make test-all (15 s); make test keeps a killed writer resuming to the same files (test_shards_parallel)
@pytest.mark.slow
def test_a_task_killed_on_real_data_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """Task 1 of 2 on CIFAR-10 images is SIGKILLed as soon as its first shard is recorded (of six;
    wherever it is then), and run again: the folder comes out as one process writes it."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"needs {CIFAR_TAR}")
    args = ["--source", str(CIFAR_TAR), "--split", "train", "--limit", "3000", "--samples-per-shard", "250",
            "--workers", "1"]
    main([*args, "--out", str(tmp_path / "one")])
    out = tmp_path / "tasks"
    cmd = [sys.executable, "-m", "vitcore.data.shards", *args, "--out", str(out), "--num-tasks", "2", "--task-index"]
    main([*args, "--out", str(out), "--num-tasks", "2", "--task-index", "0"])
    task1 = subprocess.Popen([*cmd, "1"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Its record, not only the shard: a kill between the shard's rename and its record (a few ms)
    # leaves a shard the rerun cannot trust, so it writes that one again too (and says no "resuming").
    kill_after(task1, out / PROGRESS_DIR / "shard-000006.json")
    assert not (out / "index.json").exists()  # killed part-way: its last shards are missing
    rerun = subprocess.run([*cmd, "1"], env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr
    assert digests(out) == digests(tmp_path / "one")
