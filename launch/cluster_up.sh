#!/usr/bin/env bash
# Start a real single-machine SLURM cluster: munge + slurmctld + one slurmd per virtual node.
#
# For the launch/ tests and for users who want to try the sbatch scripts on a workstation.
# Needs root (daemons, apt). Installs the Debian packages when missing:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#
# Usage:   launch/cluster_up.sh            then   export SLURM_CONF=$CMKD_SLURM_DIR/etc/slurm.conf
#          launch/cluster_down.sh          (stops everything this script started)
#
# Settings (environment variables):
#   CMKD_SLURM_DIR        state dir: config, spool, logs, pid files    [/tmp/cmkd-slurm]
#   CMKD_SLURM_NODES      number of virtual nodes node[1-N]             [2]
#   CMKD_SLURM_CPUS       CPUs declared per virtual node (may oversubscribe the host) [2]
#   CMKD_SLURM_CTLD_PORT  slurmctld port                                [16817]
#   CMKD_SLURM_NODE_PORT  slurmd port of node1; nodeK listens on PORT+K-1 [17001]
#   CMKD_SLURM_TIMEOUT    seconds to wait for the nodes to become idle [60]
#   CMKD_SLURM_CRED_EXPIRE  step credential lifetime; a requeued job waits this long   [10]
#                         before it starts again (SLURM's default is 120)
#
# Everything lives in the state dir (a private munged socket included), so the cluster does
# not touch a system SLURM or munge. Starting it again restarts it from a clean state.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/slurm_lib.sh
source "$here/slurm_lib.sh"

nodes="${CMKD_SLURM_NODES:-2}"
cpus="${CMKD_SLURM_CPUS:-2}"
ctld_port="${CMKD_SLURM_CTLD_PORT:-16817}"
node_port="${CMKD_SLURM_NODE_PORT:-17001}"
timeout="${CMKD_SLURM_TIMEOUT:-60}"
cred_expire="${CMKD_SLURM_CRED_EXPIRE:-10}"

[[ $(id -u) -eq 0 ]] || die "cluster_up.sh must run as root (it starts munged, slurmctld, slurmd)"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "CMKD_SLURM_NODES must be a positive integer, got '$nodes'"
[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "CMKD_SLURM_CPUS must be a positive integer, got '$cpus'"

install_packages() {
    local missing=0 tool
    for tool in munged slurmctld slurmd sinfo sbatch; do
        command -v "$tool" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is not available;" \
        "install slurmctld slurmd slurm-client munge with your package manager"
    log "installing slurmctld slurmd slurm-client munge (apt)"
    local pkgs=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$dir/log/apt.log" 2>&1; then
        apt-get update >>"$dir/log/apt.log" 2>&1 || true
        apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$dir/log/apt.log" 2>&1 \
            || die "apt-get install ${pkgs[*]} failed; see $dir/log/apt.log"
    fi
}

write_config() {
    local host mem_mb last_port
    host="$(hostname -s)"
    # Each slurmd sees the whole host; declare an equal share so that no node is drained.
    mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / nodes))
    last_port=$((node_port + nodes - 1))
    cat >"$dir/etc/slurm.conf" <<CONF
# Written by launch/cluster_up.sh: a single-machine cluster with $nodes virtual nodes.
ClusterName=cmkd
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=$cred_expire
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the declared CPUs/memory (the virtual nodes share one host).
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible for a few seconds; sbatch --wait then polls every 2 s.
MinJobAge=4
KillWait=10
# Schedule pending (e.g. requeued) jobs every 2 s instead of every 60 s.
SchedulerParameters=batch_sched_delay=0,sched_interval=2
NodeName=node[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=$node_port-$last_port CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    install -d -o munge -g munge -m 0755 "$dir/munge"
    # munged refuses to run as root; the package's key is readable by the munge user.
    runuser -u munge -- /usr/sbin/munged \
        --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" \
        || die "munged did not start; see $dir/munge/munged.log"
}

start_slurm() {
    local k
    /usr/sbin/slurmctld -c -f "$dir/etc/slurm.conf" \
        || die "slurmctld did not start; see $dir/log/slurmctld.log"
    for ((k = 1; k <= nodes; k++)); do
        mkdir -p "$dir/spool/node$k"
        /usr/sbin/slurmd -f "$dir/etc/slurm.conf" -N "node$k" \
            || die "slurmd node$k did not start; see $dir/log/slurmd-node$k.log"
    done
}

wait_idle() {
    local deadline=$((SECONDS + timeout)) idle
    while ((SECONDS < deadline)); do
        idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l)
        ((idle == nodes)) && return 0
        sleep 0.5
    done
    sinfo -N 2>&1 || true
    die "the $nodes nodes did not become idle within ${timeout}s; see $dir/log/"
}

if cluster_running; then
    log "a cluster is already running from $dir; restarting it from a clean state"
fi
"$here/cluster_down.sh"
rm -rf "${dir:?}"/{state,spool,run}
mkdir -p "$dir"/{etc,state,spool,run,log}
install_packages
write_config
export SLURM_CONF="$dir/etc/slurm.conf"
start_munge
start_slurm
wait_idle
printf 'export SLURM_CONF=%s\n' "$SLURM_CONF" >"$dir/env.sh"
log "cluster up: $nodes nodes x $cpus CPUs, state in $dir"
sinfo -N
cat <<MSG

Use it from this shell with:
    export SLURM_CONF=$SLURM_CONF        # or: source $dir/env.sh
Stop it with:
    ${CMKD_SLURM_DIR:+CMKD_SLURM_DIR=$dir }$here/cluster_down.sh
MSG
