#!/usr/bin/env bash
# Train one fold on the federation (run from the repository root, which is the Flower app).
#
#   train/deploy/run.sh CONNECTION FOLD RUN_DIR OUT_DIR [EXTRA_RUN_CONFIG]
#
# RUN_DIR (checkpoints) and OUT_DIR (exported weights and manifest) are paths on the SuperLink's
# machine, where the ServerApp runs. Repeating the command resumes the fold after a crash.
set -euo pipefail
usage="usage: run.sh CONNECTION FOLD RUN_DIR OUT_DIR [EXTRA_RUN_CONFIG]"
connection=${1:?$usage}
fold=${2:?$usage}
run_dir=${3:?$usage}
out_dir=${4:?$usage}
extra=${5:-}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flwr run . "$connection" --stream \
    --run-config "fold=$fold run-dir=\"$run_dir\" out-dir=\"$out_dir\" $extra"
