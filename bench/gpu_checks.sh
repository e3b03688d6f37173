#!/usr/bin/env bash
# The checks that need a CUDA GPU, on a GPU machine that has Python and torch, in parts that each
# fit a 10-minute call on an H200 (measured 2026-11-30: one 400x512x512 case takes A 39 s,
# A' 18 s at its best sw_batch_size, the project 18 s; each contender also segments it once
# untimed, and A' once more per sw_batch_size tried):
#   --part targets   (about 6 min) 0. the packages: the machine's own where present, else the
#      carried wheels (bench/gpu_packages.sh); 1. test/test_cuda.py; 2. bench_inference.py
#      --device cuda on one $SHAPE phantom (400x512x512, a clinical 3DRA volume), $FOLDS folds
#      (5), overlap 0.5, --tune: baseline A (MONAI, eager fp32, the reference row), A' (MONAI
#      warmed up, cuDNN autotuned, bf16 autocast (fp16 on pre-Ampere GPUs), channels-last, the
#      best sw_batch_size of 16/32/64/128), the project's CUDA pipeline and its network passes
#      alone; seconds, ratios, mask Dice, peak GPU memory; then the summary (4.);
#   --part folder    (about 5 min) 0.; 3. a folder of $CASES (4) such phantoms end to end: A' at
#      $SW (part targets prints its best; default 32), the project through process.py's folder
#      path, and the network alone, so that the end-to-end / network ratio shows any CPU work
#      the GPU waits on; then the summary (4.);
#   --part extras    (about 4 min) 0.; the project with --deterministic in two processes (its
#      cost, bit-identical masks), and 5. bench_graphs.py: torch.compile and CUDA graphs against
#      eager on the fixed batch shape ($GRAPHS names the contenders);
#   --part all (the default) runs the three in one go, for a machine without a call limit.
# The summary (4.) checks the targets (project >= 2x A', end to end <= 1.15x the network alone,
# peak GPU memory <= 12 GB) and estimates a T4's time from the measured FLOP rate.
# Every contender is set up and warmed up (one untimed pass over the first case) before its
# timed run. Uses the shipped weights when weights/ holds $FOLDS of them, else fitted random
# folds of the same architecture (timings do not depend on the weights' values). Results go to
# $OUT (else build/gpu): gpu.log (everything printed) and one JSON file per benchmark.
#   bash bench/gpu_checks.sh --part targets
#   SW=32 bash bench/gpu_checks.sh --part folder
# CPU dry run of the plumbing (no A'; B instead):
#   DEVICE=cpu SHAPE="64 64 64" CASES=2 FOLDS=1 bash bench/gpu_checks.sh
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-build/gpu}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
shape=${SHAPE:-400 512 512}
cases=${CASES:-4}
folds=${FOLDS:-5}
part=all
while (($#)); do
    case $1 in
        --folds) folds=$2; shift 2 ;;
        --part) part=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case $part in
    all | targets | folder | extras) ;;
    *) echo "gpu_checks.sh: --part is all, targets, folder or extras, not $part" >&2; exit 2 ;;
esac
runs() { [[ $part == all || $part == "$1" ]]; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${WORK:-$(mktemp -d)}
exec > >(tee -a "$out/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
name=$(echo "$shape" | tr ' ' x)

# 0. Packages: the machine's own where present, else the carried wheels.
# shellcheck source=bench/gpu_packages.sh
source bench/gpu_packages.sh
packages torch numpy scipy SimpleITK safetensors cc3d tqdm monai skimage PIL pytest || exit 2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA:",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
bench() { "$python" bench/bench_inference.py --device "$device" --folds "$folds" "$@"; }

# 1. The CUDA tests. 2. One volume: A, A' tuned, the project, the network alone.
reports=()
weights_option=()
if runs targets; then
    "$python" -m pytest -q -p no:cacheprovider test/test_cuda.py
    # shellcheck disable=SC2086  # $shape is three numbers
    bench --shape $shape --cases 1 --tune --only monai_torch monai_torch_tuned monai_openvino \
        project network_only --workdir "$work/one" | tee "$out/bench_$name.json" || exit 3
    reports+=("$out/bench_$name.json")
    SW=${SW:-$("$python" -c 'import json, sys
rows = json.load(sys.stdin)
print(rows.get("monai_torch_tuned", rows.get("monai_openvino", {})).get("sw_batch_size", 32))' \
        <"$out/bench_$name.json")}
    weights_option=(--weights "$("$python" -c 'import json, sys
print(json.load(sys.stdin)["weights"])' <"$out/bench_$name.json")")
    echo "A' best sw_batch_size: $SW (SW=$SW for --part folder)"
fi

# 3. A folder of cases end to end.
if runs folder; then
    tuned=monai_torch_tuned
    [[ $device == cpu ]] && tuned=monai_openvino
    # shellcheck disable=SC2086
    bench --shape $shape --cases "$cases" "${weights_option[@]}" --sw-batch-size "${SW:-32}" \
        --only "$tuned" project network_only --workdir "$work/folder" \
        | tee "$out/bench_${name}_cases$cases.json" || exit 3
    reports+=("$out/bench_${name}_cases$cases.json")
fi

# 4. The summary against the targets, and a T4 estimate.
((${#reports[@]})) && "$python" - "${reports[@]}" <<'EOF' | tee "$out/summary.json"
import json, math, sys

from inference.sliding_window import WindowPlan
from model.weights import load_manifest

FLOP_PER_VOXEL = 116e3  # the full-width network, per voxel of a window
T4_TFLOPS = 65.0  # T4 fp16 tensor-core peak; the estimate assumes the same fraction of peak
H200_TFLOPS = 989.0  # H200 dense bf16 peak (a different GPU: scale by its own peak)
summary = {}
for path in sys.argv[1:]:
    rows = json.load(open(path))
    shape = tuple(int(s) for s in rows["volume"].split("x"))
    patch = load_manifest(rows["weights"]).patch_size  # the folds the run timed
    windows = len(WindowPlan.create([max(s, p) for s, p in zip(shape, patch)], patch, 0.5))
    network = rows.get("network_only", {}).get("seconds")
    flop = windows * rows["folds"] * rows["cases"] * FLOP_PER_VOXEL * math.prod(patch)
    entry = {"volume": rows["volume"], "cases": rows["cases"], **rows.get("ratios", {})}
    for key in ("deterministic_runs_bit_identical", "dice_deterministic_vs_project"):
        if key in rows:
            entry[key] = rows[key]
    entry["peak_gpu_mb"] = {k: v.get("peak_gpu_mb") for k, v in rows.items()
                            if isinstance(v, dict) and "peak_gpu_mb" in v}
    if network:
        tflops = flop / network / 1e12
        entry["network_tflops"] = tflops
        entry["t4_estimate_network_s_per_case"] = (
            flop / rows["cases"] / (tflops / H200_TFLOPS * T4_TFLOPS) / 1e12)
    entry["targets"] = {
        "project_over_a_tuned >= 2": entry.get("project_over_a_tuned", 0) >= 2,
        "end_to_end_over_network_only <= 1.15": entry.get("end_to_end_over_network_only", 9) <= 1.15,
        "peak_gpu_mb <= 12288": all((v or 0) <= 12288 for v in entry["peak_gpu_mb"].values()),
    }
    summary[path.rsplit("/", 1)[-1]] = entry
print(json.dumps(summary, indent=1))
EOF

# The deterministic mode's cost and bit-identical masks (two processes); then 5. graph capture
# (torch.compile, CUDA graphs) against eager cuDNN on the fixed batch shape, one fold (the time per
# batch is the same for each). max-autotune only with GRAPHS_ALL=1: it autotunes for minutes.
runs extras || exit 0
# shellcheck disable=SC2086
bench --shape $shape --cases 1 --deterministic --only project project_deterministic \
    project_deterministic_rerun --workdir "$work/deterministic" \
    | tee "$out/bench_${name}_deterministic.json" || echo "deterministic runs failed: see gpu.log"
graphs=${GRAPHS:-eager cudagraphs inductor inductor-cudagraphs}
[[ ${GRAPHS_ALL:-0} == 1 ]] && graphs="$graphs inductor-max-autotune"
# shellcheck disable=SC2086  # one contender per word
"$python" bench/bench_graphs.py --device "$device" --folds 1 "${weights_option[@]}" \
    --only $graphs | tee "$out/graphs.json" || echo "bench_graphs.py failed: see gpu.log"
