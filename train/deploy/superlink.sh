#!/usr/bin/env bash
# Start the federation's SuperLink: TLS on, only registered SuperNodes admitted, state kept in
# a database so that registrations and runs survive a restart.
#
#   train/deploy/superlink.sh CERT_DIR STATE_DIR [PORT]
#
# CERT_DIR holds ca.crt, server.pem and server.key (python -m train.deploy.credentials
# certificates). Listens on $SUPERLINK_HOST (default 0.0.0.0) port PORT (default 9092) for
# SuperNodes, the flwr CLI and the ServerApp alike.
set -euo pipefail
certs=${1:?usage: superlink.sh CERT_DIR STATE_DIR [PORT]}
state=${2:?usage: superlink.sh CERT_DIR STATE_DIR [PORT]}
port=${3:-9092}
mkdir -p "$state"
# The ServerApp runs here with the installed environment: never install packages per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-superlink \
    --ssl-ca-certfile "$certs/ca.crt" \
    --ssl-certfile "$certs/server.pem" \
    --ssl-keyfile "$certs/server.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --database "$state/superlink.db" \
    --host "${SUPERLINK_HOST:-0.0.0.0}" --port "$port"
