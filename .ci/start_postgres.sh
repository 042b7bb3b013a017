#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the registry tests.
#
#   eval "$(.ci/start_postgres.sh)"     # exports FGSN_TEST_POSTGRES_URL
#
# Idempotent: a server already running on the same data directory is reused. Installs the
# Debian `postgresql` package only when no server binaries are found. Works as root (the
# server then runs as the `postgres` user) or as an ordinary user. Logs go to stderr; stdout
# carries only the `export` line. Stop it with: pg_ctl -D "$FGSN_PG_DIR/data" stop
set -euo pipefail

PG_DIR="${FGSN_PG_DIR:-/tmp/fgsn-ci-postgres}"
PG_PORT="${FGSN_PG_PORT:-54329}"
PG_USER="fgsn"
PG_PASSWORD="fgsn-ci-password"  # loopback-only throwaway server
PG_DB="fgsn_test"
DATA="$PG_DIR/data"

log() { echo "start_postgres: $*" >&2; }

find_bindir() {
    local candidate
    for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$candidate/initdb" && -x "$candidate/pg_ctl" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(command -v initdb)"
        return 0
    fi
    return 1
}

if ! BINDIR="$(find_bindir)"; then
    if [[ "$(id -u)" != 0 ]]; then
        log "PostgreSQL is not installed and we are not root; install the postgresql package"
        exit 1
    fi
    log "installing postgresql with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql </dev/null >&2
    BINDIR="$(find_bindir)"
fi

# As root, the server must run as an unprivileged user; Debian's package creates `postgres`.
if [[ "$(id -u)" == 0 ]]; then
    if ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir "$PG_DIR" --shell /usr/sbin/nologin postgres
    fi
    as_server() { runuser -u postgres -- "$@"; }
else
    as_server() { "$@"; }
fi

mkdir -p "$PG_DIR"
if [[ "$(id -u)" == 0 ]]; then chown postgres: "$PG_DIR"; fi

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    log "initdb in $DATA"
    pwfile="$(mktemp)"
    echo "$PG_PASSWORD" >"$pwfile"
    if [[ "$(id -u)" == 0 ]]; then chown postgres: "$pwfile"; fi
    as_server "$BINDIR/initdb" -D "$DATA" -U "$PG_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --no-locale >&2
    rm -f "$pwfile"
fi

ready() { as_server "$BINDIR/pg_isready" -h "$DATA" -p "$PG_PORT" -q; }
if ready; then
    log "server already running on $DATA"
else
    # A server killed with its session can leave a stale postmaster.pid, or still be exiting:
    # retry the start a few times rather than trusting `pg_ctl status`.
    for attempt in 1 2 3 4 5; do
        log "starting server on 127.0.0.1:$PG_PORT (attempt $attempt)"
        if as_server "$BINDIR/pg_ctl" -D "$DATA" -l "$PG_DIR/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$DATA -c fsync=off" \
            start >&2; then
            break
        fi
        sleep 2
    done
    ready || { log "PostgreSQL did not start; see $PG_DIR/server.log"; exit 1; }
fi

psql_local() { as_server "$BINDIR/psql" -h "$DATA" -p "$PG_PORT" -U "$PG_USER" -d postgres -qtA "$@"; }
if [[ "$(psql_local -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]]; then
    log "creating database $PG_DB"
    psql_local -c "CREATE DATABASE $PG_DB" >&2
fi

URL="postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
echo "export FGSN_TEST_POSTGRES_URL='$URL'"
