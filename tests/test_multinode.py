"""A two-machine job on this host: two `accelerate launch` commands, machine rank 0 and 1, one CPU
process each (gloo), what launch/slurm.sh starts on two nodes. Both "machines" share this
filesystem, as nodes share a cluster's; each launcher runs in a working directory of its own."""

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore.config import load_config
from vitcore.data import ShardStream

from launching import CPU_ENV, free_port, launch_command

# Trains like pretrain/run.py, then saves what each rank ended with: its weights, the sample keys
# each of its streams yielded, and the steps at which it wrote a checkpoint.
PROBE = """
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from pretrain.config import PretrainConfig
from pretrain.task import MPPTask
from vitcore import checkpoint
from vitcore.config import load_config
from vitcore.data import ShardStream
from vitcore.train.engine import Trainer
from vitcore.train.ending import end_process_group, exit_now

keys, saves = {}, []
iterate, save = ShardStream.__iter__, checkpoint.save_checkpoint

def recording(self):
    for batch in iterate(self):
        keys.setdefault(id(self), []).extend(batch["key"])
        yield batch

def counting(ckpt_dir, step, *args, **kwargs):
    saves.append(step)
    return save(ckpt_dir, step, *args, **kwargs)

ShardStream.__iter__, checkpoint.save_checkpoint = recording, counting
cfg = load_config(PretrainConfig, None, sys.argv[1:])
trainer = Trainer(cfg, MPPTask(cfg))
trainer.fit()
rank = trainer.accelerator.process_index
probe = Path(cfg.run.out_dir).parent / f"rank{rank}-step{cfg.run.steps}"
model = trainer.accelerator.unwrap_model(trainer.loop.model)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{probe}.safetensors")
Path(f"{probe}.json").write_text(json.dumps({"train": keys.get(id(trainer.stream), []),
                                             "eval": keys.get(id(trainer.eval_stream), []), "saves": saves}))
trainer.close()
end_process_group()  # in order, then out without interpreter finalization (vitcore.train.ending)
exit_now()
"""


def two_machines(probe: Path, args: list[str], tmp_path: Path) -> None:
    """Start machine ranks 0 and 1 of a 2-machine job at once; both must exit 0."""
    port = free_port()
    machines = []
    for rank in (0, 1):
        cwd = tmp_path / f"machine{rank}"
        cwd.mkdir(exist_ok=True)
        cmd = launch_command(probe, *args, processes=2, machines=2, machine_rank=rank, port=port)
        machines.append(subprocess.Popen(cmd, cwd=cwd, env=CPU_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True))
    try:
        errors = [m.communicate(timeout=600)[1] for m in machines]
    finally:
        for m in machines:
            m.kill()
    for m, err in zip(machines, errors):
        assert m.returncode == 0, err[-3000:]


# make test-all (25 s); make test keeps two processes in sync with rank 0 writing (test_distributed)
# and exact resume (test_preemption)
@pytest.mark.slow
def test_two_machines_train_resume_stay_in_sync_and_only_rank0_writes(cifar_shards, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "run"
    args = lambda steps: ["model.variant=Pico/8", "model.image_size=32", f"data.shards={cifar_shards}",  # noqa: E731
                          "data.batch_size=8", "data.num_workers=0", f"eval.shards={cifar_shards}",
                          "eval.num_workers=0", f"run.steps={steps}", "run.log_every=2", "run.ckpt_every=2",
                          "run.image_every=0", f"run.out_dir={out}"]
    two_machines(probe, args(4), tmp_path)
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    two_machines(probe, args(6), tmp_path)  # run.resume=auto: continues from step 4
    assert len(list(out.glob("events.out.tfevents.*"))) == 2  # one per launch, rank 0's

    # identical weights on both machines, and they are the checkpoint's
    ranks = [load_file(tmp_path / f"rank{r}-step6.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), "the machines diverged"
    saved = load_file(out / "checkpoints" / "latest" / "model.safetensors")
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)

    # one writer: each step logged once, samples counted over both machines; only rank 0 saves
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and train[-1]["samples"] == 96  # 8 x 2 machines x 6 steps
    assert [r["step"] for r in rows if "val/count" in r] == [4, 6]
    probes = {(r, s): json.loads((tmp_path / f"rank{r}-step{s}.json").read_text()) for r in (0, 1) for s in (4, 6)}
    assert [probes[0, s]["saves"] for s in (4, 6)] == [[2, 4], [6]]
    assert [probes[1, s]["saves"] for s in (4, 6)] == [[], []]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "latest", "step-00000004",
                                                                  "step-00000006"]
    assert [list(p.iterdir()) for p in (tmp_path / "machine0", tmp_path / "machine1")] == [[], []]

    # training data: each machine draws the stream of its own global rank of two, and the resumed
    # launch continues it where the first stopped (streams are resampled with replacement per rank,
    # so they differ but need not be disjoint)
    cfg = load_config(PretrainConfig, None, args(6))
    for rank in (0, 1):
        stream = ShardStream(str(cifar_shards), MPPTask(cfg).transform, 8, rank=rank, world_size=2, num_workers=0,
                             seed=cfg.run.seed, labeled=False, shuffle_buffer=cfg.data.shuffle_buffer)
        expected = [key for batch, _ in zip(stream, range(6)) for key in batch["key"]]
        assert probes[rank, 4]["train"] + probes[rank, 6]["train"] == expected
    assert probes[0, 4]["train"] != probes[1, 4]["train"]

    # evaluation: every validation image exactly once, split between the machines at every evaluation
    for step in (4, 6):
        split = [Counter(probes[r, step]["eval"]) for r in (0, 1)]
        assert split[0] and split[1] and not split[0].keys() & split[1].keys()
        assert set((split[0] + split[1]).values()) == {1} and len(split[0] + split[1]) == 256
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6 and summary["eval"]["count"] == 256
