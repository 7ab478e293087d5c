#!/usr/bin/env bash
# GPU proof for cmkd_scale, one script, < 10 minutes on one H100/H200:
#   1. install from the project's files (python3.11 -m venv, pip install -e '.[dev]'), unless
#      the venv already imports the stack (--install auto, the default); or, on the lent GPU
#      machine (--wheels), join and install the wheels dev/gpu_wheels.sh packed;
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
#                      [--wheelhouse DIR] [--out FILE] [--budget-s N]
#                      [--train-steps N (100)] [--max-probes N (4)]
#                      [--python PY] [--wheels DIR [--receive-only] [--stash DIR] [--site DIR]]
# --dry-run runs the same steps on the CPU at toy sizes (how the script is tested without a
# GPU). --wheelhouse installs offline from a folder of wheels (pip --no-index --find-links).
# --budget-s N: the whole check ends within N s (each step's limit is cut to what is left,
# less 30 s for the report), so that its results come back from one device call.
# --train-steps / --max-probes: bench_train's timed micro-steps per phase (warm-up a fifth of
# them) and batch-size probes on the GPU.
# --python PY: run the steps with this interpreter as it is (no venv, no install), e.g. the
# lent machine's python3 (torch 2.11 there). Only the gpu-marked test files whose imports
# it has are run (those needing mlflow, av... are named in the log and left out).
# --wheels DIR (implies --python python3): the folder dev/gpu_wheels.sh filled, arriving one
# callN/ folder per device call: each call gathers what arrived into --stash (default
# /tmp/cmkd_gpu_wheels); --receive-only stops there (the calls before the last). Otherwise,
# once all are there: check sha256, join the DALI pieces, `pip install --no-index --no-deps
# --target` into --site (default /tmp/cmkd_site), and put --site first on every Python's path
# (PYTHONPATH, plus a .pth file for subprocesses that replace PYTHONPATH; removed at exit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY_RUN=0
VENV="$ROOT/.venv"
INSTALL=auto
WHEELHOUSE=""
OUT=""
BUDGET_S=0
PYTHON=""
WHEELS=""
RECEIVE_ONLY=0
STASH=/tmp/cmkd_gpu_wheels
SITE=/tmp/cmkd_site
PTH=""  # the .pth file use_site writes (removed at exit)
TRAIN_STEPS=100
MAX_PROBES=4
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --venv) VENV="$2"; shift ;;
        --install) INSTALL="$2"; shift ;;
        --wheelhouse) WHEELHOUSE="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --budget-s) BUDGET_S="$2"; shift ;;
        --python) PYTHON="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        --receive-only) RECEIVE_ONLY=1 ;;
        --stash) STASH="$2"; shift ;;
        --site) SITE="$2"; shift ;;
        --train-steps) TRAIN_STEPS="$2"; shift ;;
        --max-probes) MAX_PROBES="$2"; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$INSTALL" in auto|always|never) ;; *) echo "gpu_check: --install auto|always|never" >&2; exit 2 ;; esac
if [[ $RECEIVE_ONLY == 1 && -z "$WHEELS" ]]; then
    echo "gpu_check: --receive-only goes with --wheels DIR" >&2; exit 2
fi
if [[ -n "$WHEELS" && -z "$PYTHON" ]]; then PYTHON=python3; fi
START_S=$(date +%s)

# receive_wheels: copy the callN/ folders of $WHEELS that arrived into $STASH, then check the
# stash against the manifest; prints what is missing, returns 1 while something is
receive_wheels() {
    local dir manifest kind name sha bytes where missing=() calls=0
    mkdir -p "$STASH"
    for dir in "$WHEELS"/call*/; do
        if [[ -d "$dir" ]]; then cp -f "$dir"* "$STASH/"; fi
    done
    manifest="$STASH/manifest.tsv"
    if [[ ! -f "$manifest" ]]; then
        echo "gpu_check: no $WHEELS/callN/manifest.tsv arrived: carry $WHEELS/callN (made by" \
            "bench/gpu_wheels.sh here) in this call" >&2
        return 1
    fi
    while IFS=$'\t' read -r kind name sha bytes where; do
        case "$kind" in
            calls) calls="$name" ;;
            piece|wheel)
                [[ $where == pieces ]] && continue
                if [[ ! -f "$STASH/$name" ]] || [[ $(stat -c %s "$STASH/$name") != "$bytes" ]]; then
                    missing+=("$where")
                fi ;;
        esac
    done < "$manifest"
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
    echo "gpu_check: wheels: $(( calls - ${#missing[@]} )) of $calls calls' files held in $STASH"
    if (( ${#missing[@]} > 0 )); then
        echo "gpu_check: still to come: ${missing[*]} (each call carries $WHEELS/callN; if an" \
            "earlier one is listed, the machine went back between calls: start again at call 1)"
        return 1
    fi
}

if [[ -n "$WHEELS" ]]; then
    if [[ $RECEIVE_ONLY == 1 ]]; then receive_wheels || true; exit 0; fi
    receive_wheels || { echo "gpu_check: FAIL: wheels incomplete, nothing was run" >&2; exit 1; }
fi

if [[ -z "$OUT" ]]; then
    if [[ $DRY_RUN == 1 ]]; then OUT="bench/results/gpu_check_dry.json"; else OUT="bench/results/gpu_check.json"; fi
fi
LOG="${OUT%.json}.log"
STEPS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
TIMINGS="$STEPS_DIR/timings.tsv"
trap 'rm -rf "$STEPS_DIR"; [[ -z "$PTH" ]] || rm -f "$PTH"' EXIT
mkdir -p "$(dirname "$OUT")"
: > "$LOG"
: > "$TIMINGS"
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
if [[ $DRY_RUN == 1 ]]; then export DS_ACCELERATOR=cpu; fi

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# run_step NAME TIMEOUT_S CMD...: run, log, record seconds and exit code; never aborts the script
run_step() {
    local name="$1" limit="$2" start rc left
    shift 2
    if (( BUDGET_S > 0 )); then
        left=$(( START_S + BUDGET_S - 30 - $(date +%s) ))
        if (( left < 10 )); then
            say "step $name: not run, --budget-s $BUDGET_S is spent"
            printf '%s\t0\t124\n' "$name" >> "$TIMINGS"
            return 0
        fi
        if (( left < limit )); then limit=$left; fi
    fi
    say "step $name (limit ${limit} s): $*"
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

# install_wheels: join the DALI pieces, check every sha256, pip install all into $SITE (once
# per manifest: a rerun on the still-warm machine skips it)
install_wheels() {
    local kind name sha bytes where wheel="" pieces=() stamp
    stamp="$(sha256sum < "$STASH/manifest.tsv" | cut -d' ' -f1)"
    if [[ -f "$SITE/.cmkd_wheels" && $(cat "$SITE/.cmkd_wheels") == "$stamp" ]]; then
        echo "wheels of this manifest already installed in $SITE"
        return 0
    fi
    rm -rf "$STASH/whl" && mkdir -p "$STASH/whl"
    while IFS=$'\t' read -r kind name sha bytes where; do
        case "$kind" in
            wheel)
                if [[ $where == pieces ]]; then wheel="$name"
                else ln -f "$STASH/$name" "$STASH/whl/"; fi ;;
            piece) pieces+=("$STASH/$name") ;;
        esac
    done < "$STASH/manifest.tsv"
    if [[ -n "$wheel" ]]; then cat "${pieces[@]}" > "$STASH/whl/$wheel"; fi
    while IFS=$'\t' read -r kind name sha bytes where; do
        if [[ $kind == wheel ]]; then echo "$sha  $STASH/whl/$name"; fi
    done < "$STASH/manifest.tsv" | sha256sum --quiet -c - || {
        echo "sha256 mismatch: a piece was cut short in transfer; run all the calls again" >&2
        return 1
    }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$STASH"/whl/*.whl || return 1
    echo "$stamp" > "$SITE/.cmkd_wheels"
    echo "installed $(find "$STASH/whl" -name '*.whl' | wc -l) wheels into $SITE"
}

# use_site: every Python sees $SITE first; DALI finds cuFFT in the interpreter's nvidia libs
use_site() {
    local purelib libs
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    purelib=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # tests/fixtures/train.py starts the trainer with PYTHONPATH=<repo> only
    if printf 'import sys; sys.path.insert(0, "%s")\n' "$SITE" > "$purelib/cmkd_gpu_site.pth"; then
        PTH="$purelib/cmkd_gpu_site.pth"
    else
        say "WARN: $purelib is read-only: subprocesses that reset PYTHONPATH will miss $SITE"
    fi
    # DALI's RUNPATH looks for libcufft next to itself ($SITE/nvidia/cu13/lib: absent)
    libs=$("$PY" -c "import glob, os, sys; print(':'.join(sorted({d for p in sys.path for d in
        glob.glob(os.path.join(p, 'nvidia', '*', 'lib')) if not d.startswith('$SITE')})))")
    if [[ -n "$libs" ]]; then
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
}

if [[ -n "$PYTHON" ]]; then
    PY="$(command -v "$PYTHON")" || { say "FAIL: --python $PYTHON not found"; exit 1; }
    if [[ -n "$WHEELS" ]]; then
        say "step install_wheels: join, check and install into $SITE"
        start=$(date +%s)
        set +e
        install_wheels 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        set -e
        printf 'install_wheels\t%s\t%s\n' "$(( $(date +%s) - start ))" "$rc" >> "$TIMINGS"
        say "step install_wheels: exit $rc after $(( $(date +%s) - start )) s"
        (( rc == 0 )) || { say "FAIL: the wheels did not install (see above)"; exit 1; }
        use_site
    fi
    say "python: $PY (as it is: no venv, no install)"
elif [[ $INSTALL == always ]] || { [[ $INSTALL == auto ]] && ! stack_imports; }; then
    pip_args=(-q)
    if [[ -n "$WHEELHOUSE" ]]; then pip_args+=(--no-index --find-links "$WHEELHOUSE"); fi
    [[ -x "$VENV/bin/python" ]] || run_step venv 120 python3.11 -m venv "$VENV"
    run_step install 420 "$VENV/bin/python" -m pip install "${pip_args[@]}" -e '.[dev]'
    PY="$VENV/bin/python"
else
    say "install: $VENV already imports the stack (--install always reinstalls)"
    PY="$VENV/bin/python"
fi
"$PY" -c "import cmkd_scale" || { say "FAIL: $PY cannot import cmkd_scale"; exit 1; }
set +e
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
"""The stack's versions, or what is missing."""
import importlib
import importlib.metadata as md
import sys

STACK = {
    "torch": "torch",
    "torchaudio": "torchaudio",
    "nvidia.dali": "nvidia-dali-cuda130",
    "deepspeed": "deepspeed",
    "timm": "timm",
    "soundfile": "soundfile",
    "numpy": "numpy",
}
found, missing = [], []
for mod, dist in STACK.items():
    try:  # every missing piece is reported, then the check stops
        importlib.import_module(mod)
        found.append(f"{dist} {md.version(dist)}")
    except Exception as exc:
        missing.append(f"{mod}: {type(exc).__name__}: {exc}")
print(f"stack: Python {sys.version.split()[0]}; " + ", ".join(found))
for m in missing:
    print(f"FAIL: cannot import {m}")
sys.exit(1 if missing else 0)
EOF
rc=${PIPESTATUS[0]}
set -e
(( rc == 0 )) || { say "FAIL: $PY lacks part of the stack (see above)"; exit 1; }

if [[ $DRY_RUN == 0 ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        say "FAIL: torch sees no CUDA GPU (use --dry-run to test the script on a CPU)"
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG" || true
    export DS_ACCELERATOR=cuda  # tests/conftest.py defaults it to cpu
    DEVICE=gpu
    TRAIN_ARGS=(--size full --steps "$TRAIN_STEPS" --warmup $(( (TRAIN_STEPS + 4) / 5 ))
        --max-probes "$MAX_PROBES")
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

GPU_TESTS=(tests/)
if [[ -n "$PYTHON" ]]; then
    # the gpu-marked files whose imports (and their tests/ helpers') this python has
    mapfile -t marked < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
    mapfile -t GPU_TESTS < <("$PY" - "$LOG" "${marked[@]}" <<'EOF'
"""Print the test files this interpreter can import; log the others with what they lack."""
import ast
import importlib.util
import sys
from pathlib import Path

sys.path[:0] = ["."]


def lacks(path: Path, seen: set[Path]) -> set[str]:
    """Top-level modules imported by path (and by the tests.* modules it imports) not found."""
    seen.add(path)
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            local = Path(*name.split(".")).with_suffix(".py")
            if name.startswith("tests.") and local.is_file():
                out |= set() if local in seen else lacks(local, seen)
            elif importlib.util.find_spec(name.split(".")[0]) is None:
                out.add(name.split(".")[0])
    return out


def registered() -> list[Path]:
    """The fixture modules tests/conftest.py registers for every test (its pytest_plugins)."""
    for node in ast.parse(Path("tests/conftest.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "pytest_plugins":
            names = ast.literal_eval(node.value)
            return [Path(*n.split(".")).with_suffix(".py") for n in names]
    return []


log, files = sys.argv[1], sys.argv[2:]
with open(log, "a") as fh:
    for f in files:
        missing = set().union(lacks(Path(f), set()), *(lacks(p, set()) for p in registered()))
        if missing:
            print(f"gpu_tests: {f} left out: {sys.executable} lacks {sorted(missing)}", file=fh)
        else:
            print(f)
EOF
)
    if [[ ${#GPU_TESTS[@]} == 0 ]]; then
        say "gpu_tests: no gpu-marked file imports here; running them all to show why"
        GPU_TESTS=("${marked[@]}")
    fi
    say "gpu_tests: ${GPU_TESTS[*]}"
fi
run_step gpu_tests "${LIMIT[0]}" "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" -q -p no:cacheprovider \
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
