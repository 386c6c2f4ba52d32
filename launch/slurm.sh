#!/usr/bin/env bash
# Multi-node pretraining under SLURM: one task per node, accelerate starts one process per GPU.
#   sbatch launch/slurm.sh --config configs/pretrain/vit_b16_mpp.yaml run.out_dir=runs/b16
#SBATCH --job-name=vit-mpp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
set -euo pipefail
# One process per GPU SLURM gave each node (follows `sbatch --gpus-per-node=N` overrides).
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
STAGE=${STAGE:-pretrain}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # two jobs on one node do not collide
ACCELERATE=${ACCELERATE:-$(pwd)/.venv/bin/accelerate}  # the project's environment, not whatever is on PATH
export GPUS_PER_NODE STAGE MASTER_ADDR MASTER_PORT ACCELERATE
# run.resume=auto (the default) makes a requeued job continue from its latest checkpoint.
# The user's arguments travel as positional parameters ("$@"), never spliced into a command string.
# --cpus-per-task again on srun: newer SLURM no longer passes sbatch's value on to job steps.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" bash -c 'exec "$ACCELERATE" launch \
  --config_file launch/multi_node.yaml \
  --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
  --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  "$STAGE/run.py" "$@"' bash "$@"
