#!/bin/bash
# Prepare a large archive's plane tensors as a SLURM job array: task I of N prepares shard I/N
# into CACHE/shards/I-of-N (shards never share a file), then one dependent job merges them.
# Submit from the repository root, with the manifest written by `orthodiff scan`:
#   MANIFEST=runs/manifest.parquet CACHE=runs/cache sbatch --array=1-16 pretrain/slurm_prepare.sh
#   MANIFEST=runs/manifest.parquet CACHE=runs/cache sbatch --array=1-16 pretrain/slurm_prepare.sh \
#       data.slab=fit "data.series.description_regex=PD FS"     # key=value overrides, kept whole
#   MANIFEST=runs/manifest.parquet CACHE=runs/cache sbatch --dependency=afterok:<JOBID> \
#       --wrap "orthodiff prepare runs/manifest.parquet --out runs/cache --merge -c reference"  # + the same overrides
# A resubmitted task resumes: finished series are skipped, changed sources are prepared again.
# Each task's output goes to <job name>-<array job id>_<task>.out in the submit directory (SLURM
# opens it before the script runs, so it cannot be in a folder the script would create).
#SBATCH --job-name=orthodiff-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${CONFIG:-reference}
: "${MANIFEST:?set MANIFEST to the manifest written by orthodiff scan}"
: "${CACHE:?set CACHE to the cache folder}"
COUNT=${SLURM_ARRAY_TASK_COUNT:?submit with --array=1-N}
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=1  # the process pool supplies the parallelism
# SLURM 22.05 and later no longer hand --cpus-per-task from sbatch to srun
export SRUN_CPUS_PER_TASK=$CPUS

srun --ntasks=1 orthodiff prepare "$MANIFEST" --out "$CACHE" -c "$CONFIG" \
    --workers "$CPUS" --shard "$SLURM_ARRAY_TASK_ID/$COUNT" "$@"
