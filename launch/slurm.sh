#!/usr/bin/env bash
# Multi-node pretraining under SLURM: one task per node, accelerate starts one process per GPU.
#   sbatch launch/slurm.sh --config configs/pretrain/vit_b16_mpp.yaml run.out_dir=runs/b16
# Time limits: 5 minutes before the limit SLURM sends SIGUSR1 to this script, which passes it on to
# every training process: they finish the optimizer step, save one checkpoint together and exit (75).
# The script then requeues the job, and run.resume=auto (the default) continues from that checkpoint.
# A run that completed, or failed without the warning, is not requeued. `scancel --batch
# --signal=USR1 JOBID` does the same by hand (checkpoint now, requeue).
#SBATCH --job-name=vit-mpp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300  # B: this script only; it decides who gets the signal (see node_task)
#SBATCH --open-mode=append  # a requeued job adds to its log instead of truncating it
set -euo pipefail
# One process per GPU SLURM gave each node (follows `sbatch --gpus-per-node=N` overrides).
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
STAGE=${STAGE:-pretrain}
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # not `| head -n 1`: with pipefail, SIGPIPE fails it
MASTER_ADDR=${HOSTS%%$'\n'*}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # two jobs on one node do not collide
ACCELERATE=${ACCELERATE:-$(pwd)/.venv/bin/accelerate}  # the project's environment, not whatever is on PATH
export GPUS_PER_NODE STAGE MASTER_ADDR MASTER_PORT ACCELERATE

# The exit status of background process $1. A trapped signal cuts `wait` short (status > 128)
# while $1 still runs; then wait again. The last `wait` returns the status bash recorded for $1.
wait_for() {
  while wait "$1"; (($? > 128)) && kill -0 "$1" 2>/dev/null; do :; done
  wait "$1"
}

# What srun runs on every node. `accelerate launch` (torch's elastic agent) dies of SIGUSR1 by
# default, and when told to handle it, it exits 1 even after a clean finish; so it inherits SIGUSR1
# ignored, and this shell passes the signal on to the agent's children, the training processes,
# which set their own handler. Exit status: accelerate's, 0 only when every training process
# exited 0 (it turns any other worker status, 75 included, into 1).
node_task() {
  trap '' USR1
  "$ACCELERATE" launch --config_file launch/multi_node.yaml \
    --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))" \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    "$STAGE/run.py" "$@" &
  local launcher=$!
  trap "pkill -USR1 -P $launcher || true" USR1
  wait_for "$launcher"
}

# The user's arguments travel as positional parameters ("$@"), never spliced into a command string;
# the command string holds only the two functions above.
# --cpus-per-task again on srun: newer SLURM no longer passes sbatch's value on to job steps.
# Never SIGTERM srun: it turns that into SIGKILL for every task ("forcing job termination").
warned=0
trap 'warned=1; if [[ -n ${step:-} ]]; then kill -USR1 "$step" || true; fi' USR1  # srun forwards it to its tasks
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  bash -c "$(declare -f wait_for node_task)"'; node_task "$@"' bash "$@" &
step=$!
status=0
wait_for "$step" || status=$?
if ((warned && status != 0)); then  # stopped at the warning: the checkpoint is saved (a finished run exits 0)
  echo "slurm.sh: time limit near; training stopped at a checkpoint (status $status); requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
