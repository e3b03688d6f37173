# shellcheck shell=bash
# Sourced by the GPU scripts. packages MODULE... makes the modules importable by $python: the
# machine's own environment where it has them all, else the carried wheels ($WHEELS, default
# build/wheels: `bash bench/gpu_wheels.sh`) installed without dependency resolution into
# $SITE_PACKAGES (default /tmp/vessel-seg-site), not over the image's packages; PYTHONPATH and
# PATH (Flower's commands) name that folder first.
packages() {
    local python=${python:-python3} modules=$* wheels=${WHEELS:-build/wheels}
    local site=${SITE_PACKAGES:-/tmp/vessel-seg-site}
    "$python" -c "import ${modules// /,}" 2>/dev/null && return 0
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        echo "missing Python packages (of: $modules) and no wheels in $wheels" >&2
        return 2
    fi
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
        "$wheels"/*.whl || return 2
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
    "$python" -c "import ${modules// /,}" || return 2
}
