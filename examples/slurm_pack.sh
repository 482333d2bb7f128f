#!/usr/bin/env bash
# Pack a dataset with a Slurm job array: N array tasks each run `pack-dataset --part I/N`, then one dependent job
# runs `stoker merge`, which writes manifest.json only if every part is present and every shard verifies.
#
#   bash examples/slurm_pack.sh SRC DST N [extra pack-dataset options...]
#   bash examples/slurm_pack.sh s3://raw/imagenet/train s3://packed/imagenet-train 64 --max-side 512
#
# Run it on a login node: it submits itself twice (the array, then the merge after the array succeeds).
# SRC and DST must be reachable from every node: fsspec URLs (S3 credentials in the environment), or paths
# on a shared filesystem. A failed or preempted task is simply resubmitted: a part resumes from its finished
# shards, and rerunning a finished part changes nothing. Rerun the merge job by hand if it ran too early.
#SBATCH --job-name=stoker-pack
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=stoker-pack-%A_%a.out

set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 SRC DST N [pack-dataset options...]" >&2
  exit 2
fi
SRC=$1 DST=$2 N=$3
shift 3

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Every part plans from the full listing of SRC. For millions of objects, list once and share the list:
  #   python -c "import sys; from stoker.formats import listing as l; l.write_file_list(sys.argv[2], l.list_tree(sys.argv[1]))" SRC files.txt
  #   STOKER_FILES_LIST=$PWD/files.txt bash examples/slurm_pack.sh SRC DST N
  LIST="${STOKER_FILES_LIST:-}"
  EXTRA=()
  if [[ -n "$LIST" ]]; then
    EXTRA=(--files-from "$LIST")
  fi
  array=$(sbatch --parsable --array="0-$((N - 1))" "$0" "$SRC" "$DST" "$N" "${EXTRA[@]}" "$@")
  sbatch --dependency="afterok:${array}" --job-name=stoker-merge --cpus-per-task=4 \
    --export=ALL,STOKER_MERGE=1 "$0" "$SRC" "$DST" "$N"
  echo "submitted array job ${array} (${N} parts) and its merge"
  exit 0
fi

if [[ -n "${STOKER_MERGE:-}" ]]; then
  exec stoker merge "$DST"
fi

# One part per array task, using this task's CPUs; --quiet keeps progress bars out of the log files.
exec pack-dataset "$SRC" "$DST" --part "${SLURM_ARRAY_TASK_ID}/${N}" --workers "${SLURM_CPUS_PER_TASK:-1}" --quiet "$@"
