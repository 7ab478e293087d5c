#!/usr/bin/env bash
# Run an MLflow tracking server that training jobs on the cluster log to.
#
# Usage:
#   launch/mlflow_server.sh              run in the foreground (a tmux pane, a service, a job)
#   launch/mlflow_server.sh --daemon     start in the background, wait until it answers,
#                                        print the MLFLOW_TRACKING_URI to export
#   launch/mlflow_server.sh --stop       stop the one --daemon started (same CMKD_MLFLOW_DIR)
#
# Settings (environment variables):
#   CMKD_MLFLOW_DIR        state dir: default SQLite db, artifacts, log, pid    [$PWD/mlflow-server]
#   CMKD_MLFLOW_BACKEND    run store: sqlite:///PATH (one host, modest load) or
#                          postgresql://USER:PASS@HOST:5432/DB (needs psycopg2-binary)
#                                                                   [sqlite:///$DIR/mlflow.db]
#   CMKD_MLFLOW_ARTIFACTS  artifact store the server proxies: a shared-storage path or
#                          s3://BUCKET/PREFIX (needs boto3 + AWS_* credentials)  [$DIR/artifacts]
#   CMKD_MLFLOW_HOST       bind address; 0.0.0.0 lets compute nodes reach it     [0.0.0.0]
#   CMKD_MLFLOW_PORT       port                                                  [5000]
#   CMKD_MLFLOW_WORKERS    server processes (SQLite: keep 1; Postgres: 4 or more) [1 / 4]
#   CMKD_MLFLOW_ALLOWED_HOSTS  Host headers accepted (MLflow refuses others: DNS-rebinding
#                          guard)      [this host's names, localhost, 127.0.0.1, private IPs]
#
# MLflow has no authentication here: bind it to a network only the cluster can reach.
set -euo pipefail

dir="${CMKD_MLFLOW_DIR:-$PWD/mlflow-server}"
backend="${CMKD_MLFLOW_BACKEND:-sqlite:///$dir/mlflow.db}"
artifacts="${CMKD_MLFLOW_ARTIFACTS:-$dir/artifacts}"
host="${CMKD_MLFLOW_HOST:-0.0.0.0}"
port="${CMKD_MLFLOW_PORT:-5000}"
python="${CMKD_PYTHON:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python}"
[[ -x $python ]] || python=python3
short="$(hostname -s)"
full="$(hostname -f 2>/dev/null || hostname)"
allowed_default="$short,$short:$port,$full,$full:$port,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
allowed="${CMKD_MLFLOW_ALLOWED_HOSTS:-$allowed_default,10.*,192.168.*,172.*}"
pidfile="$dir/mlflow-server.pid"
logfile="$dir/mlflow-server.log"

die() {
    echo "mlflow_server.sh: $*" >&2
    exit 1
}

case "$backend" in
sqlite:*) workers="${CMKD_MLFLOW_WORKERS:-1}" ;;
postgresql:* | postgresql+*)
    workers="${CMKD_MLFLOW_WORKERS:-4}"
    "$python" -c "import psycopg2" 2>/dev/null ||
        die "a Postgres backend needs psycopg2: $python -m pip install psycopg2-binary"
    ;;
*) workers="${CMKD_MLFLOW_WORKERS:-1}" ;;
esac
if [[ $artifacts == s3://* ]]; then
    "$python" -c "import boto3" 2>/dev/null ||
        die "an s3:// artifact store needs boto3: $python -m pip install boto3"
fi

stop_daemon() {
    [[ -f $pidfile ]] || die "no $pidfile: nothing started with --daemon in $dir"
    local pid
    pid="$(cat "$pidfile")"
    kill -TERM -- "-$pid" 2>/dev/null || true # the server and its workers: one process group
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    rm -f "$pidfile"
    echo "mlflow server $pid stopped"
}

mkdir -p "$dir"
[[ $artifacts == *://* ]] || mkdir -p "$artifacts"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
cmd=("$python" -m mlflow server
    --backend-store-uri "$backend"
    --artifacts-destination "$artifacts"
    --host "$host" --port "$port" --workers "$workers"
    --allowed-hosts "$allowed")

case "${1:-}" in
"") exec "${cmd[@]}" ;;
--stop) stop_daemon ;;
--daemon)
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "already running (pid $(cat "$pidfile")); stop it with --stop"
    fi
    setsid "${cmd[@]}" >>"$logfile" 2>&1 &
    echo $! >"$pidfile"
    url="http://127.0.0.1:$port/health"
    for _ in $(seq 1 240); do
        if "$python" -c "import urllib.request as u; u.urlopen('$url', timeout=2)" 2>/dev/null; then
            echo "mlflow server up (pid $(cat "$pidfile"), log $logfile)"
            echo "export MLFLOW_TRACKING_URI=http://$short:$port"
            exit 0
        fi
        kill -0 "$(cat "$pidfile")" 2>/dev/null || die "server exited; see $logfile"
        sleep 0.5
    done
    die "not answering after 120 s; see $logfile"
    ;;
*) die "unknown argument '$1' (use no argument, --daemon or --stop)" ;;
esac
