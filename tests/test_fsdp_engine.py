"""The real Trainer under FSDP2 in two CPU processes (gloo): MPP pretraining with evaluation, the
monitor's probes and example images, a checkpoint, and a resume from it.

Accelerate refuses FSDP on the CPU (it keeps DistributedType.MULTI_CPU, see tests/test_fsdp.py),
so the worker replaces the engine's Accelerator with one forced onto Accelerate's FSDP2 code path.
The evaluation and monitor shards are 3 shards of 64 images: rank 0 reads 128 of them, rank 1 64,
so the ranks hold different batch counts (4 and 2), and every forward outside the training step
all-gathers parameters: a rank that ran fewer would leave the other waiting (the collective timeout
turns such a hang into a failure).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from launching import CPU_ENV, ROOT, launch_command
from vitcore.data.index import read_index, write_index
from vitcore.model.vit import ViT, ViTConfig

WORKER = """
import json, sys
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
import vitcore.train.engine as engine
from vitcore.train.ending import end_process_group, exit_now
from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore.config import load_config

def fsdp2_accelerator(**kwargs):
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"], state_dict_type="FULL_STATE_DICT")
    accel = Accelerator(**kwargs, fsdp_plugin=plugin)
    PartialState._shared_state["distributed_type"] = accel.state.distributed_type = DistributedType.FSDP
    accel.state.fsdp_plugin = plugin
    return accel

engine.Accelerator = fsdp2_accelerator
shapes = set()

class Task(MPPTask):
    def loss(self, model, batch):  # what a training step sees: the first block's qkv weight, (192, 64) in full
        qkv = model.encoder.blocks[0].attn.qkv.weight
        shapes.add((type(qkv).__name__, tuple(qkv.to_local().shape)))
        return super().loss(model, batch)

cfg = load_config(PretrainConfig, None, sys.argv[2:])
trainer = engine.Trainer(cfg, Task(cfg))
summary = trainer.fit()
rank = trainer.accelerator.process_index
json.dump({"shapes": sorted(shapes), "summary": summary}, open(f"{sys.argv[1]}.rank{rank}.json", "w"))
trainer.close()
end_process_group()  # in order, then out without interpreter finalization (vitcore.train.ending)
exit_now()
"""


def _uneven_shards(cifar_shards: Path, out: Path) -> Path:
    """3 of the fixture's 4 shards (64 images each): split over 2 ranks, 128 and 64 images."""
    out.mkdir()
    index = read_index(cifar_shards)
    for shard in index["shards"][:3]:
        shutil.copy(cifar_shards / shard["name"], out / shard["name"])
    write_index(out, index["shards"][:3], index["classes"])
    return out


def _launch(tmp_path: Path, name: str, args: list[str]) -> list[dict]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = launch_command(worker, str(tmp_path / name), *args)
    env = {**CPU_ENV, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]


def _evaluate_in_one_process(weights: dict[str, torch.Tensor], shards: Path, args: list[str]) -> dict:
    """The saved weights in a plain MPP model, evaluated in this process over the same two halves of
    the evaluation set that the two ranks read (MPP's evaluation corruption is seeded per batch)."""
    from pretrain.config import PretrainConfig
    from pretrain.task import MPPTask
    from vitcore.config import load_config
    from vitcore.data import ShardStream
    from vitcore.eval.loop import evaluate

    cfg = load_config(PretrainConfig, None, args)
    task = MPPTask(cfg)
    model = task.build_model()[0]
    model.load_state_dict(weights)  # strict: the full weights, keyed as the plain module's
    model.eval()
    accel = Accelerator(cpu=True)
    hits, hits5, loss, predictions, images = 0, 0, 0.0, 0, 0
    for rank in (0, 1):
        stream = ShardStream.exactly_once(str(shards), task.eval_transform, 32, rank=rank, world_size=2,
                                          num_workers=0, seed=cfg.run.seed, labeled=False)
        r = evaluate(accel, lambda batch: task.eval_sums(model, batch), stream)
        m, n = task.eval_metrics(r["sums"]), int(r["sums"]["count"])
        hits, hits5 = hits + round(m["top1"] * n), hits5 + round(m["top5"] * n)
        loss += m["loss"] * n
        predictions, images = predictions + n, images + r["count"]
    return {"top1": hits / predictions, "top5": hits5 / predictions, "loss": loss / predictions, "count": images}


COMMON = ["model.variant=Pico/8", "model.image_size=32", "data.batch_size=8", "data.num_workers=0",
          "optim.accum_steps=2", "run.steps=4", "run.log_every=2", "run.ckpt_every=2", "run.image_every=2",
          "run.collective_timeout_s=60", "eval.batch_size=32", "eval.num_workers=0", "monitor.every=2",
          "monitor.batch_size=32", "monitor.num_workers=0", "monitor.probe_steps=5", "monitor.images=2"]


@pytest.fixture(scope="module")
def fsdp_run(cifar_shards, tmp_path_factory):
    """One uninterrupted 4-step FSDP2 run: (its directory, each rank's record, its arguments)."""
    tmp_path = tmp_path_factory.mktemp("fsdp-engine")
    uneven = _uneven_shards(cifar_shards, tmp_path / "uneven")
    args = [*COMMON, f"data.shards={cifar_shards}", f"eval.shards={uneven}", f"monitor.train_shards={uneven}",
            f"monitor.val_shards={uneven}"]
    full = tmp_path / "full"
    return full, _launch(tmp_path, "full", [*args, f"run.out_dir={full}"]), args, uneven


def test_trainer_under_fsdp2_shards_evaluates_and_saves_full_weights(fsdp_run):
    full, ranks, args, uneven = fsdp_run
    # the training steps saw parameters split over the two ranks (96 of qkv's 192 rows each)
    assert all(r["shapes"] == [["DTensor", [96, 64]]] for r in ranks), [r["shapes"] for r in ranks]

    # the checkpoint holds full weights that a plain, single-process model loads; its encoder is a plain ViT
    weights = load_file(full / "checkpoints" / "latest" / "model.safetensors")
    state = torch.load(full / "checkpoints" / "latest" / "train_state.pt", weights_only=True)
    assert state["optimizer_format"] == "by_name" and state["step"] == 4
    assert set(state["optimizer"]["state"]) == set(weights)  # keyed by parameter name (the model has no buffers)
    vit = ViT(ViTConfig.from_variant("Pico/8", image_size=32))
    vit.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")})

    # evaluation: every image counted once over ranks with 4 and 2 batches, stand-ins discarded, and
    # top-1, top-5 and loss as the same weights give in one process
    summary = ranks[0]["summary"]
    expected = _evaluate_in_one_process(weights, uneven, args[:2])
    assert summary["eval"]["count"] == 192 == expected["count"]
    assert summary["eval"]["top1"] == expected["top1"] and summary["eval"]["top5"] == expected["top5"], \
        (summary["eval"], expected)
    assert abs(summary["eval"]["loss"] - expected["loss"]) < 1e-6 * expected["loss"], (summary["eval"], expected)
    assert ranks[1]["summary"]["eval"] == summary["eval"]  # every rank holds the same result

    # the monitor's probes ran at steps 0, 2 and 4 over every image, logged once (by rank 0)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["probe/images"]) for r in rows if "probe/images" in r] == [(0, 192.0), (2, 192.0), (4, 192.0)]
    assert len(list(full.glob("events.out.tfevents.*"))) == 1, "more than one rank wrote TensorBoard events"


@pytest.mark.slow  # a second 2-process launch: ~20 s on an idle 2-core CPU, a minute when it is busy
def test_trainer_under_fsdp2_resumes_bit_for_bit(fsdp_run, tmp_path):
    full, _, args, _ = fsdp_run
    resumed = tmp_path / "resumed"  # a new run directory, resumed from the uninterrupted run's step 2
    _launch(tmp_path, "resumed", [*args, f"run.out_dir={resumed}",
                                  f"run.resume={full / 'checkpoints' / 'step-00000002'}"])
    weights = load_file(full / "checkpoints" / "latest" / "model.safetensors")
    again = load_file(resumed / "checkpoints" / "latest" / "model.safetensors")
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights), "the resumed FSDP run diverged"
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {4}, "the run did not resume at step 2"
