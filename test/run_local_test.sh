#!/usr/bin/env bash
# Local container test, as challenge participants run one before submitting: segment the
# bundled sample (test/sample/input) the way the platform runs the container, then compare
# with the expected output (test/expected_output).
#
#   test/run_local_test.sh [--weights DIR] [--expected DIR] [--regenerate] [--emulate]
#                          [--workdir DIR] [--venv DIR] [--no-int8]
#
# As the platforms run it (SHINY-ICARUS: 1 GB /dev/shm, no network, read-only /input; Grand
# Challenge: 16 GiB of memory, an empty /tmp). With a Docker engine (`docker info` answers) it
# builds the image and runs it with --network none --cap-drop ALL --security-opt
# no-new-privileges --memory 16g --memory-swap 16g --shm-size 1g --tmpfs /tmp (empty),
# /input read-only, and --gpus all where nvidia-smi works.
# Without one (or with --emulate) it reproduces the image's steps: a fresh virtual environment
# from requirements.txt, the files the Dockerfile COPYs in an app folder made read-only, the
# build's int8 stage (the same environment plus requirements-int8.txt, the stage's files,
# python -m train.int8 writing into the app's weights/openvino) and its OpenVINO preparation
# step, a non-root user without capabilities or new
# privileges (setpriv; created with useradd when running as root), no network (unshare -n,
# as root), a read-only input folder (chmod a-w) and a writable output folder passed as
# --input/--output, an empty private TMPDIR, and 16 GiB of address space (ulimit -v: stricter
# than a memory limit, which counts resident memory). A 1 GB /dev/shm needs a mount namespace
# (root tricks): not emulated.
#
# Comparison: the same mask files; each mask with the expected geometry and equal voxels, or
# Dice >= 0.99 (a GPU run and a CPU run differ in floating-point arithmetic, bf16 vs f32, so a
# few voxels at probability ~0.5 may flip); every case "ok" in results.json.
#
# --weights DIR      weights folder to test (default: weights/, env VESSEL_SEG_WEIGHTS)
# --expected DIR     expected masks (default: test/expected_output)
# --regenerate       write the outputs to the expected folder instead of comparing
# --venv DIR         reuse (or create) the emulation's virtual environment there; it must
#                    have been built from the same requirements.txt (the int8 stage's: DIR-int8)
# --no-int8          emulation: skip the int8 stage (minutes for five folds on a small CPU);
#                    the container then runs its float path
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEIGHTS="${VESSEL_SEG_WEIGHTS:-$ROOT/weights}"
EXPECTED="$ROOT/test/expected_output"
SAMPLE="$ROOT/test/sample/input"
IMAGE="vessel-seg:local-test"
USER_NAME="segmenter"
REGENERATE=0
EMULATE=0
WORKDIR=""
VENV=""
INT8=1

while [[ $# -gt 0 ]]; do
    case "$1" in
        --weights) WEIGHTS="$(cd "$2" && pwd)"; shift 2 ;;
        --expected) EXPECTED="$2"; shift 2 ;;
        --regenerate) REGENERATE=1; shift ;;
        --emulate) EMULATE=1; shift ;;
        --workdir) WORKDIR="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --no-int8) INT8=0; shift ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ ! -f "$WEIGHTS/manifest.json" ]]; then
    echo "error: $WEIGHTS has no manifest.json: no trained weights are shipped yet;" \
        "pass --weights DIR (or VESSEL_SEG_WEIGHTS) to test other weights" >&2
    exit 2
fi
if [[ $REGENERATE -eq 0 ]] && ! compgen -G "$EXPECTED/*.nii.gz" > /dev/null; then
    echo "error: no expected masks in $EXPECTED: generate them once with --regenerate" >&2
    exit 2
fi

if [[ -z "$WORKDIR" ]]; then
    WORKDIR="$(mktemp -d -t vessel-seg-local-test.XXXXXX)"
    trap 'rm -rf "$WORKDIR"' EXIT
fi
mkdir -p "$WORKDIR"
chmod 755 "$WORKDIR"
INPUT="$WORKDIR/input"
OUTPUT="$WORKDIR/output"
rm -rf "$INPUT" "$OUTPUT"
mkdir -p "$INPUT" "$OUTPUT"
cp "$SAMPLE"/* "$INPUT/"
chmod -R a-w "$INPUT"
chmod 777 "$OUTPUT"  # the container's non-root user writes here

run_docker() {
    echo "== building $IMAGE"
    docker build --tag "$IMAGE" "$ROOT"
    local options=(--rm --network none --cap-drop ALL --security-opt no-new-privileges
        --memory 16g --memory-swap 16g --shm-size 1g --tmpfs /tmp
        -v "$INPUT:/input:ro" -v "$OUTPUT:/output")
    if nvidia-smi > /dev/null 2>&1; then options+=(--gpus all); fi
    if [[ "$WEIGHTS" != "$ROOT/weights" ]]; then options+=(-v "$WEIGHTS:/opt/app/weights:ro"); fi
    echo "== running $IMAGE"
    docker run "${options[@]}" "$IMAGE"
}

stage_files() {  # SOURCE TARGET of a Dockerfile stage's COPY lines ("" the final stage)
    awk -v want="$1" '/^FROM / { stage = ($(NF - 1) == "AS") ? $NF : "" }
        /^COPY / && stage == want && $2 !~ /^--from/ && $3 !~ /^\// { print $2, $3 }' \
        "$ROOT/Dockerfile"
}

copy_stage() {  # a stage's files, relative to its WORKDIR, into DEST; --weights replaces them
    local stage="$1" dest="$2" source target
    while read -r source target; do
        mkdir -p "$(dirname "$dest/$target")"
        cp -r "$ROOT/$source" "$dest/$target"
    done < <(stage_files "$stage")
    find "$dest" -name __pycache__ -prune -exec rm -rf {} +
    if [[ "$WEIGHTS" != "$ROOT/weights" ]]; then
        rm -rf "$dest/weights"
        cp -r "$WEIGHTS" "$dest/weights"
    fi
}

purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }

run_int8_stage() {  # FROM runtime AS int8: the runtime environment plus requirements-int8.txt
    local runtime="$1" app="$2" stage="$1-int8" build="$WORKDIR/int8-build"
    if ! cmp -s "$ROOT/requirements-int8.txt" "$stage/.installed" 2> /dev/null; then
        echo "== int8 stage environment: $runtime plus requirements-int8.txt in $stage"
        rm -rf "$stage"
        "$(base_python)" -m venv "$stage"
        purelib "$runtime" > "$(purelib "$stage")/runtime.pth"  # the layer below
        if ! "$stage/bin/pip" install --quiet -r "$ROOT/requirements-int8.txt" \
            > "$WORKDIR/pip-int8.log" 2>&1; then
            cat "$WORKDIR/pip-int8.log" >&2
            exit 2
        fi
        cp "$ROOT/requirements-int8.txt" "$stage/.installed"
    fi
    echo "== int8 stage: python -m train.int8 into the app's weights/openvino"
    rm -rf "$build" && mkdir -p "$build"
    copy_stage int8 "$build"
    (cd "$build" && "$stage/bin/python" -m train.int8 weights --output "$app/weights/openvino" \
        --if-present > /dev/null)
    rm -rf "$build"
}

# Runs a command as the unprivileged user, without capabilities or new privileges (root only).
AS_USER=(setpriv --reuid "$USER_NAME" --regid "$USER_NAME" --clear-groups --no-new-privs
    --inh-caps=-all --bounding-set=-all)

base_python() {  # an interpreter the unprivileged user can run (pyenv under /root is not one)
    local candidate
    for candidate in "${LOCAL_TEST_PYTHON:-$(command -v python3)}" /usr/bin/python3; do
        if [[ $(id -u) -ne 0 ]] || "${AS_USER[@]}" "$candidate" -c "" 2> /dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "error: no python3 that user $USER_NAME may run (set LOCAL_TEST_PYTHON)" >&2
    exit 2
}

run_emulated() {
    local venv="${VENV:-$WORKDIR/venv}" app="$WORKDIR/app"
    if [[ $(id -u) -eq 0 ]] && ! id -u "$USER_NAME" > /dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
    fi
    if [[ ! -f "$venv/.installed" ]]; then  # written only after a complete installation
        echo "== virtual environment from requirements.txt in $venv"
        rm -rf "$venv"
        "$(base_python)" -m venv "$venv"
        if ! "$venv/bin/pip" install --quiet -r "$ROOT/requirements.txt" > "$WORKDIR/pip.log" 2>&1
        then
            cat "$WORKDIR/pip.log" >&2
            exit 2
        fi
        cp "$ROOT/requirements.txt" "$venv/.installed"
    elif ! cmp -s "$ROOT/requirements.txt" "$venv/.installed"; then
        echo "error: $venv was built from another requirements.txt; remove it" >&2
        exit 2
    fi
    echo "== app folder $app (read-only)"
    chmod -R u+w "$app" 2> /dev/null || true
    rm -rf "$app"
    mkdir -p "$app"
    copy_stage "" "$app"
    if [[ $INT8 -eq 1 ]]; then run_int8_stage "$venv" "$app"; fi
    (cd "$app" && "$venv/bin/python" -m inference.openvino_backend weights --if-present > /dev/null)
    chmod -R a+rX,a-w "$app"
    local tmp="$WORKDIR/tmp"  # empty, as Grand Challenge's /tmp; the cache path as the image's
    rm -rf "$tmp" && mkdir -p "$tmp" && chmod 1777 "$tmp"
    local command=(env -i "PATH=/usr/bin:/bin" "HOME=$tmp" "TMPDIR=$tmp"
        "VESSEL_SEG_CACHE=$tmp/vessel-seg-cache" "$venv/bin/python" process.py
        --input "$INPUT" --output "$OUTPUT")
    if [[ $(id -u) -eq 0 ]]; then
        command=("${AS_USER[@]}" "${command[@]}")
        if unshare --net true 2> /dev/null; then command=(unshare --net "${command[@]}"); fi
    fi
    echo "== running process.py as $(if [[ $(id -u) -eq 0 ]]; then echo "$USER_NAME"; else id -un; fi)"
    (cd "$app" && ulimit -v $((16 * 1024 * 1024)) && "${command[@]}")
    PYTHON="$venv/bin/python"
}

PYTHON="python3"
if [[ $EMULATE -eq 0 ]] && docker info > /dev/null 2>&1; then
    run_docker
else
    [[ $EMULATE -eq 1 ]] || echo "== no Docker engine answers: emulating the container"
    run_emulated
fi

if [[ $REGENERATE -eq 1 ]]; then
    mkdir -p "$EXPECTED"
    cp "$OUTPUT"/*.nii.gz "$EXPECTED/"
    echo "== expected output regenerated in $EXPECTED"
    exit 0
fi

echo "== comparing $OUTPUT with $EXPECTED"
"$PYTHON" - "$OUTPUT" "$EXPECTED" << 'PYTHON'
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

output, expected = Path(sys.argv[1]), Path(sys.argv[2])
failures = []
report = json.loads((output / "results.json").read_text())
failures += [f"{c['input']}: {c['error']}" for c in report["cases"] if c["status"] != "ok"]
names = sorted(p.name for p in expected.glob("*.nii.gz"))
produced = sorted(p.name for p in output.glob("*.nii.gz"))
if names != produced:
    failures.append(f"mask files differ: expected {names}, produced {produced}")
for name in sorted(set(names) & set(produced)):
    got, want = sitk.ReadImage(str(output / name)), sitk.ReadImage(str(expected / name))
    same_grid = got.GetSize() == want.GetSize() and all(
        np.allclose(f(got), f(want)) for f in (sitk.Image.GetSpacing, sitk.Image.GetOrigin,
                                               sitk.Image.GetDirection))
    if not same_grid:
        failures.append(f"{name}: geometry differs from the expected mask")
        continue
    a, b = sitk.GetArrayFromImage(got) == 1, sitk.GetArrayFromImage(want) == 1
    total = a.sum() + b.sum()
    dice = 1.0 if total == 0 else 2 * (a & b).sum() / total
    equal = np.array_equal(a, b)
    print(f"{name}: {'equal' if equal else f'Dice {dice:.4f}'} ({b.sum()} expected voxels)")
    if not equal and dice < 0.99:
        failures.append(f"{name}: Dice {dice:.4f} < 0.99")
for failure in failures:
    print(f"FAIL {failure}", file=sys.stderr)
print(f"local test {'failed' if failures else 'passed'}: {len(names)} mask(s)")
sys.exit(1 if failures else 0)
PYTHON
