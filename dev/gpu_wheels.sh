#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, packed for the device tool's calls. Run HERE, before a GPU
# session (it needs the package index; that machine reaches nothing).
#
#   dev/gpu_wheels.sh [--out DIR] [--max-carry-mib N]
#
# That machine: Python 3.12 (/opt/torch/.venv, plain `python3`) with torch 2.11.0+cu130,
# torchaudio, timm, numpy, scipy, scikit-learn, pyyaml, psutil, nvidia-ml-py, onnx... but not
# DALI, DeepSpeed, soundfile and their needs. Each device `run` carries at most 64 MiB (working
# tree included), so the 190 MiB DALI wheel travels in pieces over several calls:
#   1. download every wheel below (cp312, manylinux x86_64, --no-deps, exact versions) into
#      DIR/full (default .gpu_wheels/full, ignored by .gitignore); DeepSpeed has no wheel on
#      PyPI and is built here from its sdist (pure Python: py3-none-any);
#   2. check each wheel's Requires-Dist (markers for CPython 3.12 on Linux): every need is
#      carried, or on the device (DEVICE_HAS), or deliberately left out (NOT_CARRIED); else exit 1;
#   3. pack DIR/call1 .. DIR/callN, each < --max-carry-mib (default 55), the DALI wheel cut into
#      byte pieces; every call folder holds the same manifest.tsv (sha256 of wheels and pieces);
#   4. print the `run` calls to issue back to back (the machine stays warm only 30 s after a
#      call): bench/gpu_check.sh --wheels gathers the pieces there and installs them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/.gpu_wheels"
MAX_CARRY_MIB=55
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift ;;
        --max-carry-mib) MAX_CARRY_MIB="$2"; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        *) echo "gpu_wheels: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
PY="$ROOT/.venv/bin/python"
if [[ ! -x "$PY" ]]; then
    echo "gpu_wheels: $PY missing: install the project venv first (README)" >&2
    exit 1
fi

# NAME==VERSION: pins from pyproject.toml, else the version the project venv runs (CI's set).
# The needs of each were read from the wheels' Requires-Dist and checked against the device's
# package list (device tool docs, KINDS.md, 2026-11-17); step 2 re-checks them on every run.
WHEELS=(
    nvidia-dali-cuda130==2.4.0  # pyproject pin: the data pipeline (cmkd_scale.data.pipeline)
    astunparse==1.6.3           # DALI (autograph, imported with nvidia.dali)
    gast==0.7.0                 # DALI (autograph)
    optree==0.20.0              # DALI
    makefun==1.16.0             # DALI
    nvtx==0.2.17                # DALI (the Python nvtx package, not nvidia-nvtx)
    libcst==1.9.0               # DALI
    deepspeed==0.19.8           # pyproject pin: cmkd_scale.train.engine (built here from the sdist)
    hjson==3.1.0                # DeepSpeed
    pydantic==2.14.4            # DeepSpeed (its config classes)
    pydantic-core==2.50.5       # pydantic (exact pair)
    annotated-types==0.8.0      # pydantic
    typing-inspection==0.4.5    # pydantic
    soundfile==0.14.0           # data.members, data.reference, synth, prep (bundles libsndfile)
    soxr==1.1.0                 # prep's resampler (the GPU tests' shards come from prep)
    cffi==2.1.1                 # soundfile
    pycparser==3.12             # cffi
    typing-extensions==4.16.0   # pydantic(-core) need >= 4.16.0; the device's version is unknown
    # mlflow's client: tests/tracking/test_local.py holds a gpu test (the trainer imports
    # mlflow only with tracking.enabled=true, through cmkd_scale.tracking.remote)
    mlflow-skinny==3.17.2       # pyproject: mlflow>=3.17,<3.18 (its client part)
    protobuf==7.36.2            # mlflow's generated code; the device's version is unknown
    cachetools==7.3.3           # mlflow
    databricks-sdk==0.162.0     # mlflow
    google-auth==2.63.0         # databricks-sdk
    pyasn1-modules==0.4.2       # google-auth
    pyasn1==0.6.5               # pyasn1-modules
    cryptography==50.0.2        # google-auth
    fastapi==0.165.0            # mlflow
    starlette==1.10.0           # mlflow, fastapi
    uvicorn==0.54.0             # mlflow
    gitpython==3.2.1            # mlflow
    gitdb==4.0.12               # gitpython
    smmap==5.0.3                # gitdb
    importlib-metadata==9.1.0   # mlflow
    opentelemetry-api==1.45.2   # mlflow
    opentelemetry-proto==1.45.2 # mlflow
    opentelemetry-sdk==1.45.2   # mlflow
    opentelemetry-semantic-conventions==0.66b2  # opentelemetry-sdk
    python-dotenv==1.2.4        # mlflow
    sqlparse==0.6.1             # mlflow
)
# On the device already (names from its package list; only those our wheels ask for).
DEVICE_HAS="numpy packaging six wheel pyyaml einops msgpack ninja psutil py-cpuinfo torch tqdm
setuptools anyio click cloudpickle requests certifi urllib3 h11 annotated-doc zipp idna"
# Asked for by a carried wheel but not carried, and why that is safe for gpu_check.sh.
declare -A NOT_CARRIED=(
    [nvidia-nvimgcodec-cu13]="DALI's image decoders dlopen it on first use; audio never does"
    [nvidia-libnvcomp-cu13]="DALI's nvCOMP operators dlopen it on first use; not used here"
)
# Project dependencies gpu_check.sh does not import (left on this side on purpose):
#   webdataset (tests only), av (prep's m4a/aac fallback; the check makes wav/flac), mlflow's
#   server side (sqlalchemy, alembic, flask...), playwright, efficientnet-pytorch (CPU tests),
#   numba + llvmlite (60 MiB: only the CPU graph's fused kernel; without numba the CPU graph
#   falls back to DALI ops, and bench_loader.py records which one it measured).

say() { echo "[gpu_wheels] $*"; }
# pip, without its warnings about this machine's configured local index folders
pip_quiet() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor" >&2); }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

FULL="$OUT/full"
mkdir -p "$FULL"
binary=()
for spec in "${WHEELS[@]}"; do [[ $spec == deepspeed==* ]] || binary+=("$spec"); done

# 1. download (pip skips files already there) and build DeepSpeed's wheel
say "downloading ${#binary[@]} wheels for CPython 3.12 manylinux x86_64 into $FULL"
pip_quiet download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$FULL" "${binary[@]}"
if ! compgen -G "$FULL/deepspeed-0.19.8-*.whl" > /dev/null; then
    say "building deepspeed==0.19.8 from its sdist (pure Python, ~40 s)"
    DS_BUILD_OPS=0 pip_quiet wheel -q --no-deps --no-build-isolation -w "$FULL" deepspeed==0.19.8
fi
ds_wheel=$(compgen -G "$FULL/deepspeed-0.19.8-*.whl" | head -1)
[[ $ds_wheel == *-py3-none-any.whl ]] || { say "FAIL: $ds_wheel is not pure Python"; exit 1; }

# 2. one wheel per spec, nothing else, every Requires-Dist accounted for
NOT_CARRIED_NAMES="${!NOT_CARRIED[*]}"
"$PY" - "$FULL" "$DEVICE_HAS" "$NOT_CARRIED_NAMES" "${WHEELS[@]}" <<'EOF'
"""Check the folder holds exactly the listed wheels and that each one's needs are met."""
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, device_has, not_carried, *specs = sys.argv[1:]
device_has = {canonicalize_name(n) for n in device_has.split()}
not_carried = {canonicalize_name(n) for n in not_carried.split()}
wanted = {canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in specs}
env = default_environment() | {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}
carried, problems = {}, []
for whl in sorted(Path(folder).glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(whl.name)
    if name not in wanted or str(version) != wanted[name]:
        problems.append(f"{whl.name}: not in the list (delete it, or add it to WHEELS)")
        continue
    carried[name] = (version, whl)
problems += [f"{n}=={v}: no wheel downloaded" for n, v in wanted.items() if n not in carried]
for name, (_, whl) in sorted(carried.items()):
    with zipfile.ZipFile(whl) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(zf.read(meta).decode())
    for line in headers.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another platform / Python
        need = canonicalize_name(req.name)
        if need in carried:
            if not req.specifier.contains(carried[need][0], prereleases=True):
                problems.append(f"{whl.name} needs {req}, carried {carried[need][0]}")
            where = "carried"
        elif need in device_has:
            where = "on the device"
        elif need in not_carried:
            where = "NOT carried (see NOT_CARRIED)"
        else:
            problems.append(f"{whl.name} needs {req}: carry it, or list it in DEVICE_HAS")
            continue
        print(f"  {name:<22} needs {str(req):<44} {where}")
for p in problems:
    print(f"FAIL: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
for name in "${!NOT_CARRIED[@]}"; do say "not carried: $name: ${NOT_CARRIED[$name]}"; done

# 3. pack the calls: small wheels whole in call1, the DALI wheel in pieces filling every call
tree_bytes=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } |
    xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
max_bytes=$(( MAX_CARRY_MIB * 1048576 ))
if (( tree_bytes + max_bytes > 64 * 1048576 )); then
    say "FAIL: working tree $(mib "$tree_bytes") MiB + carry $MAX_CARRY_MIB MiB > 64 MiB per call"
    exit 1
fi
dali=$(compgen -G "$FULL/nvidia_dali_cuda130-2.4.0-*.whl" | head -1)
dali_bytes=$(stat -c %s "$dali")
small_bytes=0
for whl in "$FULL"/*.whl; do
    [[ $whl == "$dali" ]] || small_bytes=$(( small_bytes + $(stat -c %s "$whl") ))
done
total=$(( dali_bytes + small_bytes ))
calls=$(( (total + max_bytes - 1) / max_bytes ))
per_call=$(( (total + calls - 1) / calls ))
say "$(mib "$total") MiB in all -> $calls calls of <= $(mib "$per_call") MiB"

rm -rf "$OUT"/call*
manifest="$(mktemp)"
trap 'rm -f "$manifest"' EXIT
printf '# cmkd_scale GPU wheels (dev/gpu_wheels.sh): kind name sha256 bytes call\n' > "$manifest"
printf 'calls\t%s\n' "$calls" >> "$manifest"
mkdir -p "$OUT/call1"
for whl in "$FULL"/*.whl; do
    [[ $whl == "$dali" ]] && continue
    cp "$whl" "$OUT/call1/"
    printf 'wheel\t%s\t%s\t%s\tcall1\n' "$(basename "$whl")" \
        "$(sha256sum "$whl" | cut -d' ' -f1)" "$(stat -c %s "$whl")" >> "$manifest"
done
printf 'wheel\t%s\t%s\t%s\tpieces\n' "$(basename "$dali")" \
    "$(sha256sum "$dali" | cut -d' ' -f1)" "$dali_bytes" >> "$manifest"
offset=0
for (( k = 1; k <= calls; k++ )); do
    room=$per_call
    (( k == 1 )) && room=$(( per_call - small_bytes ))
    (( offset + room > dali_bytes )) && room=$(( dali_bytes - offset ))
    piece="$OUT/call$k/$(basename "$dali").piece$k"
    mkdir -p "$OUT/call$k"
    dd if="$dali" of="$piece" bs=1M iflag=skip_bytes,count_bytes skip="$offset" count="$room" \
        status=none
    printf 'piece\t%s\t%s\t%s\tcall%s\n' "$(basename "$piece")" \
        "$(sha256sum "$piece" | cut -d' ' -f1)" "$room" "$k" >> "$manifest"
    offset=$(( offset + room ))
done
(( offset == dali_bytes )) || { say "FAIL: pieces cover $offset of $dali_bytes bytes"; exit 1; }
chmod 644 "$manifest"
for (( k = 1; k <= calls; k++ )); do cp "$manifest" "$OUT/call$k/manifest.tsv"; done

# 4. the calls, with what each carries
say "working tree that travels with every call: $(mib "$tree_bytes") MiB"
rel="${OUT#"$ROOT"/}"
for (( k = 1; k <= calls; k++ )); do
    bytes=$(du -sb "$OUT/call$k" | cut -f1)
    (( bytes <= max_bytes )) || { say "FAIL: call$k holds $(mib "$bytes") MiB"; exit 1; }
    if (( k < calls )); then
        cmd="bash bench/gpu_check.sh --wheels $rel --receive-only"
        timeout=60
    else
        cmd="bash bench/gpu_check.sh --wheels $rel --budget-s 480 --train-steps 60 --max-probes 3"
        cmd+=" --out \$OUT/gpu_check.json"
        timeout=540
    fi
    say "call $k/$calls: carry $(mib "$bytes") MiB (+ tree $(mib "$tree_bytes") MiB)"
    echo "  run(carry=[\"$rel/call$k\"], timeout_s=$timeout, command=\"$cmd\")"
done
say "issue them back to back: a gap over 30 s gives the machine back and loses the pieces;"
say "then give_back at once; the results are gpu_check.json and .log under the reply's files_at"
