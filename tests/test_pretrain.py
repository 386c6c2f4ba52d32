"""End-to-end pretraining through the real entry point, on real images, on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.config import load_config
from vitcore.train.engine import main
from vitcore.train.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]


def overrides(shards: Path, out: Path, **extra) -> list[str]:
    base = {"model.variant": "Pico/8", "model.image_size": 32, "data.shards": shards, "data.batch_size": 16,
            "data.num_workers": 0, "data.shuffle_buffer": 64, "optim.warmup_steps": 2, "run.out_dir": out,
            "run.steps": 4, "run.log_every": 2, "run.ckpt_every": 2, "run.image_every": 2}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_writes_the_whole_output_directory(cifar_shards, tmp_path):
    out = tmp_path / "run"
    summary = main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"optim.accum_steps": 2}))
    cfg = load_config(PretrainConfig, out / "config.yaml")
    assert cfg.run.steps == 4 and cfg.optim.accum_steps == 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["samples"] for r in rows] == [64, 128]  # batch 16 x 2 micro-batches x 2 steps
    for key in ("loss", "acc", "acc_mask", "acc_random", "acc_kept", "baseline_acc", "lr", "grad_norm",
                "img_s", "data_wait", "skipped_samples", "nonfinite_steps"):
        assert key in rows[-1], key
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    latest = checkpoint.find_latest(out / "checkpoints")
    meta = checkpoint.load_meta(latest)
    assert meta["step"] == 4 and meta["stage"] == "pretrain" and meta["encoder_prefix"] == "encoder."
    assert meta["arch"] == {"variant": "Pico/8", "dim": 64, "depth": 2, "heads": 2, "mlp_ratio": 4,
                            "patch_size": 8, "image_size": [32, 32], "grid": [4, 4]}
    assert meta["config"]["optim"]["accum_steps"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 4 == summary["steps"]
    assert summary["img_s"] > 0


def test_images_are_drawn_every_image_every_steps_and_at_the_end(cifar_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 5}))
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Images("mpp/predictions")] == [2, 4, 5]


def test_resume_auto_continues_instead_of_restarting(cifar_shards, tmp_path):
    out = tmp_path / "run"
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out))
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 8}))
    assert [r["step"] for r in metrics(out)] == [2, 4, 6, 8]
    assert checkpoint.load_train_state(out / "checkpoints" / "latest")["step"] == 8


def test_resume_survives_a_half_written_metrics_line_and_never_starts_behind(cifar_shards, tmp_path):
    out = tmp_path / "run"
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a crash in the middle of a write
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 6}))
    assert [r["step"] for r in metrics(out)] == [2, 4, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]  # step 4 kept across the resume

    # starting over, or from an older checkpoint, in this directory would overwrite its checkpoints
    for resume in ("never", str(out / "checkpoints" / "step-00000004")):
        with pytest.raises(SystemExit, match=r"run.out_dir: .* already holds checkpoints up to step-00000006"):
            main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 8, "run.resume": resume}))
    assert checkpoint.load_meta(out / "checkpoints" / "latest")["step"] == 6


def test_nonfinite_losses_are_skipped_then_stop_the_run(cifar_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 2}))
    before = load_file(out / "checkpoints" / "latest" / "model.safetensors")
    real_loss = MPPTask.loss

    def poisoned(self, model, batch):
        loss, m = real_loss(self, model, batch)
        return loss * float("nan"), m

    monkeypatch.setattr(MPPTask, "loss", poisoned)
    with pytest.raises(SystemExit, match="3 non-finite losses in a row by step 5"):
        main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{
            "run.steps": 20, "run.max_nonfinite": 3, "run.log_every": 1, "run.ckpt_every": 3}))
    # the skipped steps left the weights untouched: the checkpoint at step 3 equals step 2's
    after = load_file(out / "checkpoints" / "latest" / "model.safetensors")
    assert checkpoint.load_meta(out / "checkpoints" / "latest")["step"] == 3
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics(out)[-1]["nonfinite_steps"] == 3

    # resumed from step 3 (one skipped step behind it) with a healthy loss: the count carries on
    monkeypatch.setattr(MPPTask, "loss", real_loss)
    summary = main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{"run.steps": 6, "run.log_every": 1}))
    assert summary["nonfinite_steps"] == 1 and metrics(out)[-1]["nonfinite_steps"] == 1


def run_script(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "pretrain" / "run.py"), *args], cwd=ROOT, **popen)


# make test-all (10 s); make test keeps a SIGKILL leaving a loadable checkpoint (test_checkpoint)
# and exact resume (test_preemption)
@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(cifar_shards, tmp_path):
    steps = 60
    args = lambda out: overrides(cifar_shards, out, **{"run.steps": steps, "run.ckpt_every": 5, "run.log_every": 1,
                                                        "run.image_every": 0})
    killed = tmp_path / "killed"
    proc = run_script(args(killed), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed: nothing was tested"
    resumed_at = checkpoint.load_train_state(killed / "checkpoints" / "latest")["step"]
    assert 5 <= resumed_at < steps

    main(PretrainConfig, MPPTask, args(killed))
    rows = metrics(killed)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # each step logged once
    cfg = load_config(PretrainConfig, killed / "config.yaml")
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s - 1, cfg.optim, steps) for s in range(1, steps + 1)])

    straight = tmp_path / "straight"
    main(PretrainConfig, MPPTask, args(straight))
    a = load_file(killed / "checkpoints" / "latest" / "model.safetensors")
    b = load_file(straight / "checkpoints" / "latest" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resume did not continue the same data, RNG and optimizer"


def test_missing_shards_stop_before_any_work_with_one_line(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(PretrainConfig, MPPTask, overrides(tmp_path / "nowhere", out))
    message = str(stop.value)
    assert message.startswith("error: data.shards: shard not found:") and "\n" not in message
    assert "vitcore.data.shards" in message  # says how to make them
    assert not out.exists()  # nothing written


def test_the_config_decides_precision_and_says_so_when_the_launcher_differs(cifar_shards, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch --mixed_precision bf16`
    main(PretrainConfig, MPPTask, overrides(cifar_shards, tmp_path / "run", **{"run.steps": 2}))
    assert "launcher asked for bf16 precision; run.mixed_precision=no decides" in capsys.readouterr().out
    assert load_config(PretrainConfig, tmp_path / "run" / "config.yaml").run.mixed_precision == "no"


def test_pixel_targets_are_evaluated_by_their_validation_loss(cifar_shards, tmp_path):
    """mpp.target=pixels has no classes: its evaluation is the mean squared error on held-out
    images, and the lowest one picks checkpoints/best."""
    out = tmp_path / "pixels"
    summary = main(PretrainConfig, MPPTask, overrides(cifar_shards, out, **{
        "mpp.target": "pixels", "eval.shards": cifar_shards, "eval.num_workers": 0, "run.eval_every": 2}))
    assert set(summary["eval"]) == {"loss", "count", "skipped"} and summary["eval"]["loss"] > 0
    losses = {row["step"]: row["val/loss"] for row in metrics(out) if "val/loss" in row}
    assert sorted(losses) == [2, 4]
    assert summary["best"]["metric"] == "val/loss" and summary["best"]["loss"] == min(losses.values())
    assert summary["best"]["step"] == min(losses, key=losses.get)
