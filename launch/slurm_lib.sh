# shellcheck shell=bash
# Helpers shared by cluster_up.sh and cluster_down.sh (sourced, not run).

dir="${CMKD_SLURM_DIR:-/tmp/cmkd-slurm}"
[[ $dir == /* && $dir != / ]] || {
    echo "cmkd-slurm: CMKD_SLURM_DIR must be an absolute path other than /, got '$dir'" >&2
    exit 2
}

log() { echo "cmkd-slurm: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# True while PID runs; a killed daemon lingers as a zombie (state Z) until reaped: not alive.
pid_alive() {
    local pid=$1 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

pid_from() {
    [[ -s $1 ]] && tr -dc '0-9' <"$1"
}

# Every pid file this cluster writes: slurmctld, one slurmd per node, munged.
pid_files() {
    local f
    for f in "$dir"/run/*.pid "$dir"/munge/munged.pid; do
        [[ -e $f ]] && echo "$f"
    done
    return 0
}

cluster_running() {
    local f pid
    while read -r f; do
        pid=$(pid_from "$f") && pid_alive "$pid" && return 0
    done < <(pid_files)
    return 1
}

# SIGTERM, wait up to $2 seconds (default 15), then SIGKILL; returns once the pid is gone.
stop_pid() {
    local pid=$1 name=$2 grace=${3:-15} deadline
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if pid_alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for ${grace}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while pid_alive "$pid"; do sleep 0.2; done
    fi
}
