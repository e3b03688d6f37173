#!/usr/bin/env bash
# A paper-scale fold on a GPU machine, through Flower's deployment engine (no Ray), as one run:
#   1. the packages: the machine's own where present (torch with CUDA is expected there), else
#      the carried wheels (bench/gpu_packages.sh; `bash bench/gpu_wheels.sh` makes them);
#   2. a phantom federation generated here (python -m phantoms: $SITES sites, $CASES cases of
#      $SIZE^3 each), not carried;
#   3. python -m train --engine deployment: a SuperLink and one SuperNode per site on
#      localhost (TLS), the sites on the GPUs in turn ($SITE_GPUS, default every GPU), fold 0
#      with the paper's settings: $PATCH^3 patches (160), Adam at $LR (1e-4), batch 2, 10
#      patches per case per epoch, early stopping after $PATIENCE rounds without a better
#      validation Dice, at most $ROUNDS rounds and $MAX_SECONDS seconds (then stopped, and
#      reported all the same);
#   4. the report: gpu-train.json (training throughput per site and round: steps/s, patches/s,
#      voxels/s; GPU utilisation and memory sampled every second by nvidia-smi; the run's
#      validation scores), beside train.log (everything printed), gpu-utilisation.csv and the
#      run's state.json;
#   5. with BENCH=1, bench/bench_training.py on CUDA (steps/s at 64^3-160^3, with and without
#      background loading) into bench-training.json.
# Results go to $OUT (else build/gpu-train).
#   bash bench/gpu_train.sh
#   SITES=3 SITE_GPUS=0 MAX_SECONDS=900 bash bench/gpu_train.sh   # three sites share GPU 0
# CPU smoke test (what the test suite runs): PATCH=32 SIZE=32 CASES=3 BASE_CHANNELS=4 ...
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-build/gpu-train}
python=${PYTHON:-python3}
sites=${SITES:-2}
cases=${CASES:-5}
size=${SIZE:-256}
patch=${PATCH:-160}
lr=${LR:-0.0001}
base_channels=${BASE_CHANNELS:-16}
patches_per_case=${PATCHES_PER_CASE:-10}
rounds=${ROUNDS:-30}
patience=${PATIENCE:-5}
max_seconds=${MAX_SECONDS:-420}
tls=${TLS:-1}
bench=${BENCH:-0}
extra=${RUN_CONFIG:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec > >(tee -a "$out/train.log") 2>&1
export PYTHONUNBUFFERED=1
work=${WORK:-$(mktemp -d)}
export VESSEL_SEG_TRAIN_CACHE=${VESSEL_SEG_TRAIN_CACHE:-$work/cache}
echo "gpu_train.sh: work folder $work, results in $out"

# 1. Packages: the machine's own where present, else the carried wheels.
# shellcheck source=bench/gpu_packages.sh
source bench/gpu_packages.sh
packages torch numpy scipy SimpleITK safetensors flwr skimage cc3d tqdm || exit 2
"$python" -c 'import importlib.util as u; print("ray installed:", u.find_spec("ray") is not None)'
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA:",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
gpus=${SITE_GPUS:-}
if [[ -z $gpus ]] && command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi

# 2. Phantoms, generated here.
data=$work/data
if [[ ! -d $data/site1 ]]; then
    start=$(date +%s)
    "$python" -m phantoms --out "$data" --cases "$cases" --size "$size" "$size" "$size" \
        --seed 0 --sites "$sites" >/dev/null || exit 3
    echo "phantoms: $sites sites x $cases cases of ${size}^3 in $(($(date +%s) - start)) s"
fi

# 3. Train fold 0 through the deployment engine, GPU utilisation sampled meanwhile.
sampler=""
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used,memory.total \
        --format=csv,noheader,nounits -l 1 >"$out/gpu-utilisation.csv" &
    sampler=$!
fi
options=(--engine deployment --data "$data" --work "$work" --fold 0)
((tls)) && options+=(--tls)
[[ -n $gpus ]] && options+=(--site-gpus "$gpus")
settings="patch-size=$patch learning-rate=$lr base-channels=$base_channels batch-size=2"
settings+=" patches-per-case=$patches_per_case num-rounds=$rounds patience=$patience"
settings+=" local-epochs=1 val-overlap=0.25 round-timeout=1800.0 $extra"
start=$(date +%s)
timeout --kill-after=120 "$max_seconds" \
    "$python" -m train "${options[@]}" --run-config "$settings" >"$out/summary.json"
status=$?
seconds=$(($(date +%s) - start))
[[ -n $sampler ]] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null
echo "python -m train: exit status $status after $seconds s (124: stopped at $max_seconds s)"
cp "$work/train/fold0/state.json" "$out/state.json" 2>/dev/null

# 4. The report.
"$python" - "$out" "$status" "$seconds" "$patch" "$patches_per_case" <<'EOF' | tee "$out/gpu-train.json"
import csv, json, math, statistics, sys
from pathlib import Path

out, status, seconds, patch, per_case = Path(sys.argv[1]), *map(int, sys.argv[2:])
report = {"exit_status": status, "wall_seconds": seconds, "patch": patch}
try:
    state = json.loads((out / "state.json").read_text())
except (OSError, ValueError):
    state = None
if state:
    config = state["config"]
    rounds = []
    for record in state["history"]:
        sites = {}
        for name, site in record["train"]["sites"].items():
            patches = site["cases"] * per_case * config["local-epochs"]
            steps = math.ceil(site["cases"] * per_case / config["batch-size"])
            steps *= config["local-epochs"]
            train = site["train-seconds"]
            sites[name] = {"steps_per_second": round(steps / train, 3),
                           "patches_per_second": round(patches / train, 3),
                           "voxels_per_second": round(patches * patch**3 / train),
                           "train_seconds": round(train, 2),
                           "site_seconds": round(site["site-seconds"], 2)}
        rounds.append({"round": record["round"], "seconds": round(record["seconds"], 2),
                       "validation_dice": record["validation"].get("dice"), "sites": sites})
    steady = [s for r in rounds[1:] or rounds for s in r["sites"].values()]
    report.update({
        "rounds": state["round"], "best_round": state["best_round"],
        "best_validation": state["best_metrics"], "stop_reason": state["stop_reason"],
        "steady_state": {k: round(statistics.median(s[k] for s in steady), 3)
                         for k in ("steps_per_second", "patches_per_second",
                                   "voxels_per_second", "train_seconds")} if steady else None,
        "history": rounds,
    })
samples = out / "gpu-utilisation.csv"
if samples.is_file():
    gpus = {}
    for row in csv.reader(samples.open()):
        if len(row) == 5 and row[2].strip().isdigit():
            gpus.setdefault(row[1].strip(), []).append((int(row[2]), float(row[3])))
    report["gpu"] = {index: {"utilisation_mean_percent": round(statistics.mean(u for u, _ in v), 1),
                             "utilisation_max_percent": max(u for u, _ in v),
                             "memory_max_mib": max(m for _, m in v), "samples": len(v)}
                     for index, v in gpus.items()}
else:
    report["gpu"] = None
print(json.dumps(report, indent=1))
EOF

# 5. The training benchmark on CUDA, when asked for.
if ((bench)); then
    "$python" bench/bench_training.py --device cuda --skip-memory | tee "$out/bench-training.json"
fi
((status == 0 || status == 124)) || exit "$status"
