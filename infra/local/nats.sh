#!/usr/bin/env bash
# NATS with JetStream on 127.0.0.1:4222 (Debian's nats-server). Starts it
# when nothing answers there and prints the server URL.
set -euo pipefail
source "$(dirname "$0")/common.sh"

port=${NATS_PORT:-4222}
if ! port_open 127.0.0.1 "$port"; then
    server=$(command -v nats-server || echo /usr/sbin/nats-server)
    [[ -x $server ]] || fail "NATS: nats-server is not installed (apt-get install nats-server)"
    mkdir -p /var/lib/nats-server "$KEEL_LOG_DIR"
    log="$KEEL_LOG_DIR/nats-server.log"
    start-stop-daemon --start --oknodo --background --exec "$server" -- \
        -a 127.0.0.1 -p "$port" -js -sd /var/lib/nats-server -l "$log" >&2 \
        || fail "NATS: start-stop-daemon could not start $server"
    wait_for "NATS" 127.0.0.1 "$port" 30 "$log"
fi
echo "nats://127.0.0.1:$port"
