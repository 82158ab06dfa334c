#!/usr/bin/env bash
# The test command: makes sure Kafka (tansu), NATS (JetStream) and
# PostgreSQL answer — starting the ones that are down — points the tests at
# them and runs every test of the workspace, integration tests included.
# A service that cannot be reached stops the run with its name.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

"$here/build-deps.sh"
# A fresh (empty) tansu of ours: a memory:// one grown by earlier runs slows
# consumer groups enough to fail the SIGKILL tests' progress deadlines.
KEEL_TEST_KAFKA=${KEEL_TEST_KAFKA:-$(TANSU_FRESH=1 "$here/tansu.sh")}
KEEL_TEST_NATS=${KEEL_TEST_NATS:-$("$here/nats.sh")}
KEEL_TEST_DATABASE_URL=${KEEL_TEST_DATABASE_URL:-$("$here/postgres.sh")}
export KEEL_TEST_KAFKA KEEL_TEST_NATS KEEL_TEST_DATABASE_URL

# Endpoints given from outside are checked too: a dead one fails here, by name.
source "$here/common.sh"
reachable() { # NAME URL DEFAULT_PORT
    local host port
    read -r host port <<<"$(host_port "$2" "$3")"
    port_open "$host" "$port" || fail "$1 is not reachable at $2"
}
reachable "Kafka" "$KEEL_TEST_KAFKA" 9092
reachable "NATS" "$KEEL_TEST_NATS" 4222
reachable "PostgreSQL" "$KEEL_TEST_DATABASE_URL" 5432
echo "services: kafka=$KEEL_TEST_KAFKA nats=$KEEL_TEST_NATS postgres=$KEEL_TEST_DATABASE_URL" >&2

cd "$root"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --workspace --doc
else
    cargo test --workspace --no-fail-fast "$@"
fi
