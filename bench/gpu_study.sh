#!/usr/bin/env bash
# The study's trainings on one GPU machine, all at once, through Flower's deployment engine (a
# SuperLink and a SuperNode per site as processes: no Ray), within one call:
#   1. the packages: the machine's own where present, else the carried wheels
#      (bench/gpu_packages.sh; `bash bench/gpu_wheels.sh` makes them);
#   2. python -m study data, in $STUDY (default build/gpu-study): generated there, not carried;
#   3. python -m study --engine deployment --site-gpus $SITE_GPUS train RUN for every run of
#      $RUNS (default the five folds) at the same time, each resuming its checkpoint where
#      $STUDY holds one, one patch worker per site ($LOADER_WORKERS), GPU use sampled every 5 s;
#      $MAX_SECONDS (420) after the data's start, every run still training pauses after its
#      round and its checkpoint is written in fp16 (python -m study park);
#   4. the return: $OUT/study.tar.gz (every log, state.json, manifest and the GPU samples),
#      then the exported folds, then the parked checkpoints, as many as one call brings back
#      (7 files, 60 MB); `--collect` (the next call, while the machine is still warm) brings the
#      next ones. Each file is named by its path under $STUDY/runs with '--' for '/'.
# Here, `python -m study restore DIR` merges a return into this study (study/restore.py: a fold
# joins where it is missing, a checkpoint replaces one that trained fewer rounds).
#   bash bench/gpu_study.sh                          # about 8 min, then --collect as needed
#   RUNS="msfe-only hsca-only pooled" bash bench/gpu_study.sh
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-build/gpu-study-out}
python=${PYTHON:-python3}
runs=${RUNS:-fold0 fold1 fold2 fold3 fold4}
export VESSEL_SEG_STUDY_DIR=${STUDY:-$PWD/build/gpu-study}
export VESSEL_SEG_LOADER_WORKERS=${LOADER_WORKERS:-1}
export VESSEL_SEG_TRAIN_CACHE=$VESSEL_SEG_STUDY_DIR/cache
export PYTHONUNBUFFERED=1
study=$VESSEL_SEG_STUDY_DIR
mkdir -p "$out" "$study/logs"
out=$(cd "$out" && pwd)
exec > >(tee -a "$study/logs/gpu_study.log") 2>&1

# The next files of the return, $RETURN_FILES (7) and 60 MB a call, the logs and states first.
collect() {
    # shellcheck disable=SC2046  # one word per path (no spaces in the study's names)
    tar -czf "$out/study.tar.gz" -C "$study" logs $(cd "$study" && find runs -name state.json \
        -o -name manifest.json -o -name postprocessing.json) || return 1
    local sent=$study/returned.txt files=0 bytes=0 size name
    touch "$sent" "$study/parked.txt"
    while read -r file; do
        name=${file#"$study"/runs/}
        name=${name//\//--}
        grep -qxF "$name" "$sent" && continue
        size=$(stat -c %s "$file")
        if ((files == ${RETURN_FILES:-7} || bytes + size > 60000000)); then
            echo "next call (--collect): $name"
            continue
        fi
        cp "$file" "$out/$name" && echo "$name" >>"$sent" || return 1
        files=$((files + 1)) bytes=$((bytes + size))
    done < <(find "$study/runs" -path '*/weights/fold_*.safetensors' | sort
             tr ' ' '\n' <"$study/parked.txt" | grep '\.safetensors$')
    echo "returned: $files files, $bytes bytes (study.tar.gz beside them)"
}
if [[ ${1:-} == --collect ]]; then
    collect
    exit
fi

# 1. Packages: the machine's own where present, else the carried wheels.
# shellcheck source=bench/gpu_packages.sh
source bench/gpu_packages.sh
packages torch numpy scipy SimpleITK safetensors flwr skimage cc3d tqdm || exit 2
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA:",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
command -v nproc >/dev/null && echo "CPUs: $(nproc)"

# 2. The data, made here.
start=$SECONDS
"$python" -m study data >"$study/logs/data.log" 2>&1 || { tail -20 "$study/logs/data.log"; exit 3; }
echo "python -m study data: $((SECONDS - start)) s"

# 3. Every run at once, then a pause for those still training.
sampler=""
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
        -l 5 >"$study/logs/gpu-utilisation.csv" &
    sampler=$!
fi
declare -A pids
for run in $runs; do
    "$python" -m study --engine deployment --site-gpus "${SITE_GPUS:-0}" train "$run" \
        >"$study/logs/$run.log" 2>&1 &
    pids[$run]=$!
done
deadline=$((start + ${MAX_SECONDS:-420}))
running() { for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
while running && ((SECONDS < deadline)); do sleep 5; done
running && echo "$((SECONDS - start)) s: pausing the runs still training after their round"
while running; do  # again until they stop: a run that starts later finds it after its round
    for folder in "$study"/runs/*/train/fold*; do [[ -d $folder ]] && touch "$folder/PAUSE"; done
    sleep 5
done
for run in "${!pids[@]}"; do
    wait "${pids[$run]}"
    echo "$run: exit status $? ($(grep -ho 'round [0-9]*: [^,]*, validation Dice [0-9.]*' \
        "$study/logs/$run.log" | tail -1))"
done
rm -f "$study"/runs/*/train/fold*/PAUSE
"$python" -m study park >"$study/parked.txt"  # fp16 checkpoints of the unfinished runs
[[ -n $sampler ]] && kill "$sampler" 2>/dev/null
echo "training: $((SECONDS - start)) s"

# 4. The return.
collect
