#!/usr/bin/env bash
# Submit the parallel GoPro sharding: a job array of N parts, then the merge job (afterok on the whole
# array) that checks every part and writes OUT/manifest.json.
#
#   infra/slurm/submit_shards.sh --parts N --src GOPRO_Large --out GOPRO_shards [shard_gopro.py flags]
#
# Extra sbatch options for both submissions: GOLF_SBATCH_ARGS (e.g. "--partition=cpu --time=2:00:00").
# Prints the two job ids ("array JOBID", "merge JOBID"); the merge job's id is the one to wait on or
# chain a training job to (--dependency=afterok:MERGE). Run from the repository root.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ] || [ "${1:-}" != --parts ] || [ $# -lt 2 ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  case "${1:-}" in -h|--help) exit 0 ;; *) exit 2 ;; esac
fi
parts=$2
shift 2
[[ "$parts" =~ ^[1-9][0-9]*$ ]] || { echo "error: --parts must be a positive number (got '$parts')" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC2086  # GOLF_SBATCH_ARGS is a list of words on purpose
array=$(sbatch --parsable ${GOLF_SBATCH_ARGS:-} --array=0-$((parts - 1)) "$here/shard.sbatch" "$@")
array=${array%%;*}
# shellcheck disable=SC2086
merge=$(sbatch --parsable ${GOLF_SBATCH_ARGS:-} --dependency=afterok:"$array" --job-name=golf-shard-merge \
  --output=golf-shard-merge-%j.log "$here/shard.sbatch" --merge --num-parts "$parts" "$@")
echo "array ${array}"
echo "merge ${merge%%;*}"
