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
export GPUS_PER_NODE=${GPUS_PER_NODE:-8} STAGE=${STAGE:-pretrain}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# run.resume=auto (the default) makes a requeued job continue from its latest checkpoint.
# The user's arguments travel as positional parameters ("$@"), never spliced into a command string.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file launch/multi_node.yaml \
  --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
  --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port 29500 \
  "$STAGE/run.py" "$@"' bash "$@"
