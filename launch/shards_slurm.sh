#!/usr/bin/env bash
# Shards on a SLURM array: each array task writes its share of the shards (vit-shards reads
# SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT), and the last task to finish writes index.json.
#   sbatch --array=0-63 launch/shards_slurm.sh --source /data/imagenet21k --split train --resize 256 \
#       --samples-per-shard 1000 --out /shared/shards/in21k-train
# Any contiguous --array range (or one with a step) works; a `%8` throttle too. The output is the
# same bytes for any number of tasks. Requeue-safe: a task that is preempted, requeued or run again
# (the same command, or `sbatch --array=5` for task 5 alone) keeps the shards it finished and writes
# the rest. Training refuses the folder, naming the tasks still missing, until every task is done.
#SBATCH --job-name=vit-shards
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append  # a requeued task adds to its log instead of truncating it
set -euo pipefail
PYTHON=${PYTHON:-$(pwd)/.venv/bin/python}  # the project's environment, not whatever is on PATH
# One encoding process per CPU SLURM gave the task; a --workers among the arguments comes later and wins.
exec "$PYTHON" -m vitcore.data.shards --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
