"""Faults a run meets on real filesystems, each with the same promise: nothing is lost, and the run
goes on or stops with one line and the right status. A full disk while a checkpoint is written, a
damaged newest checkpoint, a shard that vanishes or is cut short mid-epoch, a read-only run directory."""

import builtins
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

import pytest
import torch

from pretrain.config import PretrainConfig
from pretrain.task import CROP_SCALE, MPPTask
from test_pretrain import ROOT, metrics, overrides
from vitcore import checkpoint
from vitcore.data import ShardStream, train_transform
from vitcore.train.engine import main

SIZE = r"\d+(\.\d)? [kMGT]?B"  # a byte count as the messages write it: "0 B", "12.3 MB"


@cache
def user_namespaces() -> bool:
    """Whether this machine lets an unprivileged process mount in a namespace of its own (a real
    full disk or read-only filesystem, without touching the machine's mounts)."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "none", "/mnt"], capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif("not user_namespaces()", reason="needs `unshare -rm` (user namespaces)")


# -- the disk fills while a checkpoint is written ----------------------------------------------------------------


def test_a_full_disk_mid_checkpoint_stops_the_run_with_the_previous_checkpoint_intact(cifar_shards, tmp_path,
                                                                                     monkeypatch):
    out, save = tmp_path / "run", torch.save

    def disk_fills(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:  # step 4's training state, after its weights landed
            Path(path).write_bytes(bytes(4096))  # a part of it landed too
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills)
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 6, "run.image_every": 0}))
    ckpts = out / "checkpoints"
    previous = ckpts / "step-00000002"
    # the background write's error reaches the training thread at the next save (step 6), on every rank
    assert stop.value.code == 1  # a TrainingError: vitcore.train.ending
    assert re.fullmatch(rf"error: cannot write checkpoint step-00000004 in {re.escape(str(ckpts))}: No space left on "
                        rf"device \(it needs {SIZE}, {SIZE} free there\)\. The last checkpoint is intact: "
                        rf"{re.escape(str(previous))}", str(stop.value)), str(stop.value)
    assert checkpoint.find_latest(ckpts) == previous
    assert checkpoint.load_meta(previous)["step"] == 2 and checkpoint.load_weights(previous)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]  # no .tmp-*, no step 4 or 6


FILL_A_TMPFS = """
import sys, torch
from pathlib import Path
from vitcore import checkpoint
ckpts = Path(sys.argv[1])
checkpoint.save_checkpoint(ckpts, 1, {"w": torch.ones(16)}, {"step": 1}, {}, keep_last=2)
big = torch.ones(1 << 20)  # 4 MB on a 1 MB filesystem
for step, weights, state in [(2, {"w": big}, {"step": 2}), (3, {"w": torch.ones(16)}, {"step": 3, "m": big})]:
    try:
        checkpoint.save_checkpoint(ckpts, step, weights, state, {}, keep_last=2)
    except checkpoint.CheckpointNotWritten as e:
        print(e)
print(sorted(p.name for p in ckpts.iterdir()), checkpoint.load_meta(ckpts / "latest")["step"])
"""


@needs_namespaces
def test_a_genuinely_full_disk_is_one_line_for_either_file(tmp_path):
    """On a real full filesystem the writers do not raise OSError: safetensors raises SafetensorError,
    torch.save a RuntimeError. Both are a CheckpointNotWritten, with no temporary directory left."""
    mount = tmp_path / "small"
    mount.mkdir()
    script = 'mount -t tmpfs -o size=1m none "$0" && exec "$@"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mount), sys.executable, "-c", FILL_A_TMPFS,
                           str(mount / "checkpoints")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    for step, line in zip((2, 3), lines):
        assert re.fullmatch(rf"cannot write checkpoint step-0000000{step} in {mount}/checkpoints: .+ \(it needs "
                            rf"4.2 MB, {SIZE} free there\)", line), line
    assert "No space left on device" in lines[0]  # safetensors says it; torch.save's "unexpected pos" does not
    assert lines[2] == "['latest', 'step-00000001'] 1"


# -- the newest checkpoint is damaged --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(cifar_shards, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (`latest`)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.image_every": 0}))
    return out


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(run, out, symlinks=True)  # `latest` stays a link
    return out, out / "checkpoints"


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # how step 4 is damaged, and the reason the run gives
    "weights cut short": (lambda ckpt: cut_short(ckpt / "model.safetensors"),
                          r"model.safetensors is cut short or corrupt \(\d+ bytes: .+\)"),
    "meta.json missing": (lambda ckpt: (ckpt / "meta.json").unlink(), r"meta.json missing"),
    "training state cut short": (lambda ckpt: cut_short(ckpt / "train_state.pt"),
                                 r"train_state.pt is cut short or corrupt \(\d+ bytes: File is not a zip file\)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        cifar_shards, two_checkpoints, tmp_path, capsys, damage):
    out, ckpts = copy_run(two_checkpoints, tmp_path)
    harm, why = DAMAGE[damage]
    harm(ckpts / "step-00000004")
    capsys.readouterr()
    summary = main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 6, "run.image_every": 0}))
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:"))
    where = re.escape(str(ckpts))
    assert re.fullmatch(rf"warning: checkpoint {where}/step-00000004 is damaged: {why}; set aside as "
                        rf"damaged-step-00000004, resuming from {where}/step-00000002", warning), warning
    assert summary["steps"] == 6 and [row["step"] for row in metrics(out)] == [2, 4, 6]
    assert checkpoint.find_latest(ckpts) == ckpts / "step-00000006"
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step-00000004", "latest", "step-00000004",
                                                       "step-00000006"]  # the damaged one kept for a look


def test_a_damaged_checkpoint_with_none_intact_before_it_is_refused_in_one_line(cifar_shards, two_checkpoints,
                                                                               tmp_path):
    out, ckpts = copy_run(two_checkpoints, tmp_path)
    for step in (2, 4):
        cut_short(ckpts / f"step-0000000{step}" / "model.safetensors")
    newest, why = ckpts / "step-00000004", DAMAGE["weights cut short"][1]
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 6}))
    assert re.fullmatch(rf"error: cannot resume: {re.escape(str(newest))} is damaged: {why}, and no intact checkpoint "
                        r"precedes it\. Move it away to start over, or use a new run\.out_dir",
                        str(stop.value)), str(stop.value)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000004"]  # nothing moved

    # a damaged checkpoint named by run.resume is refused too: the user chose it
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(cifar_shards, tmp_path / "branch",
                                                **{"run.steps": 6, "run.resume": newest}))
    assert re.fullmatch(rf"error: run.resume: {re.escape(str(newest))} is damaged: {why}", str(stop.value)), stop.value


def test_a_checkpoint_corrupt_inside_stops_the_resume_in_one_line(cifar_shards, two_checkpoints, tmp_path):
    """Damage the cheap checks at the start cannot see (they read no tensor, no pickle) surfaces
    while loading, as one line naming the checkpoint and the way on, never a traceback."""
    out, ckpts = copy_run(two_checkpoints, tmp_path)
    state = ckpts / "step-00000004" / "train_state.pt"
    with zipfile.ZipFile(state) as archive:  # the pickle overwritten in place: the zip stays whole
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    raw = state.read_bytes()
    state.write_bytes(raw.replace(pickled, b"\xff" * len(pickled)))
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 6}))
    newest = ckpts / "step-00000004"
    assert str(stop.value) == (f"error: cannot resume from {newest}: its train_state.pt does not load "
                               "(UnpicklingError: Weights only load failed). Set it aside (rename it "
                               "damaged-step-00000004) to resume from the checkpoint before it")


# -- a shard vanishes or is cut short mid-epoch ----------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_shard_that_vanishes_or_is_cut_short_mid_epoch_is_skipped_and_counted(cifar_shards, tmp_path, caplog,
                                                                                 num_workers):
    shards = tmp_path / "shards"
    shutil.copytree(cifar_shards, shards)
    stream = ShardStream(str(shards), train_transform(32, CROP_SCALE), 16, num_workers=num_workers, shuffle_buffer=16)
    batches = iter(stream)
    first = [next(batches) for _ in range(2)]
    files = sorted(shards.glob("*.tar"))
    files[0].unlink()  # a network filesystem's hiccup
    cut_short(files[1])
    with caplog.at_level(logging.WARNING, logger="vitcore.data.pipeline"):
        rest = list(batches)
    assert len(first + rest) == len(stream) == 16  # the epoch keeps its length: the rank never runs short
    assert all(batch["image"].shape == (16, 3, 32, 32) for batch in rest)
    assert stream.skipped > 0 and stream.epoch == 1
    if num_workers == 0:  # a worker's log lines go to its own process
        assert any(str(files[0]) in message for message in caplog.messages)


def test_a_training_run_reads_past_a_shard_that_vanishes_and_counts_it(cifar_shards, tmp_path, monkeypatch):
    shards, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(cifar_shards, shards)
    files = sorted(shards.glob("*.tar"))

    def hiccup(self, model, step):  # after the first optimizer step, mid-epoch
        if step == 0:
            files[0].unlink()
            cut_short(files[1])

    monkeypatch.setattr(MPPTask, "after_step", hiccup)
    # 20 steps of 16 cross into the second epoch (16 batches), which reads every shard again: the
    # first may have been read whole before the hiccup (each stream reads its share of an epoch once)
    summary = main(PretrainConfig, MPPTask, overrides(shards, out, **{"run.steps": 20, "run.log_every": 4,
                                                                      "run.image_every": 0}))
    assert summary["steps"] == 20 and summary["skipped_samples"] > 0
    assert metrics(out)[-1]["skipped_samples"] == summary["skipped_samples"]


def test_a_training_run_whose_shards_all_vanish_stops_with_one_line_naming_them(cifar_shards, tmp_path, monkeypatch):
    shards, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(cifar_shards, shards)

    def mount_gone(self, model, step):
        if step == 0:
            for shard in shards.glob("*.tar"):
                shard.unlink()

    monkeypatch.setattr(MPPTask, "after_step", mount_gone)
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(shards, out, **{"run.steps": 40, "run.image_every": 0}))
    assert re.fullmatch(rf"error: data.shards: .*gave no sample.*{re.escape(str(shards))}.*", str(stop.value))


# -- the run directory is read-only ----------------------------------------------------------------------------


def test_a_read_only_run_directory_is_refused_before_any_step(cifar_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    real_open = builtins.open

    def read_only(file, *args, **kwargs):  # what a read-only filesystem does to the run directory (root or not)
        if isinstance(file, str | os.PathLike) and Path(file).parent == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(cifar_shards, out))
    assert str(stop.value) == f"error: run.out_dir: {out} is not writable (Read-only file system)"
    assert list(out.iterdir()) == []


@needs_namespaces
def test_a_genuinely_read_only_filesystem_is_refused_with_one_line_and_status_1(cifar_shards, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    out = mount / "run"  # not there yet: creating it is the first write refused
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mount), sys.executable,
                           str(ROOT / "pretrain" / "run.py"), *overrides(cifar_shards, out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: run.out_dir: {out} is not writable (Read-only file system)"
    assert "Traceback" not in done.stderr and not out.exists()
