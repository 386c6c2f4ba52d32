"""Helpers for the tests that start real `accelerate launch` jobs of CPU processes (gloo)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
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
