"""Preemption (SIGTERM/SIGUSR1: checkpoint at the next step on every rank, exit for a requeue) and
the resume decision taken by rank 0 alone, including with 2 CPU processes whose views disagree."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.config import load_config
from vitcore.train.engine import Trainer
from vitcore.train.preemption import PREEMPTED_EXIT, Preempted

from launching import CPU_ENV, ROOT, launch_command


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


PROBE = """
import json, os, signal, sys
from pathlib import Path
from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.config import load_config
from vitcore.train.engine import Trainer, TrainingError
from vitcore.train.preemption import Preempted

mode, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
if mode == "stale" and rank == 1:  # rank 1's view of the run directory lags: `latest` is an older step
    checkpoint.find_latest = lambda d: sorted(Path(d).glob("step-*"))[0]
if mode == "unseen" and rank == 1:  # rank 1 cannot see the checkpoints (a node-local disk)
    def load_meta(path):
        raise FileNotFoundError(f"no {path}")
    checkpoint.load_meta = load_meta
loaded, load_weights = [], checkpoint.load_weights
checkpoint.load_weights = lambda path: loaded.append(Path(path).name) or load_weights(path)


class Task(MPPTask):
    def after_step(self, model, step):
        if mode == "signal" and rank == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


cfg = load_config(PretrainConfig, None, sys.argv[3:])
status = {}
try:
    Trainer(cfg, Task(cfg)).fit()
    status["result"] = "done"
except (Preempted, TrainingError) as e:
    status["result"], status["message"] = type(e).__name__, str(e)
status["loaded"] = loaded
(out / f"rank{rank}.json").write_text(json.dumps(status))
"""


def launch_two(tmp_path, mode, args):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cmd = launch_command(probe, mode, str(tmp_path), *args)
    result = subprocess.run(cmd, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(cifar_shards, tmp_path):
    out = tmp_path / "run"
    ranks = launch_two(tmp_path, "signal", overrides(cifar_shards, out, 8))
    # rank 1 got SIGUSR1 after step 2; both agree one step later and save together
    assert [r["result"] for r in ranks] == ["Preempted", "Preempted"]
    assert all("step 3 of 8" in r["message"] for r in ranks)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000003"]
    state = torch.load(out / "checkpoints" / "latest" / "train_state.pt", weights_only=True)
    assert [d["rank"] for d in state["data"]] == [0, 1]


def test_rank0_decides_the_resume_point_when_another_rank_sees_a_stale_latest(cifar_shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, overrides(cifar_shards, out, 4, "run.ckpt_every=2"))
    Trainer(cfg, MPPTask(cfg)).fit()  # checkpoints at steps 2 and 4
    ranks = launch_two(tmp_path, "stale", overrides(cifar_shards, out, 6, "run.ckpt_every=2"))
    assert [r["result"] for r in ranks] == ["done", "done"]
    assert [r["loaded"] for r in ranks] == [["step-00000004"], ["step-00000004"]]


def test_a_rank_that_cannot_see_the_checkpoint_stops_every_rank_with_one_line(cifar_shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, overrides(cifar_shards, out, 2))
    Trainer(cfg, MPPTask(cfg)).fit()
    ranks = launch_two(tmp_path, "unseen", overrides(cifar_shards, out, 4))
    assert [r["result"] for r in ranks] == ["TrainingError", "TrainingError"]
    assert ranks[0]["message"] == ranks[1]["message"]
    assert "rank 1 sees step unreadable" in ranks[0]["message"] and "one shared filesystem" in ranks[0]["message"]
    assert ranks[0]["loaded"] == ranks[1]["loaded"] == []  # nothing was loaded, nothing trained


def test_run_py_exits_with_the_requeue_code_on_sigterm(cifar_shards, tmp_path):
    """The real entry point, signalled from outside while it trains."""
    out = tmp_path / "run"
    cmd = [sys.executable, "pretrain/run.py", *overrides(cifar_shards, out, 500)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300  # generous: start-up alone takes long on a loaded machine
    try:
        # wait for training to be under way (two logged steps): before that no handler is installed
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, stderr[-2000:]
    assert "preempted: SIGTERM: saved a checkpoint at step" in stderr
    step = checkpoint.load_meta(checkpoint.find_latest(out / "checkpoints"))["step"]
    assert 2 <= step < 500
