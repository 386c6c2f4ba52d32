"""Checkpoints are written in a background thread from a host copy: training goes on meanwhile, a
failed write surfaces, and the snapshot is the state at the save."""

import threading

import pytest
import torch

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.config import load_config
from vitcore.train.engine import Trainer


def test_host_copy_is_a_snapshot():
    live = {"w": torch.ones(3), "state": {"step": torch.tensor(2.0), "history": [torch.zeros(2)], "lr": 0.1}}
    snap = checkpoint.host_copy(live)
    live["w"].add_(1)
    live["state"]["step"].add_(1)
    live["state"]["history"][0].add_(1)
    assert torch.equal(snap["w"], torch.ones(3)) and snap["state"]["step"].item() == 2.0
    assert torch.equal(snap["state"]["history"][0], torch.zeros(2)) and snap["state"]["lr"] == 0.1


def test_a_failed_background_write_is_raised_by_the_next_wait():
    saver = checkpoint.BackgroundSaver()
    saver.submit("/dev/null/not-a-dir", 1, {"w": torch.ones(1)}, {}, {}, keep_last=1)
    with pytest.raises(OSError):
        saver.wait()
    saver.wait()  # the error is raised once


def test_training_goes_on_while_a_checkpoint_is_written(cifar_shards, tmp_path, monkeypatch):
    """The write of step 2's checkpoint cannot finish before training has done step 4: a save that
    held the training loop would wait forever (here: fail after 60 s)."""
    released = threading.Event()
    write = checkpoint.save_checkpoint

    def slow_write(ckpt_dir, step, *args, **kwargs):
        if step == 2 and not released.wait(timeout=60):
            raise AssertionError("training waited for the checkpoint write")
        return write(ckpt_dir, step, *args, **kwargs)

    class ReleaseAtStep4(MPPTask):
        def after_step(self, model, step):
            if step == 3:  # 0-based: the fourth optimizer step
                released.set()

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_write)
    cfg = load_config(PretrainConfig, None, [
        "model.variant=Pico/8", "model.image_size=32", f"data.shards={cifar_shards}", "data.batch_size=8",
        "data.num_workers=0", "run.steps=6", "run.ckpt_every=2", "run.image_every=0", "run.keep_last=5",
        f"run.out_dir={tmp_path / 'run'}"])
    summary = Trainer(cfg, ReleaseAtStep4(cfg)).fit()
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == ["step-00000002", "step-00000004", "step-00000006"]
    assert summary["checkpoint"].endswith("step-00000006")  # the summary names a complete checkpoint
    assert checkpoint.load_train_state(tmp_path / "run" / "checkpoints" / "step-00000002")["step"] == 2
