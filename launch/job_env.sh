# shellcheck shell=bash
# Sourced by the sbatch scripts: strict mode, the python environment, a banner, MASTER_ADDR/PORT.
#
#   CMKD_ROOT  the repository (default: the directory sbatch was called from)
#   CMKD_VENV  the python environment to activate (default: $CMKD_ROOT/.venv)
set -euo pipefail

log() { echo "[cmkd $(date +%T)] $*"; }
die() {
    echo "[cmkd $(date +%T)] error: $*" >&2
    exit 2
}

CMKD_ROOT=${CMKD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
CMKD_VENV=${CMKD_VENV:-$CMKD_ROOT/.venv}
export CMKD_ROOT CMKD_VENV
[[ -f $CMKD_VENV/bin/activate ]] \
    || die "no python environment at $CMKD_VENV: set CMKD_VENV=/path/to/venv (or create .venv)"
# shellcheck source=/dev/null
source "$CMKD_VENV/bin/activate"
export PYTHONUNBUFFERED=1  # log lines reach the job log as they happen

log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
    "'${SLURM_JOB_NAME:-?}' attempt $((${SLURM_RESTART_COUNT:-0} + 1))" \
    "on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-1} tasks, python $(command -v python), cwd $PWD"

# MASTER_ADDR = the first node of the job, by its NodeAddr (its host name on most clusters;
# 127.0.0.1 for the virtual nodes of cluster_up.sh, whose names do not resolve).
# MASTER_PORT = 20000 + job id mod 20000 unless set (same rule as cmkd_scale.dist).
export_master() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    MASTER_ADDR=${MASTER_ADDR:-${addr:-$first}}
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    log "rendezvous at $MASTER_ADDR:$MASTER_PORT (first node $first)"
}
