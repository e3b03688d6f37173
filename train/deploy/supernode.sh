#!/usr/bin/env bash
# Start a hospital's SuperNode: it dials the SuperLink over TLS, authenticates with the site's
# private key, and trains on the site's dataset, which never leaves this machine.
#
#   train/deploy/supernode.sh SUPERLINK_ADDRESS CA_CERT PRIVATE_KEY DATA_DIR [PORT] [SITE_NAME]
#
# SUPERLINK_ADDRESS is host:port; DATA_DIR an nnU-Net raw dataset (imagesTr/, labelsTr/); PORT
# the local port of the SuperNode's ClientApp API (default 9094, one per SuperNode on a
# machine); SITE_NAME how the site appears in logs and provenance (default: DATA_DIR's name).
# The environment reaches the ClientApp: VESSEL_SEG_TRAIN_CACHE (where the site's cases are
# preprocessed once, default ~/.cache/vessel-seg/train), VESSEL_SEG_LOADER_WORKERS (patch
# worker processes, default half the CPUs, at most 4), CUDA_VISIBLE_DEVICES (the site's GPU),
# and glibc's MALLOC_MMAP_MAX_ and MALLOC_TRIM_THRESHOLD_ (default: keep freed memory, which
# spares each training step a fifth of its time in page faults; see train/deploy/localhost.py).
set -euo pipefail
usage="usage: supernode.sh SUPERLINK_ADDRESS CA_CERT PRIVATE_KEY DATA_DIR [PORT] [SITE_NAME]"
address=${1:?$usage}
ca=${2:?$usage}
key=${3:?$usage}
data=${4:?$usage}
port=${5:-9094}
name=${6:-}
if [[ ! -d "$data/imagesTr" || ! -d "$data/labelsTr" ]]; then
    echo "supernode.sh: $data is not an nnU-Net raw dataset (imagesTr/, labelsTr/)" >&2
    exit 2
fi
# The allocator settings of every training process (TRAINING_ALLOCATOR), unless set already
eval "$(python -c 'from train.deploy.localhost import TRAINING_ALLOCATOR as settings
print(*(f"export {k}=${{{k}:-{v}}}" for k, v in settings.items()), sep=";")')"
node_config="data-path=\"$(cd "$data" && pwd)\""
if [[ -n "$name" ]]; then
    node_config="$node_config site-name=\"$name\""
fi
exec flower-supernode \
    --root-certificates "$ca" \
    --superlink "$address" \
    --auth-supernode-private-key "$key" \
    --node-config "$node_config" \
    --port "$port"
