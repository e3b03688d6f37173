#!/usr/bin/env bash
# Name the federation's SuperLink for the flwr CLI (in $FLWR_HOME/config.toml, default
# ~/.flwr/config.toml), so that `flwr supernode register` and `flwr run` can reach it.
#
#   train/deploy/connection.sh NAME SUPERLINK_ADDRESS CA_CERT
set -euo pipefail
usage="usage: connection.sh NAME SUPERLINK_ADDRESS CA_CERT"
name=${1:?$usage}
address=${2:?$usage}
ca=$(cd "$(dirname "${3:?$usage}")" && pwd)/$(basename "$3")
home=${FLWR_HOME:-$HOME/.flwr}
config="$home/config.toml"
mkdir -p "$home"
if [[ ! -f "$config" ]]; then
    printf '[superlink]\ndefault = "%s"\n' "$name" > "$config"
fi
if grep -q "^\[superlink\.$name\]" "$config"; then
    echo "connection.sh: $config already names a SuperLink $name" >&2
    exit 1
fi
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$name" "$address" "$ca" \
    >> "$config"
echo "$config: SuperLink $name at $address"
