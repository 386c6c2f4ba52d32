"""launch/slurm.sh without SLURM: fake `srun` and `scontrol` first on PATH record what they are asked.

The fake srun runs its command once per node (SLURM_NODEID 0..SLURM_NNODES-1) on this machine,
forwards SIGUSR1 to those tasks' process groups as srun does (the least SLURM guarantees: torch's
elastic agent gets it, its workers, in sessions of their own, do not), and exits with the highest
task status. SIGUSR1 to the script stands for SLURM's `--signal=B:USR1@300` warning.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launching import ROOT, free_port
from test_run_safety import survivors, wait_for
SCRIPT = ROOT / "launch" / "slurm.sh"
JOB_ID = 1234567

FAKE_SRUN = """
import json, os, signal, subprocess, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(json.dumps(["srun", *sys.argv[1:]]) + "\\n")
args = sys.argv[1:]
while args[0].startswith("-"):  # srun's own options come before the command
    args.pop(0)
tasks = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n)},
                          start_new_session=True)  # each task a process group of its own, as slurmstepd makes it
         for n in range(int(os.environ["SLURM_NNODES"]))]


def forward(sig, frame):
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps(["srun-forwarded", signal.Signals(sig).name]) + "\\n")
    for task in tasks:
        if task.poll() is None:
            os.killpg(task.pid, sig)  # the task's process group (proctrack/pgid; cgroup reaches more)

signal.signal(signal.SIGUSR1, forward)
codes = [t.wait() for t in tasks]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))  # srun: the highest status; 128 + signal
"""

FAKE_SCONTROL = """
import json, os, re, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(json.dumps(["scontrol", *sys.argv[1:]]) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:  # prefix[07-08] or a,b
    m = re.fullmatch(r"(.*)\\[(\\d+)-(\\d+)\\]", sys.argv[3])
    hosts = [f"{m[1]}{i:0{len(m[2])}d}" for i in range(int(m[2]), int(m[3]) + 1)] if m else sys.argv[3].split(",")
    print("\\n".join(hosts))
"""

# Stands in for `accelerate launch`: records its arguments, then waits for the test's go-ahead.
FAKE_ACCELERATE = """
import json, os, signal, sys, time
from pathlib import Path
folder = Path(os.environ["FAKE_SLURM_DIR"])
record = {"argv": sys.argv[1:], "cwd": os.getcwd(),
          "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}
(folder / f"accelerate-node{os.environ['SLURM_NODEID']}.json").write_text(json.dumps(record))
while "FAKE_FINISH" in os.environ and not Path(os.environ["FAKE_FINISH"]).exists():
    time.sleep(0.05)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

# A training process under the real `accelerate launch`, with the engine's preemption contract:
# on SIGUSR1 it stops (checkpoint saved) and exits 75.
STAGE_PROBE = """
import os, signal, sys, time
from pathlib import Path
out = Path(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("run.out_dir=")))
rank = os.environ["RANK"]

def preempted(sig, frame):
    (out / f"rank{rank}.signal").write_text(signal.Signals(sig).name)
    sys.exit(75)

signal.signal(signal.SIGUSR1, preempted)
(out / f"rank{rank}.ready").touch()
time.sleep(90)  # a long run: only the signal ends it in time
"""

# Arguments that a string splice would break: spaces, quotes, $, backticks, a pipe: URL.
USER_ARGS = ["--config", "configs/pretrain/vit_b16_mpp.yaml", "run.out_dir=runs/my run",
             "data.shards=pipe:aws s3 cp s3://b/shard-{000000..000099}.tar -", "optim.lr='3e-4' \"x\"",
             "run.seed=$HOME;`id`"]


def fake_slurm(tmp_path: Path, nodes: str, gpus: int, **env: str) -> dict[str, str]:
    """The environment of a batch script in a 2-node allocation, with the fakes first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, code in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{code}")
        (bin_dir / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("GPUS_PER_NODE", "STAGE", "MASTER_PORT", "ACCELERATE")}
    return {**base, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "log"),
            "FAKE_SLURM_DIR": str(tmp_path), "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NODELIST": nodes,
            "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_CPUS_PER_TASK": "64",
            **env}


def calls(tmp_path: Path, command: str) -> list[list[str]]:
    log = tmp_path / "log"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [row[1:] for row in rows if row[0] == command]


def start(env: dict[str, str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("stage", [None, "finetune"])  # STAGE unset: pretraining
def test_every_node_runs_accelerate_with_its_rank_and_the_arguments_intact(tmp_path, stage):
    env = fake_slurm(tmp_path, "gpu-[07-08]", gpus=4, ACCELERATE=str(tmp_path / "bin" / "accelerate"),
                     **({"STAGE": stage} if stage else {}))
    job = start(env, USER_ARGS)
    assert job.wait(timeout=60) == 0, job.stderr.read()

    for rank in (0, 1):
        record = json.loads((tmp_path / f"accelerate-node{rank}.json").read_text())
        assert record["argv"] == [
            "launch", "--config_file", "launch/multi_node.yaml", "--num_machines", "2", "--num_processes", "8",
            "--machine_rank", str(rank), "--main_process_ip", "gpu-07",
            "--main_process_port", str(20000 + JOB_ID % 20000), f"{stage or 'pretrain'}/run.py", *USER_ARGS]
        assert record["cwd"] == str(ROOT)
        assert record["usr1_ignored"], "the launcher (torch's elastic agent) would die of the time-limit warning"

    [srun] = calls(tmp_path, "srun")
    assert srun[:4] == ["--kill-on-bad-exit=1", "--cpus-per-task=64", "bash", "-c"]
    assert srun[5:] == ["bash", *USER_ARGS]  # positional parameters: never part of the command string
    assert not any(arg in srun[4] for arg in USER_ARGS[2:])
    assert calls(tmp_path, "scontrol") == [["show", "hostnames", "gpu-[07-08]"]]  # no requeue


@pytest.mark.parametrize(("warned", "status", "requeued"), [
    (False, 0, False),  # completed
    (False, 1, False),  # failed: requeueing would only fail again
    (True, 0, False),  # completed after the warning
    (True, 1, True),  # stopped at the warning: accelerate turns the workers' 75 into 1
])
def test_the_job_is_requeued_only_when_the_warning_stopped_training(tmp_path, warned, status, requeued):
    finish = tmp_path / "finish"
    env = fake_slurm(tmp_path, "gpu-[07-08]", gpus=4, ACCELERATE=str(tmp_path / "bin" / "accelerate"),
                     FAKE_FINISH=str(finish), FAKE_EXIT=str(status))
    job = start(env, USER_ARGS)
    try:
        wait_for(lambda: all((tmp_path / f"accelerate-node{r}.json").exists() for r in (0, 1)), timeout=60)
        if warned:
            job.send_signal(signal.SIGUSR1)
            wait_for(lambda: calls(tmp_path, "srun-forwarded") == [["SIGUSR1"]], timeout=30)
        finish.touch()
        assert job.wait(timeout=60) == status
    finally:
        job.kill()
    assert (["requeue", str(JOB_ID)] in calls(tmp_path, "scontrol")) == requeued, job.stderr.read()


def test_the_warning_reaches_every_training_process_on_every_node_then_requeues(tmp_path):
    """The real `accelerate launch`, two machines of one process each on this host."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "run.py").write_text(STAGE_PROBE)
    out = tmp_path / "run"
    out.mkdir()
    env = fake_slurm(tmp_path, "127.0.0.1,127.0.0.1", gpus=1, STAGE=str(stage), MASTER_PORT=str(free_port()),
                     ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    job = start(env, [f"run.out_dir={out}"])
    try:
        wait_for(lambda: all((out / f"rank{r}.ready").exists() for r in (0, 1)) or job.poll() is not None,
                 timeout=240)
        assert job.poll() is None, job.stderr.read()[-3000:]
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=60) == 1  # accelerate's status for workers that exited 75
        assert [(out / f"rank{r}.signal").read_text() for r in (0, 1)] == ["SIGUSR1", "SIGUSR1"]
        assert calls(tmp_path, "scontrol")[-1] == ["requeue", str(JOB_ID)]
    finally:
        job.kill()
        for pid in survivors(str(out)):
            os.kill(pid, signal.SIGKILL)
