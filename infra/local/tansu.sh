#!/usr/bin/env bash
# Kafka-compatible broker: tansu 0.6.0 (a Rust broker; no JVM needed).
# Installs it into ~/.cargo/bin when missing (about 9 minutes on 2 cores),
# starts it on 127.0.0.1:9092 when nothing answers there, and prints the
# bootstrap address.
#
#   TANSU_STORAGE=memory://tansu/   (default) or sqlite://tansu.db, a durable
#                                   file under $KEEL_STATE_DIR/tansu
#   TANSU_PORT=9092
set -euo pipefail
source "$(dirname "$0")/common.sh"

port=${TANSU_PORT:-9092}
storage=${TANSU_STORAGE:-memory://tansu/}
tansu=${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}

# A memory:// tansu of ours that benchmark runs grew large slows everything
# else on the machine (seen: 1.5 GB, a later test's publishes timing out).
# Its topics are disposable (every test makes its own), so past 512 MiB it is
# restarted empty. TANSU_FRESH=1 (the test command) restarts it empty
# whatever its size: one suite on top of earlier runs' 360 MiB stalled a
# consumer group for minutes (seen: router_chain), and a fresh one did not.
pidfile="$KEEL_STATE_DIR/tansu.pid"
restart_above_kb=524288
if [[ ${TANSU_FRESH:-0} == 1 ]]; then
    restart_above_kb=0
fi
if port_open 127.0.0.1 "$port" && [[ -f $pidfile ]]; then
    pid=$(cat "$pidfile")
    if [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] &&
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--storage-engine memory://"; then
        rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        if ((${rss_kb:-0} > restart_above_kb)); then
            echo "Kafka (tansu): its memory storage holds $((rss_kb / 1024)) MiB; restarting it empty" >&2
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
    fi
fi

if ! port_open 127.0.0.1 "$port"; then
    if [[ ! -x $tansu ]]; then
        echo "tansu is not installed; installing tansu 0.6.0 from crates.io (about 9 minutes)..." >&2
        cargo install tansu --version 0.6.0 --locked --features dynostore,libsql >&2 \
            || fail "Kafka (tansu): cargo install tansu --version 0.6.0 failed"
        tansu="$HOME/.cargo/bin/tansu"
    fi
    mkdir -p "$KEEL_STATE_DIR/tansu" "$KEEL_LOG_DIR"
    log="$KEEL_LOG_DIR/tansu.log"
    # sqlite:// paths are relative to the working directory.
    cd "$KEEL_STATE_DIR/tansu"
    setsid nohup "$tansu" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "$storage" >>"$log" 2>&1 </dev/null &
    echo $! >"$KEEL_STATE_DIR/tansu.pid"
    wait_for "Kafka (tansu)" 127.0.0.1 "$port" 60 "$log" "$!"
fi
echo "127.0.0.1:$port"
