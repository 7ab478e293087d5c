#!/usr/bin/env bash
# Stop the single-machine SLURM cluster started by cluster_up.sh (same CMKD_SLURM_DIR).
#
# Cancels the remaining jobs, then stops slurmd (each node), slurmctld and the private munged,
# each by the pid file it wrote, and waits until every process is gone (a killed daemon lingers
# as a zombie for a few seconds; it counts as gone). Logs stay in $CMKD_SLURM_DIR/log.
# Safe to run when nothing is running.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/slurm_lib.sh
source "$here/slurm_lib.sh"

cancel_jobs() {
    local deadline
    export SLURM_CONF="$dir/etc/slurm.conf"
    [[ -f $SLURM_CONF ]] || return 0
    pid_alive "$(pid_from "$dir/run/slurmctld.pid" || echo 0)" || return 0
    [[ -n $(squeue -h -o %A 2>/dev/null) ]] || return 0
    log "cancelling the remaining jobs"
    squeue -h -o %A | xargs -r scancel --full 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
}

cancel_jobs
stopped=0
for f in "$dir"/run/slurmd-*.pid "$dir"/run/slurmctld.pid "$dir"/munge/munged.pid; do
    [[ -e $f ]] || continue
    pid=$(pid_from "$f") || true
    name=$(basename "$f" .pid)
    if [[ -n $pid ]] && pid_alive "$pid"; then
        stop_pid "$pid" "$name"
        stopped=$((stopped + 1))
    fi
    rm -f "$f"
done
((stopped == 0)) || log "stopped $stopped daemons (state dir $dir)"
