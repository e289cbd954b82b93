#!/usr/bin/env bash
# pgbench through dbward, next to PgBouncer and a direct connection, in one run on this machine.
#
# Starts, in a temporary directory: a PostgreSQL 15 cluster (SCRAM), an OpenBao dev server with
# the database secrets engine and a STATIC role (so all three targets log in as the same Postgres
# role with the same password), PgBouncer (session pool, SCRAM, auth_file) and dbward (release
# build, token auth, sslmode=disable upstream; a second entry of the same process with
# [databases.pool], the target "dbward_pool"). Then, for each target, in interleaved rounds:
#
#   throughput:      pgbench -n -S -c $CLIENTS -j 2 -T $DURATION
#   new connections: pgbench -n -S -C -c $CONN_CLIENTS -j 2 -T $DURATION   (-C: a connection per transaction)
#   latency:         pgbench -n -S -c 1 -j 1 -T $DURATION                   (latency average)
#   COPY:            psql -c 'COPY bulk TO STDOUT' >/dev/null of ~$COPY_MB MB (wall time, proxy
#                    CPU), $COPY_RUNS times per round
#
# then dbward's RSS with $IDLE_SESSIONS idle sessions open (plaintext, and client TLS + upstream
# TLS through a third entry), and prints the medians, every ratio the performance goals name
# (benches/README.md), the CPU the proxies spent per transaction and the load average. It is a
# measurement, not a test: it exits 0 whatever the numbers, unless --check is given.
#
#   benches/pgbench.sh                 # DURATION=8 ROUNDS=3
#   benches/pgbench.sh --check 0.8     # exit 1 if dbward/pgbouncer throughput (median) < 0.8
#   DURATION=20 ROUNDS=5 benches/pgbench.sh
#
# Env: DURATION (8, seconds per pgbench run), ROUNDS (3), SCALE (10, pgbench -s),
#      CLIENTS (8), CONN_CLIENTS (4), PGBENCH_JOBS (2), COPY_MB (400), COPY_RUNS (5),
#      IDLE_SESSIONS (1000), DBWARD_LOG (RUST_LOG for dbward; default "info", dbward's own
#      default), CARGO_TARGET_DIR, KEEP_BENCH_DIR=1 (keep the temp dir).
#      WORKER_THREADS, if set, becomes dbward's proxy.worker_threads (default 1).
#      HOLD=1: set everything up, write the ports, PIDs and the direct/PgBouncer password to
#      $WORK/targets.env (mode 600), then wait until interrupted instead of measuring; for
#      measuring by hand (perf, strace, a single workload) against the same servers.
# Everything started here is stopped on exit, whatever the exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() { echo "usage: benches/pgbench.sh [--check RATIO]" >&2; exit 64; }
CHECK=''
while [ $# -gt 0 ]; do
    case $1 in
        --check)
            [ $# -ge 2 ] || usage
            CHECK=$2
            [[ $CHECK =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--check wants a number like 0.8, not '$CHECK'"
            shift 2
            ;;
        -h | --help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) usage ;;
    esac
done

DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-8}
CONN_CLIENTS=${CONN_CLIENTS:-4}
PGBENCH_JOBS=${PGBENCH_JOBS:-2}
COPY_MB=${COPY_MB:-400}
COPY_RUNS=${COPY_RUNS:-5}
IDLE_SESSIONS=${IDLE_SESSIONS:-1000}
DBWARD_LOG=${DBWARD_LOG:-info}
for v in DURATION ROUNDS SCALE CLIENTS CONN_CLIENTS PGBENCH_JOBS COPY_MB COPY_RUNS IDLE_SESSIONS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
CLK_TCK=$(getconf CLK_TCK)
BENCH_ROLE=bench_static
BENCH_DB=bench

# --- helpers -----------------------------------------------------------------------------------

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A free loopback port from the kernel; with "pair", one whose successor is free too (the
# OpenBao dev server also binds port+1 for its cluster listener).
free_port() {
    local p
    while :; do
        p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        if [ "${1:-}" != pair ] || { [ "$p" -lt 65535 ] && port_free $((p + 1)); }; then
            echo "$p"
            return
        fi
    done
}

wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what not ready after ${secs}s"
        sleep 0.1
    done
}

# The PostgreSQL server and PgBouncer refuse to run as root: run them as the postgres OS user.
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# vault METHOD PATH [JSON]: an OpenBao API call with the root token; prints the body.
vault() {
    local method=$1 path=$2 body=${3:-} args=() out code
    args=(-sS -X "$method" -H "X-Vault-Token: root" -w '\n%{http_code}')
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data "$body")
    out=$(curl "${args[@]}" "$VAULT_ADDR/v1/$path") || die "OpenBao $method $path: curl failed"
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    case $code in
        2??) printf '%s' "$out" ;;
        *) die "OpenBao $method $path: HTTP $code $out" ;;
    esac
}

# field JSONPATH: reads JSON on stdin, prints obj[a][b]... for "a.b".
field() {
    python3 -c 'import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[k]
print(v if isinstance(v, str) else json.dumps(v))' "$1"
}

# CPU seconds (user+system) a process has used so far, from /proc/PID/stat.
# stat_ticks PID [children]: the CPU clock ticks of a process so far (0 once it is gone). Of the
# fields after the ")" that ends the command name, utime is the 12th and stime the 13th; with
# "children" also cutime and cstime, the ticks of the children it has reaped.
stat_ticks() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    rest=${stat##*) }
    awk -v c="${2:-}" '{ print $12 + $13 + (c == "children" ? $14 + $15 : 0) }' <<<"$rest"
}
cpu_seconds() { awk -v t="$(stat_ticks "$1")" -v tck="$CLK_TCK" 'BEGIN { printf "%.2f", t / tck }'; }
proc_status() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

psql_as() { # psql_as CONNINFO SQL
    PGPASSFILE=/nonexistent PGCONNECT_TIMEOUT=10 psql -X -w -q -tA -v ON_ERROR_STOP=1 "$1" -c "$2"
}

# --- start and stop ----------------------------------------------------------------------------

WORK='' BAO_PID='' DBWARD_PID='' PGB_PID='' PGB_RUNNER='' PGDATA=''
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - INT TERM EXIT
    if [ "$rc" -ne 0 ] && [ -n "$WORK" ]; then
        for f in "$WORK"/dbward.log "$WORK"/pgbouncer/pgbouncer.log "$WORK"/bao.log "$PGDATA"/postgres.log; do
            [ -s "$f" ] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
        done
    fi
    log "stopping dbward, PgBouncer, OpenBao and PostgreSQL"
    if [ -n "$DBWARD_PID" ] && kill -0 "$DBWARD_PID" 2>/dev/null; then
        kill -TERM "$DBWARD_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$DBWARD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DBWARD_PID" 2>/dev/null || true
    fi
    if [ -n "$PGB_PID" ]; then kill -TERM "$PGB_PID" 2>/dev/null || true; fi
    if [ -n "$PGB_RUNNER" ]; then wait "$PGB_RUNNER" 2>/dev/null || true; fi
    if [ -n "$BAO_PID" ]; then
        kill -TERM "$BAO_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$BAO_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$BAO_PID" 2>/dev/null || true
    fi
    if [ -n "$PGDATA" ] && [ -f "$PGDATA/postmaster.pid" ]; then
        as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ -n "$WORK" ]; then
        if [ -n "${KEEP_BENCH_DIR:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}

# --- what is needed ----------------------------------------------------------------------------

ensure_postgres
ensure_openbao
ensure_bench_tools
ensure_toolchain
command -v openssl >/dev/null 2>&1 || apt_install openssl
command -v curl >/dev/null 2>&1 || apt_install curl
command -v pgbench >/dev/null 2>&1 || apt_install postgresql-client-15

log "cargo build --release"
cargo build --release
DBWARD_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/dbward"
[ -x "$DBWARD_BIN" ] || die "$DBWARD_BIN is missing after cargo build --release"

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
WORK=$(mktemp -d /tmp/dbward-bench.XXXXXX)
chmod 755 "$WORK" # the postgres OS user needs to reach its data dir and PgBouncer's files

# --- OpenBao -----------------------------------------------------------------------------------

BAO_PORT=$(free_port pair)
VAULT_ADDR="http://127.0.0.1:$BAO_PORT"
log "OpenBao dev server on $VAULT_ADDR"
HOME="$WORK" "$DBWARD_BAO" server -dev -dev-root-token-id=root \
    -dev-listen-address="127.0.0.1:$BAO_PORT" >"$WORK/bao.log" 2>&1 &
BAO_PID=$!
wait_for 30 "OpenBao" curl -fsS "$VAULT_ADDR/v1/sys/health"

# --- PostgreSQL --------------------------------------------------------------------------------

PG_PORT=$(free_port)
PGDATA="$WORK/pg"
mkdir -p "$PGDATA"
chmod 700 "$PGDATA"
SUPER_PASSWORD=$(openssl rand -hex 16)
(umask 077 && printf '%s' "$SUPER_PASSWORD" >"$WORK/pg-password")
[ "$(id -u)" -ne 0 ] || chown postgres:postgres "$PGDATA" "$WORK/pg-password"
log "initdb (superuser postgres, scram-sha-256) and PostgreSQL on 127.0.0.1:$PG_PORT"
as_postgres "$PG_BIN/initdb" -D "$PGDATA" --auth=scram-sha-256 --pwfile="$WORK/pg-password" \
    -U postgres -N >"$WORK/initdb.log" 2>&1 || die "initdb failed: $(cat "$WORK/initdb.log")"
rm -f "$WORK/pg-password"
# One throwaway certificate for Postgres' TLS and dbward's client TLS (the TLS memory figure).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$WORK/tls.key" -out "$WORK/tls.crt" >/dev/null 2>&1 || die "openssl could not make a certificate"
cp "$WORK/tls.crt" "$PGDATA/server.crt"
cp "$WORK/tls.key" "$PGDATA/server.key"
chmod 600 "$PGDATA/server.key" "$WORK/tls.key"
[ "$(id -u)" -ne 0 ] || chown postgres:postgres "$PGDATA/server.crt" "$PGDATA/server.key"
# fsync off: a throwaway cluster; it only speeds up pgbench -i (the runs are read-only).
as_postgres "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/postgres.log" -w \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PGDATA -c max_connections=$((IDLE_SESSIONS + 100)) -c ssl=on -c fsync=off" start >/dev/null
PG_PID=$(head -n 1 "$PGDATA/postmaster.pid")

SUPER="host=127.0.0.1 port=$PG_PORT user=postgres password=$SUPER_PASSWORD"
psql_as "$SUPER dbname=postgres" "CREATE DATABASE $BENCH_DB" >/dev/null
psql_as "$SUPER dbname=postgres" "CREATE ROLE $BENCH_ROLE LOGIN PASSWORD '$(openssl rand -hex 16)'" >/dev/null
log "pgbench -i -s $SCALE (as the owner, postgres)"
PGPASSWORD="$SUPER_PASSWORD" PGPASSFILE=/nonexistent pgbench -i -q -s "$SCALE" \
    -h 127.0.0.1 -p "$PG_PORT" -U postgres "$BENCH_DB" >"$WORK/pgbench-init.log" 2>&1 ||
    die "pgbench -i failed: $(cat "$WORK/pgbench-init.log")"
psql_as "$SUPER dbname=$BENCH_DB" "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO $BENCH_ROLE" >/dev/null
log "COPY table bulk: about $COPY_MB MB of COPY text"
psql_as "$SUPER dbname=$BENCH_DB" "CREATE TABLE bulk AS SELECT g AS id, repeat('x', 192) AS pad FROM generate_series(1, $((COPY_MB * 5000))) g" >/dev/null
psql_as "$SUPER dbname=$BENCH_DB" "GRANT SELECT ON bulk TO $BENCH_ROLE" >/dev/null
psql_as "$SUPER dbname=$BENCH_DB" "VACUUM ANALYZE" >/dev/null

# --- OpenBao: static database role -------------------------------------------------------------

log "OpenBao: database secrets engine, static role '$BENCH_ROLE' (rotation 24h)"
vault POST sys/mounts/database '{"type":"database"}' >/dev/null
vault POST database/config/bench "$(python3 -c 'import json, sys; print(json.dumps({
    "plugin_name": "postgresql-database-plugin", "allowed_roles": "bench",
    "connection_url": "postgresql://{{username}}:{{password}}@127.0.0.1:%s/%s?sslmode=disable" % (sys.argv[1], sys.argv[2]),
    "username": "postgres", "password": sys.argv[3]}))' "$PG_PORT" "$BENCH_DB" "$SUPER_PASSWORD")" >/dev/null
# Creating the static role rotates the password at once: from then on only Vault knows it.
vault POST database/static-roles/bench "{\"db_name\":\"bench\",\"username\":\"$BENCH_ROLE\",\"rotation_period\":\"24h\"}" >/dev/null
BENCH_PASSWORD=$(vault GET database/static-creds/bench | field data.password)
[ -n "$BENCH_PASSWORD" ] || die "no password from database/static-creds/bench"
printf 'root' >"$WORK/vault-token"
chmod 600 "$WORK/vault-token"

# --- PgBouncer ---------------------------------------------------------------------------------

PGB_PORT=$(free_port)
mkdir -p "$WORK/pgbouncer"
printf '"%s" "%s"\n' "$BENCH_ROLE" "$BENCH_PASSWORD" >"$WORK/pgbouncer/userlist.txt"
cat >"$WORK/pgbouncer/pgbouncer.ini" <<EOF
[databases]
$BENCH_DB = host=127.0.0.1 port=$PG_PORT dbname=$BENCH_DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/pgbouncer/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 20
logfile = $WORK/pgbouncer/pgbouncer.log
pidfile = $WORK/pgbouncer/pgbouncer.pid
EOF
chmod 600 "$WORK/pgbouncer/userlist.txt"
[ "$(id -u)" -ne 0 ] || chown -R postgres:postgres "$WORK/pgbouncer"
log "PgBouncer $(pgbouncer --version | head -1 | awk '{print $2}') on 127.0.0.1:$PGB_PORT (session pool, scram-sha-256)"
as_postgres pgbouncer "$WORK/pgbouncer/pgbouncer.ini" >"$WORK/pgbouncer/stdout.log" 2>&1 &
PGB_RUNNER=$!
wait_for 20 "PgBouncer" test -s "$WORK/pgbouncer/pgbouncer.pid"
PGB_PID=$(cat "$WORK/pgbouncer/pgbouncer.pid")
wait_for 20 "PgBouncer port" bash -c "exec 3<>/dev/tcp/127.0.0.1/$PGB_PORT"

# --- dbward ------------------------------------------------------------------------------------

DBW_PORT=$(free_port)
DBW_ALLOW_PORT=$(free_port)
DBW_POOL_PORT=$(free_port)
DBW_TLS_PORT=$(free_port)
cat >"$WORK/dbward.toml" <<EOF
[vault]
address = "$VAULT_ADDR"
revoke_on_shutdown = false

[proxy]
${WORKER_THREADS:+worker_threads = $WORKER_THREADS}

[vault.auth]
method = "token"
token_file = "$WORK/vault-token"

[[databases]]
name = "bench"
listen = ["127.0.0.1:$DBW_PORT"]
upstream = "127.0.0.1:$PG_PORT"
sslmode = "disable"

[databases.credentials]
kind = "static"
role = "bench"

# The same, for callers in allowed_users only: every connection looks its caller up
# (ALLOWLIST_ROUNDS, benches/peer_lookup.sh).
[[databases]]
name = "bench_allow"
listen = ["127.0.0.1:$DBW_ALLOW_PORT"]
upstream = "127.0.0.1:$PG_PORT"
sslmode = "disable"
allowed_users = ["$(id -un)"]

[databases.credentials]
kind = "static"
role = "bench"

[[databases]]
name = "bench_pool"
listen = ["127.0.0.1:$DBW_POOL_PORT"]
upstream = "127.0.0.1:$PG_PORT"
sslmode = "disable"

[databases.credentials]
kind = "static"
role = "bench"

[databases.pool]

[[databases]]
name = "bench_tls"
listen = ["127.0.0.1:$DBW_TLS_PORT"]
upstream = "127.0.0.1:$PG_PORT"
sslmode = "require"
client_tls = { cert_file = "$WORK/tls.crt", key_file = "$WORK/tls.key" }

[databases.credentials]
kind = "static"
role = "bench"
EOF
log "dbward $DBWARD_BIN on 127.0.0.1:$DBW_PORT (RUST_LOG=$DBWARD_LOG, worker_threads=${WORKER_THREADS:-1 (default)})"
RUST_LOG="$DBWARD_LOG" "$DBWARD_BIN" run --config "$WORK/dbward.toml" >"$WORK/dbward.log" 2>&1 &
DBWARD_PID=$!
deadline=$((SECONDS + 30))
until ! port_free "$DBW_PORT" && ! port_free "$DBW_ALLOW_PORT"; do
    kill -0 "$DBWARD_PID" 2>/dev/null || die "dbward exited: $(cat "$WORK/dbward.log")"
    [ "$SECONDS" -lt "$deadline" ] || die "dbward not listening after 30s"
    sleep 0.1
done
sleep 0.5
IDLE_RSS_KB=$(proc_status "$DBWARD_PID" VmRSS)

# --- the targets -------------------------------------------------------------------------

TARGETS=(direct pgbouncer dbward dbward_pool)
NT=${#TARGETS[@]}
declare -A PORT=([direct]=$PG_PORT [pgbouncer]=$PGB_PORT [dbward]=$DBW_PORT [dbward_pool]=$DBW_POOL_PORT)
declare -A PASS=([direct]=$BENCH_PASSWORD [pgbouncer]=$BENCH_PASSWORD [dbward]='' [dbward_pool]='')
declare -A PROXY_PID=([pgbouncer]=$PGB_PID [dbward]=$DBWARD_PID [dbward_pool]=$DBWARD_PID)
for t in "${TARGETS[@]}"; do
    who=$(PGPASSWORD="${PASS[$t]}" psql_as "host=127.0.0.1 port=${PORT[$t]} dbname=$BENCH_DB user=$BENCH_ROLE" \
        "select current_user || ' ' || count(*) from pgbench_branches") || die "cannot query through $t: $who"
    [ "$who" = "$BENCH_ROLE $SCALE" ] || die "through $t: expected '$BENCH_ROLE $SCALE', got '$who'"
done
log "all targets log in as $BENCH_ROLE (PgBouncer and direct with the password from Vault, dbward without one)"

if [ "${HOLD:-}" = 1 ]; then
    (
        umask 077
        cat >"$WORK/targets.env" <<EOV
PG_PORT=$PG_PORT
PGB_PORT=$PGB_PORT
PGB_PID=$PGB_PID
DBW_PORT=$DBW_PORT
DBW_POOL_PORT=$DBW_POOL_PORT
DBWARD_PID=$DBWARD_PID
BENCH_DB=$BENCH_DB
BENCH_ROLE=$BENCH_ROLE
BENCH_PASSWORD=$BENCH_PASSWORD
EOV
    )
    log "HOLD=1: targets in $WORK/targets.env (source it); Ctrl-C or SIGTERM stops everything"
    # Interrupting the hold is its normal end. Short sleeps: bash runs the trap only once the
    # foreground command has ended.
    trap 'exit 0' INT TERM
    while true; do sleep 1; done
fi

WORKLOADS=(tput conn lat)
declare -A WL_ARGS=([tput]="-c $CLIENTS -j $PGBENCH_JOBS" [conn]="-C -c $CONN_CLIENTS -j $PGBENCH_JOBS" [lat]="-c 1 -j 1")
declare -A WL_NAME=([tput]="select-only, -c $CLIENTS -j $PGBENCH_JOBS" [conn]="select-only, -C -c $CONN_CLIENTS -j $PGBENCH_JOBS" [lat]="select-only, -c 1 -j 1")
declare -A TPS=() CPU=() TXNS=() LAT=() COPY_S=() COPY_CPU=() COPY_PG=() COPY_MACH=() MBUSY=() MIDLE=()

# machine_ticks: the whole machine's busy and idle clock ticks so far (/proc/stat, all CPUs).
# Busy is user, nice, system, irq, softirq and steal; idle is idle and iowait.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat; }
# postgres_ticks: CPU clock ticks of Postgres's processes so far: the live ones (a pooled
# backend lives on) and the ended ones, which the postmaster has reaped into its cutime/cstime.
postgres_ticks() {
    local total pid
    total=$(stat_ticks "$PG_PID" children)
    for pid in $(postgres_children); do total=$((total + $(stat_ticks "$pid"))); done
    echo "$total"
}
# postgres_children: the postmaster's live children (it is single-threaded, so its one task's
# list is all of them). Read from /proc: minimal images have no pgrep.
postgres_children() { cat "/proc/$PG_PID/task/$PG_PID/children" 2>/dev/null || true; }

# run_one TARGET WORKLOAD ROUND: one pgbench run; records tps, and the proxy's CPU seconds.
run_one() {
    local t=$1 w=$2 r=$3 out before=0 after=0 tps txns
    local pid=${PROXY_PID[$t]:-}
    [ -z "$pid" ] || before=$(cpu_seconds "$pid")
    local busy0 idle0 busy1 idle1
    read -r busy0 idle0 < <(machine_ticks)
    # shellcheck disable=SC2086 # WL_ARGS holds several arguments
    out=$(PGPASSWORD="${PASS[$t]}" PGPASSFILE=/nonexistent pgbench -n -S ${WL_ARGS[$w]} -T "$DURATION" \
        -h 127.0.0.1 -p "${PORT[$t]}" -U "$BENCH_ROLE" "$BENCH_DB" 2>&1) ||
        die "pgbench against $t ($w) failed: $out"
    read -r busy1 idle1 < <(machine_ticks)
    [ -z "$pid" ] || after=$(cpu_seconds "$pid")
    MBUSY[$t,$w,$r]=$((busy1 - busy0))
    MIDLE[$t,$w,$r]=$((idle1 - idle0))
    tps=$(awk '/^tps = / { print $3; exit }' <<<"$out")
    LAT[$t,$w,$r]=$(awk '/^latency average = / { print $4 * 1000; exit }' <<<"$out")
    txns=$(awk -F': ' '/number of transactions actually processed/ { split($2, a, "/"); print a[1]; exit }' <<<"$out")
    [ -n "$tps" ] || die "no tps in pgbench output for $t ($w): $out"
    TPS[$t,$w,$r]=$tps
    TXNS[$t,$w,$r]=${txns:-0}
    CPU[$t,$w,$r]=$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.2f", a - b }')
    printf '    round %d  %-9s %-5s %10.1f tps\n' "$r" "$t" "$w" "$tps" >&2
}

# --- the allowlist's cost (ALLOWLIST_ROUNDS > 0) -------------------------------------------------
# The new-connection workload against the same dbward, alternating between the entry without
# an allowlist and the one with allowed_users (a sock_diag lookup per connection).
if [ "${ALLOWLIST_ROUNDS:-0}" -gt 0 ]; then
    PORT[dbward_allow]=$DBW_ALLOW_PORT
    PASS[dbward_allow]=''
    PROXY_PID[dbward_allow]=$DBWARD_PID
    who=$(psql_as "host=127.0.0.1 port=$DBW_ALLOW_PORT dbname=$BENCH_DB user=x" "select current_user") ||
        die "the allowlisted entry refused this user: $who"
    log "allowlist cost: $ALLOWLIST_ROUNDS rounds x 2 entries x ${DURATION}s of -C (order alternates)"
    for ((r = 1; r <= ALLOWLIST_ROUNDS; r++)); do
        if ((r % 2)); then pair=(dbward dbward_allow); else pair=(dbward_allow dbward); fi
        # Rounds 101.. keep these runs apart from the main measurement's.
        for t in "${pair[@]}"; do run_one "$t" conn $((100 + r)); done
    done
    declare -A AMED=() AUS=()
    for t in dbward dbward_allow; do
        AMED[$t]=$(for ((r = 101; r <= 100 + ALLOWLIST_ROUNDS; r++)); do echo "${TPS[$t,conn,$r]}"; done | sort -g |
            awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
        AUS[$t]=$(for ((r = 101; r <= 100 + ALLOWLIST_ROUNDS; r++)); do echo "${CPU[$t,conn,$r]} ${TXNS[$t,conn,$r]}"; done |
            awk '{ c += $1; n += $2 } END { if (n > 0) printf "%.0f", c * 1e6 / n; else print "-" }')
    done
    echo
    echo "new connections (pgbench -S -C -c $CONN_CLIENTS), median of $ALLOWLIST_ROUNDS x ${DURATION}s; dbward CPU per connection:"
    echo "  without allowlist  ${AMED[dbward]} tps  ${AUS[dbward]} us"
    echo "  allowed_users      ${AMED[dbward_allow]} tps  ${AUS[dbward_allow]} us"
    echo "  ratio              $(awk -v a="${AMED[dbward_allow]}" -v b="${AMED[dbward]}" 'BEGIN { printf "%.3f", a / b }')"
    [ "${ALLOWLIST_ONLY:-0}" != 1 ] || exit 0
fi

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# copy_one TARGET RUN: wall seconds of psql's COPY bulk TO STDOUT into /dev/null, and the
# proxy's CPU seconds for it.
copy_one() {
    local t=$1 r=$2 start end before=0 after=0 pg0 pg1 busy0 busy1 idle0 idle1
    local pid=${PROXY_PID[$t]:-}
    [ -z "$pid" ] || before=$(cpu_seconds "$pid")
    pg0=$(postgres_ticks)
    local kids0 deadline
    kids0=$(postgres_children | wc -w)
    read -r busy0 idle0 < <(machine_ticks)
    start=$(date +%s.%N)
    PGPASSWORD="${PASS[$t]}" PGPASSFILE=/nonexistent psql -X -w -q -v ON_ERROR_STOP=1 \
        "host=127.0.0.1 port=${PORT[$t]} dbname=$BENCH_DB user=$BENCH_ROLE" -c 'COPY bulk TO STDOUT' >/dev/null ||
        die "COPY through $t failed"
    end=$(date +%s.%N)
    read -r busy1 idle1 < <(machine_ticks)
    # A backend of its own ends just after psql does; its CPU is counted once the postmaster
    # has reaped it.
    deadline=$((SECONDS + 10))
    while [ "$(postgres_children | wc -w)" -gt "$kids0" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    pg1=$(postgres_ticks)
    [ -z "$pid" ] || after=$(cpu_seconds "$pid")
    COPY_S[$t,$r]=$(awk -v a="$end" -v b="$start" 'BEGIN { printf "%.3f", a - b }')
    COPY_PG[$t,$r]=$(awk -v a="$pg1" -v b="$pg0" -v tck="$CLK_TCK" 'BEGIN { printf "%.2f", (a - b) / tck }')
    COPY_MACH[$t,$r]=$(awk -v a="$busy1" -v b="$busy0" -v tck="$CLK_TCK" 'BEGIN { printf "%.2f", (a - b) / tck }')
    COPY_CPU[$t,$r]=$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.2f", a - b }')
    printf '    run %2d  %-11s copy  %8s s  CPU: proxy %s s, Postgres %s s, machine %s s\n' "$r" "$t" "${COPY_S[$t,$r]}" \
        "${COPY_CPU[$t,$r]}" "${COPY_PG[$t,$r]}" "${COPY_MACH[$t,$r]}" >&2
}

log "measuring: $ROUNDS rounds x $NT targets x ${#WORKLOADS[@]} workloads x ${DURATION}s, and COPY (order rotates each round)"
for ((r = 1; r <= ROUNDS; r++)); do
    for w in "${WORKLOADS[@]}"; do
        for ((i = 0; i < NT; i++)); do
            run_one "${TARGETS[$(((i + r - 1) % NT))]}" "$w" "$r"
        done
    done
    # A single COPY's wall time moves by a quarter between runs on this kind of box: several
    # per round, interleaved, each target first in turn.
    for ((k = 1; k <= COPY_RUNS; k++)); do
        j=$(((r - 1) * COPY_RUNS + k))
        for ((i = 0; i < NT; i++)); do
            copy_one "${TARGETS[$(((i + j - 1) % NT))]}" "$j"
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- memory with idle sessions open ------------------------------------------------------------

# idle_rss PORT [tls]: dbward's VmRSS (KiB) before and with $IDLE_SESSIONS idle sessions open.
idle_rss() {
    local port=$1 tls=${2:-} before with line
    before=$(proc_status "$DBWARD_PID" VmRSS)
    # shellcheck disable=SC2086 # $tls is empty or one word
    coproc IDLE { exec python3 "$REPO_ROOT/benches/idle_sessions.py" "$port" "$IDLE_SESSIONS" "$BENCH_DB" "$BENCH_ROLE" $tls; }
    if ! read -r -t 300 line <&"${IDLE[0]}" || [ "${line%% *}" != ready ]; then
        die "could not open $IDLE_SESSIONS idle sessions on port $port"
    fi
    sleep 1
    with=$(proc_status "$DBWARD_PID" VmRSS)
    eval "exec ${IDLE[1]}>&-"
    wait "$IDLE_PID" 2>/dev/null || true
    # Let the sessions end before the next measurement.
    local deadline=$((SECONDS + 60))
    until [ "$(ss -Htn state established "( sport = :$port )" | wc -l)" -eq 0 ] || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.2; done
    IDLE_RESULT="$before $with"
}
log "dbward RSS with $IDLE_SESSIONS idle sessions: plaintext, then client TLS + upstream TLS"
idle_rss "$DBW_PORT"
read -r PLAIN_BEFORE PLAIN_WITH <<<"$IDLE_RESULT"
idle_rss "$DBW_TLS_PORT" tls
read -r TLS_BEFORE TLS_WITH <<<"$IDLE_RESULT"

# --- the table ---------------------------------------------------------------------------------

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -A MED=() US_PER_TXN=() MEDLAT=() MEDCOPY=() MEDCOPY_CPU=() MEDCOPY_PG=() MEDCOPY_MACH=() MACH_US=() MACH_BUSY=()
# copy_median ARRAY TARGET: the median of ARRAY[TARGET,run] over every COPY run of TARGET.
copy_median() {
    local -n per_run=$1
    local r vals=''
    for ((r = 1; r <= ROUNDS * COPY_RUNS; r++)); do vals+="${per_run[$2,$r]} "; done
    median <<<"$vals"
}
for t in "${TARGETS[@]}"; do
    MEDCOPY[$t]=$(copy_median COPY_S "$t")
    MEDCOPY_CPU[$t]=$(copy_median COPY_CPU "$t")
    MEDCOPY_PG[$t]=$(copy_median COPY_PG "$t")
    MEDCOPY_MACH[$t]=$(copy_median COPY_MACH "$t")
done
for w in "${WORKLOADS[@]}"; do
    for t in "${TARGETS[@]}"; do
        vals='' cpu=0 txns=0 busy=0 idle=0
        for ((r = 1; r <= ROUNDS; r++)); do
            vals+="${TPS[$t,$w,$r]} "
            busy=$((busy + MBUSY[$t,$w,$r]))
            idle=$((idle + MIDLE[$t,$w,$r]))
            cpu=$(awk -v a="$cpu" -v b="${CPU[$t,$w,$r]}" 'BEGIN { print a + b }')
            txns=$((txns + TXNS[$t,$w,$r]))
        done
        MED[$t,$w]=$(median <<<"$vals")
        lats=''
        for ((r = 1; r <= ROUNDS; r++)); do lats+="${LAT[$t,$w,$r]:-0} "; done
        MEDLAT[$t,$w]=$(median <<<"$lats")
        US_PER_TXN[$t,$w]=$(awk -v c="$cpu" -v n="$txns" 'BEGIN { if (n > 0) printf "%.0f", c * 1e6 / n; else print "-" }')
        MACH_US[$t,$w]=$(awk -v b="$busy" -v n="$txns" -v tck="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.0f", b / tck * 1e6 / n; else print "-" }')
        MACH_BUSY[$t,$w]=$(awk -v b="$busy" -v i="$idle" 'BEGIN { if (b + i > 0) printf "%.0f", 100 * b / (b + i); else print "-" }')
    done
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

HWM_KB=$(proc_status "$DBWARD_PID" VmHWM)
RSS_KB=$(proc_status "$DBWARD_PID" VmRSS)
THREADS=$(proc_status "$DBWARD_PID" Threads)
read -r DBW_UTIME DBW_STIME < <(awk -v tck="$CLK_TCK" '{ sub(/.*\) /, ""); printf "%.2f %.2f\n", $12 / tck, $13 / tck }' "/proc/$DBWARD_PID/stat")
PGB_CPU=$(cpu_seconds "$PGB_PID")

{
    echo
    echo "dbward pgbench comparison: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, loopback, pgbench -s $SCALE,"
    echo "${DURATION}s per run, $ROUNDS interleaved rounds, median tps; load average before $LOAD_BEFORE, after $LOAD_AFTER;"
    echo "PgBouncer $(pgbouncer --version | awk 'NR == 1 { print $2 }'), dbward $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+changes'), worker_threads=${WORKER_THREADS:-1 (default)}"
    echo
    printf '| %-34s | %9s | %9s | %9s | %11s | %13s | %16s | %18s |\n' workload direct pgbouncer dbward dbward_pool dbward/direct dbward/pgbouncer dbward_pool/direct
    printf '| %-34s | %9s | %9s | %9s | %11s | %13s | %16s | %18s |\n' "---" "---:" "---:" "---:" "---:" "---:" "---:" "---:"
    for w in "${WORKLOADS[@]}"; do
        printf '| %-34s | %9.0f | %9.0f | %9.0f | %11.0f | %13s | %16s | %18s |\n' "${WL_NAME[$w]} tps" \
            "${MED[direct,$w]}" "${MED[pgbouncer,$w]}" "${MED[dbward,$w]}" "${MED[dbward_pool,$w]}" \
            "$(ratio "${MED[dbward,$w]}" "${MED[direct,$w]}")" "$(ratio "${MED[dbward,$w]}" "${MED[pgbouncer,$w]}")" \
            "$(ratio "${MED[dbward_pool,$w]}" "${MED[direct,$w]}")"
    done
    printf '| %-34s | %9s | %9s | %9s | %11s | %13s | %16s | %18s |\n' "COPY bulk TO STDOUT, seconds" \
        "${MEDCOPY[direct]}" "${MEDCOPY[pgbouncer]}" "${MEDCOPY[dbward]}" "${MEDCOPY[dbward_pool]}" \
        "$(ratio "${MEDCOPY[dbward]}" "${MEDCOPY[direct]}")" "$(ratio "${MEDCOPY[dbward]}" "${MEDCOPY[pgbouncer]}")" \
        "$(ratio "${MEDCOPY[dbward_pool]}" "${MEDCOPY[direct]}")"
    echo
    added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f", a - b }'; }
    mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
    per() { awk -v a="$1" -v b="$2" -v n="$IDLE_SESSIONS" 'BEGIN { printf "%.1f", (a - b) / n }'; }
    echo "goals (benches/README.md):"
    printf '  1. CPU per select-only transaction (-c %s): pgbouncer %s us, dbward %s us (<= pgbouncer); throughput dbward/pgbouncer %s (>= 1.1)\n' \
        "$CLIENTS" "${US_PER_TXN[pgbouncer,tput]}" "${US_PER_TXN[dbward,tput]}" "$(ratio "${MED[dbward,tput]}" "${MED[pgbouncer,tput]}")"
    printf '  2. latency at -c 1: direct %.0f us; added by pgbouncer %s us, by dbward %s us (<= pgbouncer), by dbward_pool %s us\n' \
        "${MEDLAT[direct,lat]}" "$(added "${MEDLAT[pgbouncer,lat]}" "${MEDLAT[direct,lat]}")" \
        "$(added "${MEDLAT[dbward,lat]}" "${MEDLAT[direct,lat]}")" "$(added "${MEDLAT[dbward_pool,lat]}" "${MEDLAT[direct,lat]}")"
    printf '  3. memory: idle process RSS %s MiB; %s idle plaintext sessions: RSS %s MiB in total (<= 24), %s KiB per session (<= 16); TLS both ways: RSS %s MiB, %s KiB per session\n' \
        "$(mib "$IDLE_RSS_KB")" "$IDLE_SESSIONS" "$(mib "$PLAIN_WITH")" "$(per "$PLAIN_WITH" "$PLAIN_BEFORE")" \
        "$(mib "$TLS_WITH")" "$(per "$TLS_WITH" "$TLS_BEFORE")"
    printf '  4. COPY of ~%s MB, median of %s: direct %s s, pgbouncer %s s, dbward %s s (time dbward/pgbouncer %s, <= 1); proxy CPU per COPY: pgbouncer %s s, dbward %s s\n' \
        "$COPY_MB" "$((ROUNDS * COPY_RUNS))" "${MEDCOPY[direct]}" "${MEDCOPY[pgbouncer]}" "${MEDCOPY[dbward]}" "$(ratio "${MEDCOPY[dbward]}" "${MEDCOPY[pgbouncer]}")" \
        "${MEDCOPY_CPU[pgbouncer]}" "${MEDCOPY_CPU[dbward]}"
    printf '  5. a connection per transaction with the pool: dbward_pool/direct %s (>= 5)\n' "$(ratio "${MED[dbward_pool,conn]}" "${MED[direct,conn]}")"
    printf '  6. a connection per transaction without the pool: dbward/direct %s (>= 1.8)\n' "$(ratio "${MED[dbward,conn]}" "${MED[direct,conn]}")"
    echo
    echo "proxy CPU per transaction (user+sys of the proxy process over all rounds / transactions):"
    for w in "${WORKLOADS[@]}"; do
        printf '  %-30s pgbouncer %6s us   dbward %6s us   dbward_pool %6s us\n' "${WL_NAME[$w]}" "${US_PER_TXN[pgbouncer,$w]}" "${US_PER_TXN[dbward,$w]}" "${US_PER_TXN[dbward_pool,$w]}"
    done
    # What bounds throughput here: with every CPU busy, a target's tps is the machine's CPU
    # seconds divided by the CPU every process (pgbench, backends, proxy, kernel) spends on a
    # transaction, so a proxy gains throughput only by what it takes off that total.
    echo "whole machine during each workload (/proc/stat, all rounds): CPU busy, and CPU per transaction of all processes:"
    for w in "${WORKLOADS[@]}"; do
        printf '  %-30s' "${WL_NAME[$w]}"
        for t in "${TARGETS[@]}"; do printf '  %s %3s%% %5s us' "$t" "${MACH_BUSY[$t,$w]}" "${MACH_US[$t,$w]}"; done
        echo
    done
    # The backend producing the rows is the COPY's critical path: its CPU over the wall time says
    # how much of the COPY it spent on a CPU.
    echo "COPY, median per COPY: wall, Postgres CPU (the backend and the rest), machine CPU (of $(nproc) x wall):"
    for t in "${TARGETS[@]}"; do
        printf '  %-11s wall %6s s   Postgres %5s s   machine %5s s\n' "$t" "${MEDCOPY[$t]}" "${MEDCOPY_PG[$t]}" "${MEDCOPY_MACH[$t]}"
    done
    printf 'dbward process: peak RSS (VmHWM) %s MiB, RSS now %s MiB, %s threads, CPU time %ss user + %ss sys (PgBouncer: %ss)\n' \
        "$(awk -v k="$HWM_KB" 'BEGIN { printf "%.1f", k / 1024 }')" "$(awk -v k="$RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }')" \
        "$THREADS" "$DBW_UTIME" "$DBW_STIME" "$PGB_CPU"
    echo
    echo "every run (tps):"
    for w in "${WORKLOADS[@]}"; do
        for t in "${TARGETS[@]}"; do
            printf '  %-5s %-11s' "$w" "$t"
            for ((r = 1; r <= ROUNDS; r++)); do printf ' %10.1f' "${TPS[$t,$w,$r]}"; done
            echo
        done
    done
}

if [ -n "$CHECK" ]; then
    got=$(ratio "${MED[dbward,tput]}" "${MED[pgbouncer,tput]}")
    if awk -v g="$got" -v c="$CHECK" 'BEGIN { exit !(g < c) }'; then
        echo "check FAILED: dbward/pgbouncer throughput ratio $got < $CHECK"
        exit 1
    fi
    echo "check passed: dbward/pgbouncer throughput ratio $got >= $CHECK"
fi
exit 0
