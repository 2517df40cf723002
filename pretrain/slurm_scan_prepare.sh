#!/bin/bash
# Scan (and prepare) a large archive on a SLURM cluster as job arrays. Each array task scans
# 1/N of the archive's top-level folders (patients or exams) on every core it is given, a
# dependent job merges the shard manifests and errors files, then pretrain/slurm_prepare.sh
# prepares 1/N of the merged manifest's series per task and a last job merges the cache.
# Submit from the repository root:
#   ARCHIVE=/data/knee-archive N=16 bash pretrain/slurm_scan_prepare.sh          # scan, merge, prepare
#   ARCHIVE=/data/knee-archive N=16 PREPARE=0 bash pretrain/slurm_scan_prepare.sh # scan and merge only
# Outputs (OUT, default runs): manifest.shardI.parquet, manifest.parquet, manifest.errors.csv, cache/.
# A failed shard is rerun alone: sbatch --array=I pretrain/slurm_scan_prepare.sh scan
#SBATCH --job-name=orthodiff-scan
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

ARCHIVE=${ARCHIVE:?set ARCHIVE to the archive folder}
N=${N:-16}
OUT=${OUT:-runs}
CONFIG=${CONFIG:-reference}
PREPARE=${PREPARE:-1}
export ARCHIVE N OUT CONFIG PREPARE
export OMP_NUM_THREADS=1  # the process pools supply the parallelism
mkdir -p logs "$OUT"

case "${1:-submit}" in
  submit)
    scan_job=$(sbatch --parsable --array=1-"$N" "$0" scan)
    merge_job=$(sbatch --parsable --dependency=afterok:"$scan_job" --cpus-per-task=2 --job-name=orthodiff-merge "$0" merge)
    echo "scan array $scan_job, merge $merge_job"
    if [ "$PREPARE" = "1" ]; then
      prepare_job=$(MANIFEST="$OUT/manifest.parquet" CACHE="$OUT/cache" \
        sbatch --parsable --array=1-"$N" --dependency=afterok:"$merge_job" pretrain/slurm_prepare.sh)
      cache_job=$(sbatch --parsable --dependency=afterok:"$prepare_job" --cpus-per-task=2 --job-name=orthodiff-cache-merge \
        --output="logs/%x-%j.out" --wrap "orthodiff prepare $OUT/manifest.parquet --out $OUT/cache --merge -c $CONFIG")
      echo "prepare array $prepare_job, cache merge $cache_job"
    fi
    ;;
  scan)
    python -m orthodiff scan "$ARCHIVE" --out "$OUT/manifest.shard${SLURM_ARRAY_TASK_ID}.parquet" \
      --shard "${SLURM_ARRAY_TASK_ID}/$N" --workers "${SLURM_CPUS_PER_TASK:-1}"
    ;;
  merge)
    shards=()
    for i in $(seq 1 "$N"); do shards+=("$OUT/manifest.shard$i.parquet"); done
    python -m orthodiff scan --merge "${shards[@]}" --out "$OUT/manifest.parquet"
    ;;
  *)
    echo "usage: $0 [submit|scan|merge]" >&2
    exit 2
    ;;
esac
