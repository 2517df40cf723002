#!/bin/bash
# Prepare a large archive's plane tensors as a SLURM job array: task I of N prepares shard I/N
# into CACHE/shards/I-of-N (shards never share a file), then one dependent job merges them.
# Submit from the repository root, with the manifest written by `orthodiff scan`:
#   MANIFEST=runs/manifest.parquet CACHE=runs/cache sbatch --array=1-16 pretrain/slurm_prepare.sh
#   MANIFEST=runs/manifest.parquet CACHE=runs/cache sbatch --dependency=afterok:<JOBID> \
#       --wrap "orthodiff prepare runs/manifest.parquet --out runs/cache --merge -c reference"
# A resubmitted task resumes: finished series are skipped, changed sources are prepared again.
#SBATCH --job-name=orthodiff-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${CONFIG:-reference}
: "${MANIFEST:?set MANIFEST to the manifest written by orthodiff scan}"
: "${CACHE:?set CACHE to the cache folder}"
COUNT=${SLURM_ARRAY_TASK_COUNT:?submit with --array=1-N}
export OMP_NUM_THREADS=1
mkdir -p logs

orthodiff prepare "$MANIFEST" --out "$CACHE" -c "$CONFIG" \
    --workers "$SLURM_CPUS_PER_TASK" --shard "$SLURM_ARRAY_TASK_ID/$COUNT" "$@"
