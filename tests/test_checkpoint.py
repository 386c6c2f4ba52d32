import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vitcore import checkpoint


def save(ckpt_dir, step, keep_last=2):
    weights = {"w": torch.full((4, 4), float(step)), "b": torch.arange(3.0)}
    state = {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999)}]}}
    return checkpoint.save_checkpoint(ckpt_dir, step, weights, state, {"stage": "test"}, keep_last)


def test_round_trip_without_unpickling_code(tmp_path):
    path = save(tmp_path, 7)
    assert checkpoint.resolve(tmp_path / "latest") == path.resolve()
    assert torch.equal(checkpoint.load_weights(tmp_path / "latest")["w"], torch.full((4, 4), 7.0))
    state = checkpoint.load_train_state(path)  # weights_only=True inside
    assert state["step"] == 7 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert checkpoint.load_meta(path) == {"stage": "test", "step": 7}
    # a run directory and a checkpoints directory resolve to the latest checkpoint too
    assert checkpoint.resolve(tmp_path) == path.resolve()


class Payload:
    """Unpickling this calls a function of the file's choosing: what a tampered checkpoint does."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickled_object_in_the_state_is_refused(tmp_path):
    path = save(tmp_path, 1)
    torch.save({"step": 1, "evil": Payload()}, path / checkpoint.STATE)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load_train_state(path)


def test_keeps_the_last_k_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert checkpoint.load_meta(tmp_path / "latest")["step"] == 4


def test_an_orphan_is_replaced_but_latest_never_is(tmp_path):
    save(tmp_path, 1)
    # a save that crashed after its rename, before the `latest` swap, left step 2 behind
    orphan = save(tmp_path / "other", 2)
    os.rename(orphan, tmp_path / orphan.name)
    (tmp_path / ".tmp-latest-99999").symlink_to("step-00000002")  # and its never-swapped link
    assert checkpoint.load_meta(tmp_path / "latest")["step"] == 1
    save(tmp_path, 2)  # the resumed run saves step 2 again
    assert checkpoint.load_meta(tmp_path / "latest")["step"] == 2
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(FileExistsError, match="is the latest checkpoint"):
        save(tmp_path, 2)
    assert checkpoint.load_meta(tmp_path / "latest")["step"] == 2 and not list(tmp_path.glob(".tmp-*"))


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    assert checkpoint.find_latest(tmp_path) == (tmp_path / "step-00000001").resolve()
    assert list(tmp_path.glob(".tmp-*")), "the half-written checkpoint stays in its temporary dir"
    monkeypatch.undo()
    save(tmp_path, 3)
    assert checkpoint.load_meta(checkpoint.find_latest(tmp_path))["step"] == 3


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at"):
        checkpoint.resolve(tmp_path / "nope")
    assert checkpoint.find_latest(tmp_path) is None


WRITER = """
import sys, torch
from vitcore import checkpoint
latest = checkpoint.find_latest(sys.argv[1])  # go on from the last trial's checkpoint, as a resumed run does
step = first = checkpoint.load_meta(latest)["step"] if latest else 0
while True:
    step += 1
    w = {"w": torch.full((512, 512), float(step))}  # 1 MiB: a save takes long enough to be hit
    checkpoint.save_checkpoint(sys.argv[1], step, w, {"step": step}, {"step": step}, keep_last=2)
    if step == first + 1:
        print("saving", flush=True)
"""


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "saving\n"
        time.sleep(0.05 + 0.13 * trial)  # a varying number of saves, killed wherever one is
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = checkpoint.find_latest(tmp_path)
        assert latest is not None
        step = checkpoint.load_meta(latest)["step"]
        assert torch.equal(checkpoint.load_weights(latest)["w"], torch.full((512, 512), float(step)))
        assert checkpoint.load_train_state(latest)["step"] == step
