#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run on a GPU machine:
#   1. test/test_cuda.py (skipped on machines without CUDA);
#   2. bench_inference.py --device cuda on a 256^3 phantom: baseline A (MONAI, eager fp32 on the
#      GPU) against the project's CUDA pipeline and its network passes alone;
#   3. the project alone on a 400x512x512 phantom (the size of a clinical 3DRA volume): seconds
#      and peak GPU memory.
# Uses the shipped weights when weights/ holds --folds of them, else fitted random folds of the
# same architecture (timings do not depend on the weights' values). Results go to $OUT (else
# build/gpu): gpu.log (everything printed) and one JSON file per benchmark.
#   bash bench/gpu_checks.sh [--folds 5] [--quick]    # --quick: steps 1 and 2 only
# The windows per call (--batch-size of bench_inference.py) were chosen by a sweep on an H200;
# see inference/torch_backend.py.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu}
python=${PYTHON:-python3}
folds=5
quick=0
while (($#)); do
    case $1 in
        --folds) folds=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
work=$(mktemp -d)
exec > >(tee -a "$out/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
bench() { "$python" bench/bench_inference.py --device cuda --folds "$folds" --patch 48 "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$python" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
"$python" -m pytest -q -p no:cacheprovider test/test_cuda.py
bench --size 256 --sw-batch-size 32 --workdir "$work/256" | tee "$out/bench_256.json"
((quick)) && exit 0
weights=$("$python" -c 'import json, sys; print(json.load(sys.stdin)["weights"])' <"$out/bench_256.json")
bench --shape 400 512 512 --weights "$weights" --only project network_only \
    | tee "$out/bench_400x512x512.json"
