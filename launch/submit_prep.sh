#!/usr/bin/env bash
# Submit prep as a K-task job array plus the dependent finalize job; prints both job ids.
#
# Usage: launch/submit_prep.sh K PREP_ARGS...        (PREP_ARGS as for python -m cmkd_scale.prep;
#                                                      they must include --out DIR)
# Environment:
#   CMKD_LOG_DIR      where the job logs go (created; default logs)
#   CMKD_SBATCH_ARGS  extra sbatch options for both jobs, e.g. "--partition=cpu --time=4:00:00"
#   CMKD_WAIT=1       wait for the finalize job; exit with its exit code (sbatch --wait)
# The finalize job runs only if every array task succeeded (afterok); if one fails it is
# cancelled instead of waiting forever (--kill-on-invalid-dep=yes).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage="usage: $0 K --segments CSV --class-labels CSV --audio-dir DIR --out DIR [prep options]"
(($# >= 2)) || { echo "$usage" >&2; exit 2; }
tasks=$1
shift
[[ $tasks =~ ^[1-9][0-9]*$ ]] || { echo "K must be a positive integer, got '$tasks'; $usage" >&2; exit 2; }

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --out) out=${args[i + 1]:-} ;;
        --out=*) out=${args[i]#--out=} ;;
    esac
done
[[ -n $out ]] || { echo "PREP_ARGS need --out DIR (finalize reads it); $usage" >&2; exit 2; }

log_dir=${CMKD_LOG_DIR:-logs}
mkdir -p "$log_dir"
read -r -a extra <<<"${CMKD_SBATCH_ARGS:-}"
export CMKD_ROOT=${CMKD_ROOT:-$(dirname "$here")}

array_id=$(sbatch --parsable "${extra[@]}" --array="0-$((tasks - 1))" \
    --output="$log_dir/%x-%A_%a.out" "$here/prep.sbatch" "$@")
echo "prep array: job $array_id ($tasks tasks), logs $log_dir/cmkd-prep-${array_id}_*.out"
echo "finalize: submitting, afterok:$array_id, log $log_dir/cmkd-prep-finalize-<id>.out"
finalize=(sbatch --parsable "${extra[@]}" --dependency="afterok:$array_id"
    --kill-on-invalid-dep=yes --output="$log_dir/%x-%j.out")
if [[ ${CMKD_WAIT:-0} != 1 ]]; then
    "${finalize[@]}" "$here/prep_finalize.sbatch" --out "$out"
    exit 0
fi
rc=0
final_id=$("${finalize[@]}" --wait "$here/prep_finalize.sbatch" --out "$out") || rc=$?
echo "$final_id"
# sbatch --wait says 0 for a job cancelled before it ran (an array task failed): ask its state.
state=$(scontrol show job "$final_id" 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true)
if [[ -n $state && $state != JobState=COMPLETED ]]; then
    echo "finalize job $final_id ended with $state: a prep task failed; see $log_dir/cmkd-prep-${array_id}_*.out" >&2
    exit 1
fi
exit "$rc"
