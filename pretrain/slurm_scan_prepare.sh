#!/bin/bash
# Scan (and prepare) a large archive on a SLURM cluster as job arrays. Each array task scans
# 1/N of the archive's top-level folders (patients or exams) on every core it is given, a
# dependent job merges the shard manifests and errors files, then pretrain/slurm_prepare.sh
# prepares 1/N of the merged manifest's series per task and a last job merges the cache.
# Submit from the repository root:
#   ARCHIVE=/data/knee-archive N=16 bash pretrain/slurm_scan_prepare.sh          # scan, merge, prepare
#   ARCHIVE=/data/knee-archive N=16 PREPARE=0 bash pretrain/slurm_scan_prepare.sh # scan and merge only
#   ARCHIVE=/data/knee-archive bash pretrain/slurm_scan_prepare.sh submit data.slab=fit \
#       "data.series.description_regex=PD FS"   # key=value overrides for prepare and its merge, kept whole
# Outputs (OUT, default runs): manifest.shardI.parquet, manifest.parquet, manifest.errors.csv, cache/.
# A failed shard is rerun alone: sbatch --array=I pretrain/slurm_scan_prepare.sh scan
# Each job's output goes to <job name>-<job id>.out (array tasks: <job name>-<array job id>_<task>.out)
# in the submit directory: SLURM opens it before the script runs, so it cannot be in a folder the
# script would create.
#SBATCH --job-name=orthodiff-scan
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

ARCHIVE=${ARCHIVE:?set ARCHIVE to the archive folder}
N=${N:-16}
OUT=${OUT:-runs}
CONFIG=${CONFIG:-reference}
PREPARE=${PREPARE:-1}
export ARCHIVE N OUT CONFIG PREPARE
export OMP_NUM_THREADS=1  # the process pools supply the parallelism
# SLURM 22.05 and later no longer hand --cpus-per-task from sbatch to srun
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
mkdir -p "$OUT"

step=${1:-submit}
shift || true  # what follows the step: key=value overrides for prepare, passed on as they are ("$@")
case "$step" in
  submit)
    scan_job=$(sbatch --parsable --array=1-"$N" "$0" scan)
    merge_job=$(sbatch --parsable --dependency=afterok:"$scan_job" --cpus-per-task=2 --job-name=orthodiff-merge \
      --output=%x-%j.out "$0" merge)
    echo "scan array $scan_job, merge $merge_job"
    if [ "$PREPARE" = "1" ]; then
      prepare_job=$(MANIFEST="$OUT/manifest.parquet" CACHE="$OUT/cache" \
        sbatch --parsable --array=1-"$N" --dependency=afterok:"$merge_job" pretrain/slurm_prepare.sh "$@")
      cache_job=$(sbatch --parsable --dependency=afterok:"$prepare_job" --cpus-per-task=2 \
        --job-name=orthodiff-cache-merge --output=%x-%j.out "$0" merge-cache "$@")
      echo "prepare array $prepare_job, cache merge $cache_job"
    fi
    ;;
  scan)
    srun --ntasks=1 python -m orthodiff scan "$ARCHIVE" --out "$OUT/manifest.shard${SLURM_ARRAY_TASK_ID}.parquet" \
      --shard "${SLURM_ARRAY_TASK_ID}/$N" --workers "${SLURM_CPUS_PER_TASK:-1}"
    ;;
  merge)
    shards=()
    for i in $(seq 1 "$N"); do shards+=("$OUT/manifest.shard$i.parquet"); done
    srun --ntasks=1 python -m orthodiff scan --merge "${shards[@]}" --out "$OUT/manifest.parquet"
    ;;
  merge-cache)
    srun --ntasks=1 python -m orthodiff prepare "$OUT/manifest.parquet" --out "$OUT/cache" --merge -c "$CONFIG" "$@"
    ;;
  *)
    echo "usage: $0 [submit|scan|merge|merge-cache] [key=value ...]" >&2
    exit 2
    ;;
esac
