"""Every way a 2-process run ends (`vitcore.train.ending`): each process exits with the ending's
status and its one line, never by a signal. The ranks run the stage's real entry point
(`engine.main`) under `accelerate launch`; a recorder around each reads how it really ended,
the teardown after its last line included (left to interpreter finalization, gloo's threads
aborted about one run in four)."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import torch

from pretrain.config import PretrainConfig
from pretrain.task import CROP_SCALE, MPPTask
from vitcore import checkpoint
from vitcore.config import load_config
from vitcore.data import ShardStream, train_transform
from vitcore.train.engine import Trainer
from vitcore.train.ending import CONFIG_ERROR, FAILED, INTERRUPTED, Ending, RunExit
from vitcore.train.preemption import PREEMPTED_EXIT

from launching import CPU_ENV, ROOT, recorded_endings, recorded_launch_command, signal_when_training

PROBE = """
import json, os, signal, sys
from pathlib import Path
from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.train.ending import run_process
from vitcore.train.engine import main

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


def run():
    try:
        main(PretrainConfig, Task, sys.argv[3:])
    finally:
        (out / f"loaded{rank}.json").write_text(json.dumps(loaded))


run_process(run)  # as pretrain/run.py leaves
"""


def overrides(shards, out, steps, *extra):
    return ["model.variant=Pico/8", "model.image_size=32", f"data.shards={shards}", "data.batch_size=8",
            "data.num_workers=1", f"run.steps={steps}", "run.log_every=1", "run.ckpt_every=100",
            "run.image_every=0", "optim.warmup_steps=2", f"run.out_dir={out}", *extra]


def run_two(tmp_path, mode, args, interrupt_after_steps=None):
    """Both ranks' endings ({"status", "stderr", "lines"}) and what each loaded. With
    `interrupt_after_steps`, the launcher gets SIGINT (Ctrl-C) once that many steps are logged."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    for old in tmp_path.glob("*.json"):
        old.unlink()
    cmd = recorded_launch_command(tmp_path, probe, mode, str(tmp_path), *args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if interrupt_after_steps is not None:
            signal_when_training(proc, tmp_path / "run" / "metrics.jsonl", interrupt_after_steps, signal.SIGINT)
        _, launcher = proc.communicate(timeout=240)
    finally:
        proc.kill()
    endings = recorded_endings(tmp_path)
    for e in endings:  # the launcher's and the libraries' chatter aside, a rank's own lines
        e["lines"] = [line for line in e["stderr"].splitlines() if line and not line.startswith(("[W", "W1", "["))]
    loaded = [json.loads((tmp_path / f"loaded{r}.json").read_text()) for r in (0, 1)]
    assert all(e["status"] >= 0 for e in endings), f"a rank died by a signal: {endings}\n{launcher[-2000:]}"
    return endings, loaded


def pretrained_run(out, cifar_shards, steps, *extra):
    cfg = load_config(PretrainConfig, None, overrides(cifar_shards, out, steps, *extra))
    Trainer(cfg, MPPTask(cfg)).fit()  # one process: no process group to end


def check_one_line(endings, status, start):
    for e in endings:
        assert e["status"] == status, e["stderr"][-2000:]
        assert [line for line in e["lines"] if line.startswith(start)] == e["lines"][-1:], e["stderr"][-2000:]
        assert "Traceback" not in e["stderr"]


def finished(tmp_path, cifar_shards):
    """Both ranks resume from rank 0's choice (rank 1 sees a stale `latest`) and finish: status 0."""
    out = tmp_path / "run"
    pretrained_run(out, cifar_shards, 4, "run.ckpt_every=2")  # checkpoints at steps 2 and 4
    endings, loaded = run_two(tmp_path, "stale", overrides(cifar_shards, out, 6, "run.ckpt_every=2"))
    assert [e["status"] for e in endings] == [0, 0], endings
    assert loaded == [["step-00000004"], ["step-00000004"]]
    assert checkpoint.load_meta(checkpoint.find_latest(out / "checkpoints"))["step"] == 6


def training_error(tmp_path, cifar_shards):
    """Rank 1 cannot see the checkpoint rank 0 resumes from: every rank stops, status 1, one line."""
    out = tmp_path / "run"
    pretrained_run(out, cifar_shards, 2)
    endings, loaded = run_two(tmp_path, "unseen", overrides(cifar_shards, out, 4))
    check_one_line(endings, FAILED, "error: ")
    assert endings[0]["lines"] == endings[1]["lines"]
    assert "rank 1 sees step unreadable" in endings[0]["lines"][-1] and "one shared filesystem" in endings[0]["lines"][-1]
    assert loaded == [[], []]  # nothing was loaded, nothing trained


def config_error(tmp_path, cifar_shards):
    """A config error found after the process group is up (a best metric the run cannot produce): status 2."""
    endings, _ = run_two(tmp_path, "plain", overrides(cifar_shards, tmp_path / "run", 4, "run.best_metric=probe/knn"))
    check_one_line(endings, CONFIG_ERROR, "config error: ")
    assert "run.best_metric: probe/knn needs the monitor" in endings[0]["lines"][-1]


def preempted(tmp_path, cifar_shards):
    """SIGUSR1 on rank 1 after step 2: both ranks save at step 3 and exit for a requeue."""
    out = tmp_path / "run"
    endings, _ = run_two(tmp_path, "signal", overrides(cifar_shards, out, 8))
    check_one_line(endings, PREEMPTED_EXIT, "preempted: ")
    assert all("saved a checkpoint at step 3 of 8" in e["lines"][-1] for e in endings)
    assert "SIGUSR1" in endings[1]["lines"][-1]  # the rank that got it names it
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000003"]
    state = torch.load(out / "checkpoints" / "latest" / "train_state.pt", weights_only=True)
    assert [d["rank"] for d in state["data"]] == [0, 1]


def interrupted(tmp_path, cifar_shards):
    """Ctrl-C to the launcher while both ranks train (it passes SIGINT on to each): status 130 and
    the line, wherever in the step each rank was; the checkpoints left are complete."""
    out = tmp_path / "run"
    endings, _ = run_two(tmp_path, "plain", overrides(cifar_shards, out, 2000, "run.ckpt_every=3"),
                         interrupt_after_steps=4)
    check_one_line(endings, INTERRUPTED, "interrupted: ")
    assert all("Ctrl-C (SIGINT)" in e["lines"][-1] for e in endings)
    latest = checkpoint.find_latest(out / "checkpoints")
    assert latest is not None and checkpoint.load_meta(latest)["step"] >= 3
    assert checkpoint.load_weights(latest)  # complete and loadable
    assert not list((out / "checkpoints").glob(".tmp-*"))


ENDINGS = [finished, training_error, config_error, preempted, interrupted]
QUICK = ENDINGS


@pytest.mark.parametrize("ending", QUICK, ids=lambda f: f.__name__)
def test_every_ending_of_a_two_process_run(ending, tmp_path, cifar_shards):
    ending(tmp_path, cifar_shards)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ENDINGS, ids=lambda f: f.__name__)
def test_every_ending_twenty_times(ending, tmp_path, cifar_shards):
    """Teardown races show up one run in a few: 20 in a row, none may fail."""
    for attempt in range(int(os.environ.get("ENDING_REPEATS", 20))):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        ending(run_dir, cifar_shards)


def interrupt_while_receiving(cifar_shards, per_image_s, ctrl_c_at_s):
    """Ctrl-C (SIGINT to this process, at each of `ctrl_c_at_s` seconds) while the first batch of a
    1-worker stream is still being made, `per_image_s` an image: how long the stream took to give
    way, and the process's whole stderr (the worker's included)."""
    make = train_transform(16, CROP_SCALE)
    stream = ShardStream(str(cifar_shards), lambda image: time.sleep(per_image_s) or make(image), 4, num_workers=1)
    timers = [threading.Timer(at, os.kill, (os.getpid(), signal.SIGINT)) for at in ctrl_c_at_s]
    with pytest.raises(RunExit) as ended:
        with Ending() as end:
            end.closing(stream)
            batches = iter(stream)
            start = time.monotonic()
            for timer in timers:
                timer.start()
            try:
                next(batches)
            finally:
                for timer in timers:  # none may fire after the Ending (into pytest's own handler)
                    timer.cancel()
    elapsed = time.monotonic() - start
    assert ended.value.code == INTERRUPTED and ended.value.line == "interrupted: Ctrl-C (SIGINT)"
    return elapsed


def test_a_ctrl_c_waits_for_the_batch_in_transfer(cifar_shards, capfd):
    """Raised inside a batch's fd transfer, a KeyboardInterrupt cut the worker's resource_sharer
    connection, and the worker printed a traceback after the run's line (1 Ctrl-C in 9 of a 2-process
    run): it is raised once the batch (4 images x 0.25 s) is across, and nothing follows the line."""
    elapsed = interrupt_while_receiving(cifar_shards, 0.25, [0.3])
    assert elapsed >= 1.0
    assert capfd.readouterr().err.strip().splitlines()[-1:] == ["interrupted: Ctrl-C (SIGINT)"]


def test_a_second_ctrl_c_does_not_wait(cifar_shards):
    """A stuck worker cannot make Ctrl-C useless: the second one acts at once (a batch takes 8 s)."""
    assert interrupt_while_receiving(cifar_shards, 2.0, [0.3, 0.6]) < 4.0
