"""One run per directory, no orphaned workers, only finite checkpoints, finished runs left alone."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from test_pretrain import ROOT, overrides, run_script
from vitcore import checkpoint
from vitcore.train.engine import main

from launching import CPU_ENV, launch_command


def wait_for(condition, timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def test_a_live_run_directory_refuses_a_second_run_until_the_first_dies(cifar_shards, tmp_path):
    out = tmp_path / "run"
    first = run_script(overrides(cifar_shards, out, **{"run.steps": 100000, "run.log_every": 1,
                                                       "run.ckpt_every": 100000, "run.image_every": 0}),
                       stderr=subprocess.DEVNULL)
    try:
        started = lambda: nonempty(out / ".lock") or nonempty(out / "metrics.jsonl")  # noqa: E731
        wait_for(lambda: started() or first.poll() is not None, timeout=300)
        assert first.poll() is None, "the first run stopped early"
        with pytest.raises(SystemExit) as stop:
            main(PretrainConfig, MPPTask, overrides(cifar_shards, out))
        assert str(stop.value) == (f"error: run.out_dir: {out} is in use by another run (pid {first.pid} on host "
                                   f"{socket.gethostname()}); use another run.out_dir")
    finally:
        first.kill()  # SIGKILL: no cleanup; the kernel drops the lock
        first.wait()
    summary = main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 2}))
    assert summary["steps"] == 2


def survivors(marker: str) -> list[int]:
    """Processes (other than this one) whose command line names `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and marker in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_workers_exit_when_the_launcher_is_killed(cifar_shards, tmp_path):
    out = tmp_path / "run"
    cmd = launch_command(ROOT / "pretrain" / "run.py", *overrides(
        cifar_shards, out, **{"data.batch_size": 8, "data.num_workers": 1, "run.steps": 100000, "run.log_every": 1,
                              "run.ckpt_every": 100000, "run.image_every": 0}))
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=CPU_ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        # generous: the first step takes seconds, minutes on a machine busy with other work
        wait_for(lambda: nonempty(out / "metrics.jsonl") or launcher.poll() is not None, timeout=600)
        assert launcher.poll() is None, "the run stopped early"
        workers = [p for p in survivors(str(out)) if p != launcher.pid]
        assert len(workers) >= 2  # two trainers (and their data workers) outside the launcher's group
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 15  # data workers notice a dead trainer within 5 s
        while survivors(str(out)) and time.time() < deadline:
            time.sleep(0.1)
        assert survivors(str(out)) == [], "training processes outlived their launcher"
    finally:
        for pid in survivors(str(out)):
            os.kill(pid, signal.SIGKILL)


def test_nonfinite_weights_never_become_a_checkpoint(cifar_shards, tmp_path, monkeypatch):
    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.full((2,), float("inf"))}
    with pytest.raises(checkpoint.NonFiniteWeights, match="^b holds non-finite values$"):
        checkpoint.save_checkpoint(tmp_path / "ckpts", 1, weights, {}, {}, keep_last=2)
    assert not (tmp_path / "ckpts").exists()

    out = tmp_path / "run"
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 2}))

    def poison(self, model, step):  # after the optimizer step that reaches step 3
        if step == 2:
            with torch.no_grad():
                self.encoder(model).blocks[1].mlp.fc1.weight.fill_(float("nan"))

    monkeypatch.setattr(MPPTask, "after_step", poison)
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 6, "run.ckpt_every": 1}))
    latest = out / "checkpoints" / "step-00000002"
    assert str(stop.value) == ("error: step 3: the weights were not saved: encoder.blocks.1.mlp.fc1.weight holds "
                               f"non-finite values. The last checkpoint is intact: {latest}")
    assert checkpoint.find_latest(out / "checkpoints") == latest
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]


def test_rerunning_a_finished_run_keeps_its_summary(cifar_shards, tmp_path, capsys):
    out = tmp_path / "run"
    first = main(PretrainConfig, MPPTask, overrides(cifar_shards, out))
    written = (out / "summary.json").read_text()
    assert first["final"]  # the metrics of the last logging step
    for steps in (4, 2):  # the same run.steps, or fewer than the run reached
        capsys.readouterr()
        again = main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": steps}))
        assert (out / "summary.json").read_text() == written
        assert again == json.loads(written)
        assert capsys.readouterr().out == (f"run.out_dir: {out} is complete at step 4 (run.steps={steps}); its "
                                           "summary.json is kept. Raise run.steps to train on\n")
