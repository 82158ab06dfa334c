#!/usr/bin/env bash
# PostgreSQL on 127.0.0.1:5432 (Debian's cluster, trust auth). Starts the
# cluster when it is not accepting connections and prints a URL for the
# `postgres` database.
set -euo pipefail
source "$(dirname "$0")/common.sh"

port=${PGPORT:-5432}
if ! pg_isready -q -h 127.0.0.1 -p "$port" 2>/dev/null; then
    command -v pg_ctlcluster >/dev/null || fail "PostgreSQL: pg_ctlcluster not found (apt-get install postgresql)"
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [[ -n $version ]] || fail "PostgreSQL: no cluster under /etc/postgresql"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 \
        || fail "PostgreSQL: pg_ctlcluster $version main start failed"
    deadline=$((SECONDS + 30))
    until pg_isready -q -h 127.0.0.1 -p "$port"; do
        ((SECONDS < deadline)) || fail "PostgreSQL did not accept connections on 127.0.0.1:$port within 30s"
        sleep 0.2
    done
fi
echo "postgres://postgres@127.0.0.1:$port/postgres"
