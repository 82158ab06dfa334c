#!/usr/bin/env bash
# Build prerequisites the Rust toolchain does not bring: OpenSSL's headers,
# for librdkafka's TLS and SASL/SCRAM (rdkafka's `ssl` feature). Installs
# Debian's libssl-dev and pkg-config when they are missing (as root, or
# through `sudo -n`); an OpenSSL elsewhere is used through OPENSSL_DIR.
set -euo pipefail
if [[ -n ${OPENSSL_DIR:-} ]] || { command -v pkg-config >/dev/null && pkg-config --exists openssl; }; then
    exit 0
fi
as_root=()
if [[ $(id -u) != 0 ]]; then
    as_root=(sudo -n)
fi
echo "installing libssl-dev and pkg-config (OpenSSL headers for librdkafka's TLS and SCRAM)..." >&2
if ! { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq libssl-dev pkg-config; } >&2; then
    echo "error: cannot install OpenSSL's headers; install them (Debian: apt-get install libssl-dev pkg-config) or set OPENSSL_DIR, and run again" >&2
    exit 1
fi
