#!/usr/bin/env bash
# What allowed_users costs a new connection: pgbench -S -C (a connection per transaction)
# against one dbward, alternating between an entry without an allowlist and the same entry
# with allowed_users (each connection's caller looked up through sock_diag, then admitted).
# Prints the median tps of both and their ratio. A measurement, not a test: exits 0.
#
#   benches/peer_lookup.sh                       # ROUNDS=6 DURATION=8: about 2 minutes plus the build
#   ROUNDS=10 DURATION=10 benches/peer_lookup.sh
#
# It is benches/pgbench.sh (same servers, same static role) with only this measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
ALLOWLIST_ROUNDS=${ROUNDS:-6} ALLOWLIST_ONLY=1 exec benches/pgbench.sh "$@"
