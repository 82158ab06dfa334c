# Shared helpers for the infra/local scripts (sourced, not run).
# Each service script starts its service when it is not answering, waits
# until it answers, prints its endpoint on stdout and exits non-zero with a
# message naming the service when it cannot.

KEEL_STATE_DIR=${KEEL_STATE_DIR:-/var/lib/keel}
KEEL_LOG_DIR=${KEEL_LOG_DIR:-/var/log/keel}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_for SERVICE HOST PORT SECONDS LOG: waits for the port, or fails naming the service.
wait_for() {
    local service=$1 host=$2 port=$3 seconds=$4 log=${5:-}
    local deadline=$((SECONDS + seconds))
    until port_open "$host" "$port"; do
        if ((SECONDS >= deadline)); then
            echo "error: $service did not answer on $host:$port within ${seconds}s${log:+; see $log}" >&2
            [[ -n $log && -f $log ]] && tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

fail() {
    echo "error: $*" >&2
    exit 1
}
