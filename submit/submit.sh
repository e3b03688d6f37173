#!/usr/bin/env bash
# Package the container for the challenge platforms (README, "Submit").
#
#   submit/submit.sh export                 build the image; write DIST/IMAGE.tar.gz
#                                           (docker save | gzip, Grand Challenge's upload) and
#                                           DIST/model.tar.gz (weights/ without prepared
#                                           OpenVINO models: Grand Challenge's model tarball,
#                                           extracted to /opt/ml/model); print sizes and sha256
#   submit/submit.sh push-shiny REGISTRY    build the image, tag it REGISTRY and push it
#                                           (a Synapse path: docker.synapse.org/synID/NAME:TAG)
#
# IMAGE (default vessel-seg) and DIST (default dist/) come from the environment. Where no
# Docker engine answers, each says so in one line and exits 3 before writing anything.
set -euo pipefail

HERE="${BASH_SOURCE[0]%/*}"  # no dirname: the one-line failure needs no tool beyond bash
[[ "$HERE" != "${BASH_SOURCE[0]}" ]] || HERE=.
ROOT="$(cd "$HERE/.." && pwd)"
IMAGE="${IMAGE:-vessel-seg}"
DIST="${DIST:-$ROOT/dist}"

die() { echo "error: $2" >&2; exit "$1"; }

need_docker() {
    command -v docker > /dev/null 2>&1 \
        || die 3 "$1: no docker command found; install Docker and try again"
    docker info > /dev/null 2>&1 \
        || die 3 "$1: no Docker engine answers (docker info failed); start it and try again"
}

report() {  # size and sha256 of each file
    local file
    for file in "$@"; do
        printf '%s  %s bytes  sha256 %s\n' "$file" "$(stat -c %s "$file")" \
            "$(sha256sum "$file" | cut -d' ' -f1)"
    done
}

export_image() {
    need_docker export
    [[ -f "$ROOT/weights/manifest.json" ]] || die 2 "export: $ROOT/weights has no manifest.json"
    docker build --tag "$IMAGE" "$ROOT"
    mkdir -p "$DIST"
    local image_file="$DIST/${IMAGE//[:\/]/-}.tar.gz" model_file="$DIST/model.tar.gz"
    docker save "$IMAGE" | gzip -c > "$image_file.part"
    mv "$image_file.part" "$image_file"
    tar -C "$ROOT/weights" --exclude ./openvino --exclude ./README.md -czf "$model_file.part" .
    mv "$model_file.part" "$model_file"
    report "$image_file" "$model_file"
}

push_shiny() {
    local registry="${1:-}"
    [[ -n "$registry" ]] \
        || die 2 "push-shiny: give REGISTRY=docker.synapse.org/<project synID>/<name>:<tag>"
    need_docker push-shiny
    docker build --tag "$IMAGE" "$ROOT"
    docker tag "$IMAGE" "$registry"
    docker push "$registry"
    echo "pushed $registry; submit it on Synapse (docker login docker.synapse.org first)"
}

case "${1:-}" in
    export) export_image ;;
    push-shiny) push_shiny "${2:-}" ;;
    *) die 2 "usage: submit/submit.sh export | push-shiny REGISTRY" ;;
esac
