"""Preemption (SIGTERM/SIGUSR1: checkpoint at the next step, exit for a requeue) in one process; the
2-process endings (a signal on one rank, ranks whose views of the run directory disagree) are in
tests/test_endings.py."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.config import load_config
from vitcore.train.engine import Trainer
from vitcore.train.preemption import PREEMPTED_EXIT, Preempted

from launching import ROOT, signal_when_training


def overrides(shards, out, steps, *extra):
    return ["model.variant=Pico/8", "model.image_size=32", f"data.shards={shards}", "data.batch_size=8",
            "data.num_workers=1", f"run.steps={steps}", "run.log_every=1", "run.ckpt_every=100",
            "run.image_every=0", "optim.warmup_steps=2", f"run.out_dir={out}", *extra]


class SignalAt(MPPTask):
    """MPP whose process sends itself `signum` after optimizer step `at` (0-based), as a
    scheduler would at an arbitrary moment."""

    def __init__(self, cfg, at, signum):
        super().__init__(cfg)
        self.at, self.signum = at, signum

    def after_step(self, model, step):
        if step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_at_the_next_step_and_the_resumed_run_matches(cifar_shards, tmp_path, signum):
    cfg = load_config(PretrainConfig, None, overrides(cifar_shards, tmp_path / "whole", 6))
    Trainer(cfg, MPPTask(cfg)).fit()
    whole = load_file(tmp_path / "whole" / "checkpoints" / "latest" / "model.safetensors")

    cut = load_config(PretrainConfig, None, overrides(cifar_shards, tmp_path / "cut", 6))
    with pytest.raises(Preempted, match="step 3 of 6"):
        Trainer(cut, SignalAt(cut, at=2, signum=signum)).fit()
    assert checkpoint.load_meta(checkpoint.find_latest(tmp_path / "cut" / "checkpoints"))["step"] == 3
    assert not (tmp_path / "cut" / "summary.json").exists()  # the run is not finished
    assert signal.getsignal(signum) is signal.SIG_DFL  # handlers are put back
    Trainer(cut, MPPTask(cut)).fit()  # run.resume=auto
    resumed = load_file(tmp_path / "cut" / "checkpoints" / "latest" / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_run_py_exits_with_the_requeue_code_on_sigterm(cifar_shards, tmp_path):
    """The real entry point, signalled from outside while it trains."""
    out = tmp_path / "run"
    cmd = [sys.executable, "pretrain/run.py", *overrides(cifar_shards, out, 500)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        signal_when_training(proc, out / "metrics.jsonl", 2, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, stderr[-2000:]
    assert "preempted: SIGTERM: saved a checkpoint at step" in stderr
    step = checkpoint.load_meta(checkpoint.find_latest(out / "checkpoints"))["step"]
    assert 2 <= step < 500
