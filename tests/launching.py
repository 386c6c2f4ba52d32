"""Helpers for the tests that start real `accelerate launch` jobs of CPU processes (gloo)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The project's accelerate, not whatever is on PATH.
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
# Several CPU processes: ACCELERATE_USE_CPU=1 with a multi-process launch (`--cpu` alone starts one);
# one thread each, so that two processes share two cores without oversubscribing them.
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A free TCP port for the rendezvous: another job's launch on the default 29500 must not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: str | Path, *args: str, processes: int = 2, machines: int = 1, machine_rank: int = 0,
                   port: int | None = None) -> list[str]:
    """`accelerate launch` of `script` with `processes` CPU processes over `machines` (this host)."""
    cmd = [ACCELERATE, "launch", "--num_processes", str(processes), "--num_machines", str(machines),
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or free_port())]
    if processes > 1:
        cmd.insert(2, "--multi_gpu")
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return [*cmd, str(script), *args]


# Launched in place of a rank's script: it runs the script as a child with the rank's environment
# and records how the child ended, signals included (a process cannot report its own SIGABRT at
# exit), in <out>/rank<RANK>.json. SIGINT and SIGTERM from the launcher are passed on to the child.
RECORDER = """
import json, os, signal, subprocess, sys
out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
child = subprocess.Popen([sys.executable, script, *args], stderr=subprocess.PIPE, text=True)
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda signum, frame: child.send_signal(signum))
stderr = child.stderr.read()
status = child.wait()
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"status": status, "stderr": stderr}, f)
"""


def recorded_launch_command(out: Path, script: str | Path, *args: str, processes: int = 2) -> list[str]:
    """`launch_command` of `script` through the recorder: read the ranks' endings with `recorded_endings`."""
    recorder = Path(out) / "recorder.py"
    recorder.write_text(RECORDER)
    return launch_command(recorder, str(out), str(script), *args, processes=processes)


def recorded_endings(out: Path, processes: int = 2) -> list[dict]:
    """Every rank's {"status": exit status (negative: killed by that signal), "stderr": its text}."""
    import json

    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(processes)]


def signal_when_training(proc: subprocess.Popen, metrics: Path, rows: int, signum: signal.Signals) -> None:
    """Send `proc` `signum` once `metrics` (a run's metrics.jsonl) holds `rows` logged steps: training
    is under way then, its handlers installed. Generous deadline: start-up alone is slow on a loaded machine."""
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    proc.send_signal(signum)
