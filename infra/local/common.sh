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

# wait_for SERVICE HOST PORT SECONDS LOG [PID]: waits for the port, or fails
# naming the service — at once if the process it started (PID) has died.
wait_for() {
    local service=$1 host=$2 port=$3 seconds=$4 log=${5:-} pid=${6:-}
    local deadline=$((SECONDS + seconds))
    until port_open "$host" "$port"; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            echo "error: $service exited during start-up${log:+; see $log}" >&2
            [[ -n $log && -f $log ]] && tail -n 20 "$log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "error: $service did not answer on $host:$port within ${seconds}s${log:+; see $log}" >&2
            [[ -n $log && -f $log ]] && tail -n 20 "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

# host_port URL DEFAULT_PORT: "host port" of the first server in a URL or
# host list (kafka://a:9092,b:9092, nats://u:p@h, postgres://u@h/db, h:1).
host_port() {
    local rest=${1#*://}
    rest=${rest%%,*}
    rest=${rest#*@}
    rest=${rest%%[/?]*}
    if [[ $rest =~ ^\[(.*)\](:([0-9]+))?$ ]]; then
        echo "${BASH_REMATCH[1]} ${BASH_REMATCH[3]:-$2}"
    elif [[ $rest == *:* ]]; then
        echo "${rest%:*} ${rest##*:}"
    else
        echo "$rest $2"
    fi
}

fail() {
    echo "error: $*" >&2
    exit 1
}
