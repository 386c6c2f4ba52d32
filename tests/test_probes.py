"""The feature monitor's probes on cases with known answers, and the monitor inside a real run."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore.config import ConfigError, load_config
from vitcore.train.engine import Trainer
from vitcore.eval.probes import knn_top1, linear_probe_top1

from launching import CPU_ENV, ROOT, launch_command


def clusters(per_class: int, centres: torch.Tensor, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` points around each of the (C, D) `centres`, labelled by centre."""
    g = torch.Generator().manual_seed(seed)
    C, D = centres.shape
    x = centres.repeat_interleave(per_class, 0) + spread * torch.randn(C * per_class, D, generator=g)
    return x, torch.arange(C).repeat_interleave(per_class)


def test_knn_on_separable_clusters_is_exact():
    centres = torch.eye(4) * 10  # 4 orthogonal directions: cosine neighbours are the own cluster
    train_x, train_y = clusters(30, centres, 0.5, seed=0)
    val_x, val_y = clusters(10, centres, 0.5, seed=1)
    assert knn_top1(train_x, train_y, val_x, val_y, num_classes=4) == 1.0
    # labels permuted on the train side only: every vote goes to the wrong class
    assert knn_top1(train_x, (train_y + 1) % 4, val_x, val_y, num_classes=4) == 0.0
    # a known fraction: the last val cluster's labels say class 0, so exactly 3/4 are right
    assert knn_top1(train_x, train_y, val_x, val_y.clamp(max=2) * (val_y < 3), num_classes=4) == 0.75


def test_knn_votes_are_weighted_by_similarity_and_ties_go_to_the_lowest_class():
    # One query along x. Train: class 1 exactly on x (similarity 1), two class 0 points at 60 degrees
    # (similarity 0.5 each). With k=3 and T=0.07, one vote exp(1/T) beats two of exp(0.5/T).
    train_x = torch.tensor([[1.0, 0.0], [0.5, 0.75 ** 0.5], [0.5, -(0.75 ** 0.5)]])
    train_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_top1(train_x, train_y, query, torch.tensor([1]), num_classes=2, k=3) == 1.0
    # a large temperature flattens the weights: then two votes beat one
    assert knn_top1(train_x, train_y, query, torch.tensor([0]), num_classes=2, k=3, temperature=100.0) == 1.0
    # an exact tie (two equally similar neighbours of classes 2 and 1): the lower class id wins
    tie_x = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    for val_y, expected in ((1, 1.0), (2, 0.0)):
        assert knn_top1(tie_x, torch.tensor([2, 1]), query, torch.tensor([val_y]), num_classes=3, k=2) == expected


def test_knn_chunks_give_the_same_answer():
    g = torch.Generator().manual_seed(0)
    train_x, val_x = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    train_y, val_y = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (50,), generator=g)
    whole = knn_top1(train_x, train_y, val_x, val_y, 5)
    assert knn_top1(train_x, train_y, val_x, val_y, 5, chunk=7) == whole


def test_linear_probe_separates_linearly_separable_classes():
    # Separable by a linear boundary but not by cosine kNN: classes differ in the sign of one
    # coordinate, in a cloud dominated by a shared large offset and noise in other directions.
    g = torch.Generator().manual_seed(0)
    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 6, generator=g) * 3
        x[:, 0] = (y * 2 - 1) * (0.5 + torch.rand(n, generator=g))  # margin 0.5 around 0
        x[:, 1] += 50.0
        return x, y
    (train_x, train_y), (val_x, val_y) = make(400), make(200)
    assert linear_probe_top1(train_x, train_y, val_x, val_y, num_classes=2) == 1.0
    assert knn_top1(train_x, train_y, val_x, val_y, num_classes=2) < 0.9  # the case is not trivial
    # labels that carry no signal: the probe is at chance, not memorising the validation set
    shuffled = train_y[torch.randperm(400, generator=g)]
    assert linear_probe_top1(train_x, shuffled, val_x, val_y, num_classes=2) < 0.7


def test_linear_probe_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 5, generator=g), torch.randint(0, 3, (100,), generator=g)
    state = torch.get_rng_state()
    first = linear_probe_top1(x, y, x, y, 3)
    assert torch.equal(torch.get_rng_state(), state)  # draws nothing from the global RNG
    assert linear_probe_top1(x, y, x, y, 3) == first


def test_monitor_config_needs_both_shard_sets():
    with pytest.raises(ConfigError, match="monitor.val_shards: give both"):
        load_config(PretrainConfig, None, ["monitor.train_shards=a"])
    with pytest.raises(ConfigError, match="monitor.train_shards: give both"):
        load_config(PretrainConfig, None, ["monitor.val_shards=a"])
    with pytest.raises(ConfigError, match="monitor.every: must be positive"):
        load_config(PretrainConfig, None, ["monitor.every=0"])


def run(tmp_path, shards, name, *extra):
    cfg = load_config(PretrainConfig, None, [
        "model.variant=Pico/8", "model.image_size=32", f"data.shards={shards}", "data.batch_size=16",
        "data.num_workers=0", "run.steps=6", "run.log_every=3", "run.ckpt_every=6", "run.image_every=0",
        "optim.warmup_steps=2", f"run.out_dir={tmp_path / name}", *extra])
    summary = Trainer(cfg, MPPTask(cfg)).fit()
    return summary, load_file(tmp_path / name / "checkpoints" / "latest" / "model.safetensors")


def test_monitor_reports_probes_and_leaves_training_unchanged(cifar_shards, tmp_path):
    _, plain = run(tmp_path, cifar_shards, "plain")
    summary, monitored = run(tmp_path, cifar_shards, "monitored", f"monitor.train_shards={cifar_shards}",
                             f"monitor.val_shards={cifar_shards}", "monitor.every=4", "monitor.num_workers=1",
                             "monitor.batch_size=50", "monitor.probe_steps=20")
    # the monitor changes nothing in training: no random draws from its streams, the model back in train mode
    assert plain.keys() == monitored.keys()
    assert all(torch.equal(plain[k], monitored[k]) for k in plain)

    keys = {f"{probe}_top1_{feature}" for probe in ("knn", "linear") for feature in ("cls", "patch_mean")}
    assert set(summary["probe"]) == keys and set(summary["probe_start"]) == keys
    rows = [json.loads(line) for line in (tmp_path / "monitored" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe/knn_top1_cls" in r]
    assert [r["step"] for r in probes] == [0, 4, 6]  # the step-0 reference, every 4 steps, the end
    assert all(r["probe/images"] == 256 for r in probes)  # every monitoring image, once
    assert summary["probe_start"] == {k: probes[0][f"probe/{k}"] for k in keys}
    assert summary["probe"] == {k: probes[-1][f"probe/{k}"] for k in keys}
    # on the probes' own train set, 1-NN-like voting recalls most labels even at random init
    assert probes[0]["probe/knn_top1_patch_mean"] > 0.3
    assert summary["probe_seconds"] > 0


def test_best_checkpoint_by_a_probe_metric(cifar_shards, tmp_path):
    """run.best_metric names a monitor score: `checkpoints/best` is the step whose probe scored
    highest (the first of equals), summary.json says which metric, and fine-tuning starts from it."""
    from finetune.config import FinetuneConfig
    from finetune.task import ClassifyTask
    from vitcore import checkpoint
    from vitcore.train.engine import main

    metric = "probe/knn_top1_patch_mean"
    summary, _ = run(tmp_path, cifar_shards, "best", f"monitor.train_shards={cifar_shards}",
                     f"monitor.val_shards={cifar_shards}", "monitor.every=2", "monitor.num_workers=0",
                     "monitor.batch_size=64", "monitor.probe_steps=5", f"run.best_metric={metric}")
    rows = [json.loads(line) for line in (tmp_path / "best" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if metric in r and r["step"] > 0]  # step 0, the random init, is the reference only
    assert [r["step"] for r in probes] == [2, 4, 6]
    top = max(probes, key=lambda r: r[metric])  # max() keeps the first of equals
    best = checkpoint.find_best(tmp_path / "best" / "checkpoints")
    assert best is not None and checkpoint.load_meta(best)["step"] == top["step"]
    assert summary["best"] == {"step": top["step"], "metric": metric, "knn_top1_patch_mean": top[metric],
                               "checkpoint": str(best)}
    ft = main(FinetuneConfig, ClassifyTask, [
        "model.variant=Pico/8", "model.image_size=48", f"data.shards={cifar_shards}", "data.batch_size=16",
        "data.num_workers=0", "eval.shards=null", "run.steps=2", "run.image_every=0", "optim.warmup_steps=1",
        f"init_from={tmp_path / 'best' / 'checkpoints' / 'best'}", f"run.out_dir={tmp_path / 'ft'}"])
    assert ft["steps"] == 2 and "best" not in ft  # no evaluation: no best
    # a metric the run cannot produce stops before any work, with the key named
    with pytest.raises(ConfigError, match="run.best_metric: probe/knn_top1_cls needs the monitor"):
        run(tmp_path, cifar_shards, "nomonitor", "run.best_metric=probe/knn_top1_cls")
    with pytest.raises(ConfigError, match="run.best_metric: 'top1' is not val/<name> or probe/<name>"):
        load_config(PretrainConfig, None, ["run.best_metric=top1"])
    with pytest.raises(ConfigError, match="run.best_mode: 'up' is not one of max, min"):
        load_config(PretrainConfig, None, ["run.best_mode=up"])
    assert not (tmp_path / "nomonitor").exists()


FEATURES_PROBE = """
import sys, torch
from accelerate import Accelerator
from vitcore.data import ShardStream
from vitcore.data.transforms import eval_transform
from vitcore.eval.probes import extract_features
from vitcore.model.vit import ViT, ViTConfig
from vitcore.train.ending import end_process_group, exit_now

accel = Accelerator()
torch.manual_seed(0)
vit = ViT(ViTConfig.from_variant("Pico/8", image_size=32)).eval()
stream = ShardStream.exactly_once(sys.argv[1], eval_transform(32), 24, rank=accel.process_index,
                                  world_size=accel.num_processes, num_workers=1, labeled=True)
f = extract_features(accel, vit, stream)
torch.save({"keys": f.keys, "cls": f.features["cls"], "labels": f.labels, "expected": f.expected,
            "skipped": f.skipped}, f"{sys.argv[2]}/rank{accel.process_index}.pt")
end_process_group()  # in order, then out without interpreter finalization (vitcore.train.ending)
exit_now()
"""


# make test-all (24 s); make test keeps every image counted once over ranks (test_eval_stream)
@pytest.mark.slow
def test_features_count_every_image_once_over_two_processes(cifar_shards, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(FEATURES_PROBE)
    cmd = launch_command(probe, str(cifar_shards), str(tmp_path))
    result = subprocess.run(cmd, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    (tmp_path / "one").mkdir()
    subprocess.run([sys.executable, str(probe), str(cifar_shards), str(tmp_path / "one")], cwd=ROOT, check=True,
                   env=CPU_ENV, capture_output=True, timeout=300)  # one process
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert two[0]["keys"] == two[1]["keys"]  # every rank holds all the rows, in the same order
    keys = two[0]["keys"]
    assert len(keys) == len(set(keys)) == one["expected"] == 256 and two[0]["skipped"] == 0
    assert set(keys) == set(one["keys"])
    # each key's row is the one a single process computes for it (rows and labels travel together)
    where = {k: i for i, k in enumerate(one["keys"])}
    order = torch.tensor([where[k] for k in keys])
    torch.testing.assert_close(two[0]["cls"], one["cls"][order])
    assert torch.equal(two[0]["labels"], one["labels"][order])
    assert torch.equal(two[0]["cls"], two[1]["cls"])
