#!/usr/bin/env bash
# GPU proof for cmkd_scale, one script, < 10 minutes on one H100/H200:
#   1. install from the project's files (python3.11 -m venv, pip install -e '.[dev]'), unless
#      the venv already imports the stack (--install auto, the default);
#   2. pytest -m gpu tests/        (DALI GPU pipeline parity with kaldi.fbank, GPU loaders)
#   3. features CLI --device gpu vs kaldi.fbank on generated 10 s clips;
#   4. bf16 ZeRO-2 KD-AST (AST-B/16 stride 10, 1024x128, EfficientNet-B2 teacher) on generated
#      shards through the real Trainer step: bench/bench_train.py (~450 micro-steps in all:
#      clean, without teacher, split-timed, plain-PyTorch reference) + largest micro batch;
#   5. projection of full-AudioSet epoch time from those figures;
#   6. one results file (bench/results/gpu_check.json, log next to it), PASS/FAIL per target:
#      KD-AST MFU >= 45 %, data wait < 5 %, features within 0.05 of kaldi.fbank.
#
#   bench/gpu_check.sh [--dry-run] [--venv DIR] [--install auto|always|never]
#                      [--wheelhouse DIR] [--out FILE]
# --dry-run runs the same steps on the CPU at toy sizes (how the script is tested without a
# GPU). --wheelhouse installs offline from a folder of wheels (pip --no-index --find-links).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY_RUN=0
VENV="$ROOT/.venv"
INSTALL=auto
WHEELHOUSE=""
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --venv) VENV="$2"; shift ;;
        --install) INSTALL="$2"; shift ;;
        --wheelhouse) WHEELHOUSE="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$INSTALL" in auto|always|never) ;; *) echo "gpu_check: --install auto|always|never" >&2; exit 2 ;; esac

if [[ -z "$OUT" ]]; then
    if [[ $DRY_RUN == 1 ]]; then OUT="bench/results/gpu_check_dry.json"; else OUT="bench/results/gpu_check.json"; fi
fi
LOG="${OUT%.json}.log"
STEPS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
TIMINGS="$STEPS_DIR/timings.tsv"
trap 'rm -rf "$STEPS_DIR"' EXIT
mkdir -p "$(dirname "$OUT")"
: > "$LOG"
: > "$TIMINGS"
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
if [[ $DRY_RUN == 1 ]]; then export DS_ACCELERATOR=cpu; fi

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# run_step NAME TIMEOUT_S CMD...: run, log, record seconds and exit code; never aborts the script
run_step() {
    local name="$1" limit="$2" start rc
    shift 2
    say "step $name: $*"
    start=$(date +%s)
    set +e
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - start ))" "$rc" >> "$TIMINGS"
    say "step $name: exit $rc after $(( $(date +%s) - start )) s"
    return 0
}

stack_imports() {
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c "import torch, nvidia.dali, deepspeed, timm, cmkd_scale" 2>/dev/null
}

if [[ $INSTALL == always ]] || { [[ $INSTALL == auto ]] && ! stack_imports; }; then
    pip_args=(-q)
    if [[ -n "$WHEELHOUSE" ]]; then pip_args+=(--no-index --find-links "$WHEELHOUSE"); fi
    [[ -x "$VENV/bin/python" ]] || run_step venv 120 python3.11 -m venv "$VENV"
    run_step install 420 "$VENV/bin/python" -m pip install "${pip_args[@]}" -e '.[dev]'
else
    say "install: $VENV already imports the stack (--install always reinstalls)"
fi
PY="$VENV/bin/python"
"$PY" -c "import cmkd_scale" || { say "FAIL: $VENV cannot import cmkd_scale"; exit 1; }

if [[ $DRY_RUN == 0 ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        say "FAIL: torch sees no CUDA GPU (use --dry-run to test the script on a CPU)"
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG" || true
    DEVICE=gpu
    TRAIN_ARGS=(--size full --steps 100 --warmup 20 --max-probes 4)
    PARITY_ARGS=(--clips 8 --clip-s 10)
    PROJECT_ARGS=()
    LIMIT=(150 120 420 120)  # seconds per step: gpu_tests parity train projection
else
    DEVICE=cpu
    TRAIN_ARGS=(--size dry --steps 2 --warmup 1 --max-probes 2 --mem-cap-gib 3)
    PARITY_ARGS=(--clips 2 --clip-s 3)
    PROJECT_ARGS=(--measure-clips 8)  # used only when bench/results/loader.json is absent
    LIMIT=(600 600 1800 600)  # 2 shared CPU cores: imports alone can take a minute
fi

run_step gpu_tests "${LIMIT[0]}" "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider \
    --junitxml="$STEPS_DIR/gpu_tests.xml"
run_step feature_parity "${LIMIT[1]}" "$PY" bench/_feature_parity.py --device "$DEVICE" \
    "${PARITY_ARGS[@]}" --out "$STEPS_DIR/feature_parity.json"
run_step train "${LIMIT[2]}" "$PY" bench/bench_train.py "${TRAIN_ARGS[@]}" --cases kd_ast \
    --stages 2 --search --out "$STEPS_DIR/train.json"
run_step projection "${LIMIT[3]}" "$PY" bench/project.py --train "$STEPS_DIR/train.json" \
    "${PROJECT_ARGS[@]}" --out "$STEPS_DIR/projection.json"

report_args=(--steps-dir "$STEPS_DIR" --timings "$TIMINGS" --out "$OUT")
if [[ $DRY_RUN == 1 ]]; then report_args+=(--dry-run); fi
set +e
"$PY" bench/_gpu_check_report.py "${report_args[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
set -e
say "log: $LOG"
exit "$rc"
