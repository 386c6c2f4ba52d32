"""Fine-tuning end to end through the real entry points, on real images (CIFAR-10 from the shared
data, synthetic stand-ins where it is absent), on CPU; and the evaluation loop's exact counts."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import _synthetic_folder
from finetune.config import FinetuneConfig
from finetune.evaluate import main as evaluate_main
from finetune.task import ClassifyTask
from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.config import ConfigError, load_config
from vitcore.data import ShardStream
from vitcore.data.tar import iter_tar_samples
from vitcore.data.transforms import eval_transform
from vitcore.train.engine import main
from vitcore.eval.loop import evaluate
from vitcore.eval.metrics import classification_metrics, classification_sums
from vitcore.rundir import read_predictions

ROOT = Path(__file__).resolve().parents[1]


def overrides(train: Path, val: Path, out: Path, **extra) -> list[str]:
    base = {"model.variant": "Pico/8", "model.image_size": 48, "data.shards": train, "data.batch_size": 16,
            "data.num_workers": 0, "data.shuffle_buffer": 64, "eval.shards": val, "eval.batch_size": 32,
            "eval.num_workers": 2, "optim.warmup_steps": 1, "run.out_dir": out, "run.steps": 4, "run.log_every": 2,
            "run.eval_every": 2, "run.ckpt_every": 4, "run.image_every": 2}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_fine_tunes_a_pretrained_encoder_at_a_higher_resolution(cifar_shards, val_shards, pretrained, tmp_path):
    out = tmp_path / "ft"
    summary = main(FinetuneConfig, ClassifyTask, overrides(cifar_shards, val_shards, out, init_from=pretrained,
                                                           **{"finetune.ema_decay": 0.9}))
    assert summary["stage"] == "finetune" and summary["steps"] == 4
    ev = summary["eval"]
    assert ev["count"] == 100 and ev["skipped"] == 0 and 0 <= ev["top1"] <= ev["top5"] <= 1
    assert set(summary["eval_ema"]) == {"top1", "top5", "loss"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/top1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["val/count"] == 100 for r in evals)
    assert {"val/ema_top1", "val/ema_top5"} <= evals[-1].keys()
    # the best checkpoint by top-1 is kept beside latest, and the summary names it
    best = checkpoint.find_best(out / "checkpoints")
    assert best is not None and summary["best"]["checkpoint"] == str(best)
    assert summary["best"]["top1"] == max(r["val/top1"] for r in evals)
    meta = checkpoint.load_meta(out / "checkpoints" / "latest")
    assert meta["stage"] == "finetune" and meta["arch"]["grid"] == [6, 6] and meta["num_classes"] == 10
    assert meta["init_from"] == str(pretrained) and meta["pooling"] == "cls" and meta["ema"] is True
    assert len(meta["classes"]) == 10

    # `python -m finetune.evaluate` gives the run's own final numbers at its resolution...
    latest = out / "checkpoints" / "latest"
    again = evaluate_main(["--checkpoint", str(latest), "--data", str(val_shards), "--num-workers", "0"])
    assert again == {"top1": ev["top1"], "top5": ev["top5"], "count": 100}
    # ...and runs at any other resolution divisible by the patch size, non-square too
    other = evaluate_main(["--checkpoint", str(latest), "--data", str(val_shards), "--image-size", "32", "64",
                           "--ema", "--num-workers", "0"])
    assert other["count"] == 100
    with pytest.raises(SystemExit, match="--image-size: image size 50x50 is not divisible by the patch size 8"):
        evaluate_main(["--checkpoint", str(latest), "--data", str(val_shards), "--image-size", "50"])


def test_evaluate_prints_json_on_its_last_line(cifar_shards, val_shards, tmp_path):
    out = tmp_path / "ft"
    main(FinetuneConfig, ClassifyTask, overrides(cifar_shards, val_shards, out, init_from="null"))
    cmd = [sys.executable, "-m", "finetune.evaluate", "--checkpoint", str(out), "--data", str(val_shards)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    ev = json.loads((out / "summary.json").read_text())["eval"]
    assert last == {"top1": ev["top1"], "top5": ev["top5"], "count": 100}


def test_linear_probe_changes_no_encoder_weight(cifar_shards, val_shards, pretrained, tmp_path):
    out = tmp_path / "probe"
    summary = main(FinetuneConfig, ClassifyTask, overrides(cifar_shards, val_shards, out, init_from=pretrained,
                                                           **{"finetune.mode": "linear_probe",
                                                              "model.image_size": 32}))
    assert summary["eval"]["count"] == 100
    before = {k[len("encoder."):]: v for k, v in checkpoint.load_weights(pretrained).items()
              if k.startswith("encoder.")}
    after = {k[len("vit."):]: v for k, v in load_file(out / "checkpoints" / "latest" / "model.safetensors").items()
             if k.startswith("vit.")}
    assert before.keys() == {k for k in after if not k.startswith("head.")}
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen encoder moved"
    assert after["head.weight"].abs().sum() > 0  # the head did train


def test_a_wrong_variant_checkpoint_is_one_line(cifar_shards, val_shards, pretrained, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(FinetuneConfig, ClassifyTask, overrides(cifar_shards, val_shards, tmp_path / "x", init_from=pretrained,
                                                     **{"model.variant": "Nano/8"}))
    assert str(e.value) == ("config error: init_from: the checkpoint is Pico/8 (dim 64, depth 2, heads 2, patch 8) "
                            "but the model is Nano/8 (dim 128, depth 6, heads 4, patch 8)")


def test_a_missing_init_checkpoint_names_the_command_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    with pytest.raises(ConfigError, match=r"init_from: .* run `make demo` .* first, or set init_from=null"):
        load_config(FinetuneConfig)


def test_validation_classes_must_match_training(cifar_shards, tmp_path):
    from vitcore.data.shards import write_shards

    folder = _synthetic_folder(tmp_path / "five", 20)
    for extra in sorted(folder.iterdir())[5:]:
        shutil.rmtree(extra)
    write_shards(str(folder), tmp_path / "val5", progress=False)
    with pytest.raises(SystemExit, match=r"^error: eval.shards: .*has 5 classes, .* has 10"):
        main(FinetuneConfig, ClassifyTask, overrides(cifar_shards, tmp_path / "val5", tmp_path / "x", init_from="null"))


def _keys_and_labels(shards: Path) -> dict[str, int]:
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with open(tar, "rb") as f:
            for sample in iter_tar_samples(f):
                out[sample["__key__"]] = int(sample["cls"])
    return out


def _rank(key: str) -> int:
    """A made-up rank (0-6) of the true class among the logits of sample `key`."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 7


@pytest.mark.parametrize("num_workers", [0, 2])
def test_evaluation_is_exact_on_a_known_answer(val_shards, num_workers):
    """Logits built so that the true class sits at a known rank: top-1/top-5 are known exactly."""
    truth = _keys_and_labels(val_shards)

    def predict(batch):
        logits = torch.zeros(len(batch["key"]), 10)
        for i, (key, label) in enumerate(zip(batch["key"], batch["label"].tolist())):
            others = [c for c in range(10) if c != label]
            order = others[:_rank(key)] + [label] + others[_rank(key):]  # best first
            logits[i, order] = torch.arange(10, 0, -1, dtype=torch.float)
        return logits, batch["label"]

    stream = ShardStream.exactly_once(str(val_shards), eval_transform(8), 16, num_workers=num_workers)
    result = evaluate(Accelerator(cpu=True), lambda batch: classification_sums(*predict(batch), num_classes=10), stream)
    metrics = classification_metrics(result["sums"])
    ranks = [_rank(k) for k in truth]
    assert result["count"] == int(result["sums"]["count"]) == len(truth) == 100
    assert metrics["top1"] == sum(r == 0 for r in ranks) / 100
    assert metrics["top5"] == sum(r < 5 for r in ranks) / 100
    confusion = result["sums"]["confusion"].view(10, 10)
    assert confusion.sum() == 100 and confusion.diagonal().sum() == sum(r == 0 for r in ranks)
    assert confusion.sum(1).tolist() == [sum(v == c for v in truth.values()) for c in range(10)]


PROBE = """
import json, sys
from finetune.config import FinetuneConfig
from finetune.task import ClassifyTask
from vitcore.config import load_config
from vitcore.train.engine import Trainer
from vitcore.train.ending import end_process_group, exit_now

cfg = load_config(FinetuneConfig, None, sys.argv[1:])
trainer = Trainer(cfg, ClassifyTask(cfg))
seen = []
stream = trainer.eval_stream
for batch in stream:  # what this rank's evaluation reads, key by key
    seen += batch["key"]
json.dump(seen, open(f"{cfg.run.out_dir}.rank{trainer.accelerator.process_index}.json", "w"))
trainer.fit()
trainer.close()
end_process_group()  # in order, then out without interpreter finalization (vitcore.train.ending)
exit_now()
"""


# make test-all (15 s); make test keeps every image evaluated once over ranks (test_eval_stream)
@pytest.mark.slow
def test_two_processes_evaluate_every_image_exactly_once(cifar_shards, val_shards, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "run"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", str(probe),
           *overrides(cifar_shards, val_shards, out, init_from="null", **{"data.batch_size": 8, "run.steps": 2,
                                                                          "eval.batch_size": 16})]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] and seen[1], "a rank sat idle"
    assert sorted(seen[0] + seen[1]) == sorted(_keys_and_labels(val_shards))  # each image once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["count"] == 100 and summary["processes"] == 2
    rows = read_predictions(out)  # both ranks' images, gathered: the same count as the top-1's
    assert [(r["key"], r["label"]) for r in rows] == sorted(_keys_and_labels(val_shards).items())
    assert sum(r["top5"][0] == r["label"] for r in rows) == round(summary["eval"]["top1"] * 100)


# make test-all (9 s); make test keeps a real-image fine-tune (test_the_demo_pipeline_end_to_end_on_real_images)
@pytest.mark.slow
def test_a_short_fine_tune_on_real_images_beats_chance(cifar_shards, val_shards, tmp_path):
    """Scratch Pico/8 on 256 CIFAR images for 150 steps (a few seconds): well above the 10% of
    chance on 100 held-out images."""
    summary = main(FinetuneConfig, ClassifyTask, overrides(
        cifar_shards, val_shards, tmp_path / "ft", init_from="null",
        **{"model.image_size": 32, "run.steps": 150, "run.eval_every": 0, "optim.lr": 1e-3, "optim.warmup_steps": 10,
           "data.batch_size": 32}))
    assert summary["eval"]["top1"] >= 0.2, summary["eval"]


def test_the_small_data_recipe_pieces_run_together(cifar_shards, val_shards, pretrained, tmp_path):
    """MixUp + CutMix on the batch, RandAugment in the workers, layer decay, drop path, EMA and
    average pooling: a short run trains, evaluates both weight sets and stays finite."""
    recipe = {"finetune.mixup_alpha": 0.8, "finetune.cutmix_alpha": 1.0, "finetune.randaugment": "true",
              "finetune.ema_decay": 0.99, "finetune.pooling": "avg", "optim.layer_decay": 0.75, "model.drop_path": 0.1}
    summary = main(FinetuneConfig, ClassifyTask,
                   overrides(cifar_shards, val_shards, tmp_path / "ft", init_from=pretrained, **recipe))
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert summary["eval"]["count"] == 100 and set(summary["eval_ema"]) == {"top1", "top5", "loss"}
    assert checkpoint.load_meta(tmp_path / "ft" / "checkpoints" / "latest")["pooling"] == "avg"


def test_the_demo_pipeline_end_to_end_on_real_images(cifar_shards, val_shards, tmp_path):
    """`make demo`, shortened: MPP pretraining, fine-tuning of that encoder at a higher resolution,
    from scratch with the same total training compute (steps from `finetune.compare steps`), and the
    results table with its JSON and markdown."""
    from finetune.compare import matched_steps
    from vitcore.report.table import main as report

    runs = tmp_path / "demo"
    main(PretrainConfig, MPPTask, [f"data.shards={cifar_shards}", f"eval.shards={val_shards}", "model.variant=Pico/8",
                                   "model.image_size=32", "data.batch_size=16", "data.num_workers=0", "run.steps=4",
                                   "optim.warmup_steps=1", f"run.out_dir={runs / 'pretrain'}"])
    main(FinetuneConfig, ClassifyTask, overrides(cifar_shards, val_shards, runs / "pretrained", init_from=runs / "pretrain"))
    steps = matched_steps(runs / "pretrain", runs / "pretrained")
    summaries = {name: json.loads((runs / name / "summary.json").read_text()) for name in ("pretrain", "pretrained")}
    assert steps > summaries["pretrained"]["steps"]  # the pretraining's compute buys extra scratch steps
    main(FinetuneConfig, ClassifyTask, overrides(cifar_shards, val_shards, runs / "scratch_same_compute",
                                                 init_from="null", **{"run.steps": steps}))
    report([f"pretrain={runs / 'pretrain'}", f"pretrained={runs / 'pretrained'}",
            f"scratch_same_compute={runs / 'scratch_same_compute'}", "--gain", "pretrained,scratch_same_compute",
            "--out", str(runs / "results")])
    results = json.loads((runs / "results.json").read_text())
    for name in ("pretrained", "scratch_same_compute"):
        assert 0 <= results[name]["top1"] <= results[name]["top5"] <= 1 and results[name]["count"] == 100
    gain = results["gains"]["pretrained - scratch_same_compute"]
    assert gain == results["pretrained"]["top1"] - results["scratch_same_compute"]["top1"]
    for name in ("pretrained", "scratch_same_compute"):  # every validation image once, what the top-1 counted
        rows = read_predictions(runs / name)
        assert [r["key"] for r in rows] == sorted({r["key"] for r in rows}) and len(rows) == 100
        assert sum(r["top5"][0] == r["label"] for r in rows) == round(results[name]["top1"] * 100)
    low, high = results["gains"]["pretrained - scratch_same_compute_bootstrap_ci95"]
    assert low <= gain <= high and high - low > 0
    spent = results["pretrain"]["train_flops"] + results["pretrained"]["train_flops"]
    assert abs(results["scratch_same_compute"]["train_flops"] / spent - 1) < 0.1
    assert results["pretrain"]["stage"] == "pretrain" and "baseline_acc" in results["pretrain"]
    table = (runs / "results.md").read_text()
    assert "| pretrained " in table and "| scratch_same_compute " in table and "most-frequent-colour acc" in table
    assert "TFLOP" in table and "pretrained - scratch_same_compute:" in table
    assert "(95% interval over the validation images, paired bootstrap: " in table
