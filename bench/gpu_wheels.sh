#!/usr/bin/env bash
# The wheels a GPU machine without PyPI lacks, for the GPU scripts to carry (build/wheels, their
# default $WHEELS): the repository's pins of SimpleITK, cc3d and MONAI, and Flower with the
# dependencies such an image seldom holds, for CPython $PYTHON_VERSION (3.12) on x86-64 Linux.
# Each wheel is rewritten with LZMA compression, which pip reads like any wheel: SimpleITK
# shrinks from 53 to 29 MB, the whole set from 89 to 54 MB, so that it travels with the
# repository within a 64 MiB transfer (the shipped weights and parked checkpoints stay behind).
#   bash bench/gpu_wheels.sh [DIR]                       # default build/wheels
#   PACKAGES="SimpleITK connected-components-3d monai" bash bench/gpu_wheels.sh  # gpu_checks.sh
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
target=${1:-build/wheels}
version=${PYTHON_VERSION:-3.12}
python=${PYTHON:-python3}
# Flower's dependencies that a CUDA image (torch, JAX, the usual scientific stack) lacks.
flower_dependencies="alembic Mako cryptography cffi pycparser fastapi pydantic pydantic_core
    annotated-types typing-inspection starlette grpcio grpcio-health-checking protobuf iterators
    prompt_toolkit wcwidth pycryptodome SQLAlchemy greenlet tomli tomli_w uvicorn typer rich
    pathspec packaging typing_extensions"
packages=${PACKAGES:-SimpleITK connected-components-3d monai flwr $flower_dependencies}
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
pin() {  # NAME==VERSION from the requirements, else from this environment
    local name=$1 line
    line=$(grep -ihE "^${name//[-_]/[-_]}(\[[a-z]*\])?==" requirements*.txt | head -1)
    line=${line%%#*}  # the comment
    [[ -n $line ]] && { echo "${line/\[*\]/}" | tr -d ' '; return; }
    "$python" -m pip freeze 2>/dev/null | grep -iE "^${name//[-_]/[-_]}==" | head -1
}
for name in $packages; do
    spec=$(pin "$name")
    [[ -n $spec ]] || { echo "gpu_wheels.sh: no pin for $name" >&2; exit 2; }
    platforms=()
    for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
        manylinux_2_34 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "$version" "${platforms[@]}" -d "$download" "$spec" \
        || { echo "gpu_wheels.sh: no wheel of $spec for CPython $version" >&2; exit 2; }
done
mkdir -p "$target"
"$python" - "$target" "$download"/*.whl <<'EOF'
import sys
import zipfile
from pathlib import Path

for source in map(Path, sys.argv[2:]):
    target = Path(sys.argv[1]) / source.name
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_LZMA) as new:
        for info in old.infolist():
            new.writestr(info, old.read(info), compress_type=zipfile.ZIP_LZMA)
    print(f"{target}: {source.stat().st_size / 1e6:.1f} -> {target.stat().st_size / 1e6:.1f} MB")
EOF
du -sh "$target"
