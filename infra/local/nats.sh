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
    pidfile="$KEEL_STATE_DIR/nats-$port.pid"
    mkdir -p "$KEEL_STATE_DIR"
    # A pidfile per port: another nats-server already running elsewhere must
    # not make start-stop-daemon believe this one is up.
    start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$pidfile" \
        --exec "$server" -- -a 127.0.0.1 -p "$port" -js -sd /var/lib/nats-server -l "$log" >&2 \
        || fail "NATS: start-stop-daemon could not start $server"
    wait_for "NATS" 127.0.0.1 "$port" 30 "$log" "$(cat "$pidfile" 2>/dev/null)"
fi
echo "nats://127.0.0.1:$port"
