"""Two CPU processes through `accelerate launch` (gloo): `ACCELERATE_USE_CPU=1` with a multi-process
launch, what launch/cpu_2proc.yaml and docs/pretraining.md's 2-CPU-process line do (`--cpu` alone starts one)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from safetensors.torch import save_file
from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore.config import load_config
from vitcore.train.engine import Trainer
from vitcore.train.ending import end_process_group, exit_now

cfg = load_config(PretrainConfig, None, sys.argv[1:])
trainer = Trainer(cfg, MPPTask(cfg))
trainer.fit()
rank = trainer.accelerator.process_index
model = trainer.accelerator.unwrap_model(trainer.loop.model)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{cfg.run.out_dir}/../rank{rank}.safetensors")
trainer.close()
end_process_group()  # in order, then out without interpreter finalization (vitcore.train.ending)
exit_now()
"""


def test_two_cpu_processes_stay_in_sync_and_only_rank0_writes(cifar_shards, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "run"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(probe),
           "model.variant=Pico/8", "model.image_size=32", f"data.shards={cifar_shards}", "data.batch_size=8",
           "data.num_workers=1", "run.steps=4", "run.log_every=2", "run.ckpt_every=2", "run.image_every=2",
           f"run.out_dir={out}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "ranks diverged"
    saved = load_file(out / "checkpoints" / "latest" / "model.safetensors")
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)

    # one writer: one TensorBoard file, each step logged once, samples counted over both ranks
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"samples": 64' in rows[-1]  # 8 per rank x 2 ranks x 4 steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]

    # the data position of every rank is saved, so each rank resumes its own stream
    state = torch.load(out / "checkpoints" / "latest" / "train_state.pt", weights_only=True)
    assert [d["rank"] for d in state["data"]] == [0, 1]
    assert all(d["batches"] == 4 and d["world_size"] == 2 for d in state["data"])
