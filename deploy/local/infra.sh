#!/usr/bin/env bash
# Local infrastructure without containers: PostgreSQL, the tansu broker and the workspace's
# schema registry. Idempotent: every command is safe to run twice.
#
#   infra.sh up        start whatever is not running (installing tansu if missing)
#   infra.sh down      stop what this script started
#   infra.sh status    show what is running
#   infra.sh run CMD   bring everything up, run CMD, then stop only what this call started
#   infra.sh validator install (once) the Compose file validator; print its path
#   infra.sh registry-client
#                      install (once) Confluent's Python client for the registry conformance
#                      check; print the python that has it
#   infra.sh promtool  unpack (once) promtool from Debian's prometheus package; print its path
#   infra.sh asyncapi-validator
#                      install (once) the official AsyncAPI parser; print its node_modules
#   infra.sh openapi-tools
#                      install (once) openapi-spec-validator and schemathesis; print their bin
#
# Logs and data live in deploy/local/data/ (ignored by git).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DATA="${FERRYBOX_DATA:-$HERE/data}"
PG_HOST=127.0.0.1
PG_PORT=5432
KAFKA_PORT=9092
REGISTRY_PORT=8081
TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

mkdir -p "$DATA"
log() { printf '[infra] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # wait_for <what> <seconds> <command...>
    local what=$1 seconds=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "$what not ready after ${seconds}s"
            return 1
        fi
        sleep 0.2
    done
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- PostgreSQL -----------------------------------------------------------------------------

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }

postgres_up() {
    if pg_ready; then return 0; fi
    log "starting PostgreSQL"
    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
    if [[ -z "$version" ]]; then
        log "PostgreSQL is not running on $PG_HOST:$PG_PORT and no local cluster was found"
        return 1
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for PostgreSQL 60 pg_ready
}

psql_admin() { psql -v ON_ERROR_STOP=1 -qtA -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres "$@"; }

ensure_database() {
    if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$1'")" ]]; then
        log "creating database $1"
        psql_admin -c "CREATE DATABASE \"$1\""
    fi
}

# --- a private PostgreSQL cluster that allows logical replication ---------------------------
#
# The relay's default mode reads the write-ahead log, which needs `wal_level = logical`. The
# machine's own server is left untouched: a private cluster in $DATA/pg, made and started from
# the machine's PostgreSQL binaries, listens on $LOCAL_PG_PORT. Every command run through
# `infra.sh run` gets FERRYBOX_TEST_DATABASE_URL pointing at it.

LOCAL_PG_PORT="${FERRYBOX_LOCAL_PG_PORT:-5433}"
LOCAL_PG_DATA="${FERRYBOX_LOCAL_PG_DATA:-$DATA/pg}"
# Run as root, the cluster belongs to the `postgres` user, which may not be able to reach a
# checkout under a private home directory: then it lives in the temporary directory instead
# (one per checkout).
if [[ -z "${FERRYBOX_LOCAL_PG_DATA:-}" && "$(id -u)" == 0 ]] \
    && ! runuser -u postgres -- test -x "$DATA" 2>/dev/null; then
    LOCAL_PG_DATA="${TMPDIR:-/tmp}/ferrybox-pg-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
fi

pg_bin() { # pg_bin <program>: the newest installed PostgreSQL's program
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
    if [[ -n "$dir" && -x "$dir/$1" ]]; then echo "$dir/$1"; else command -v "$1"; fi
}

# Runs a PostgreSQL program as the owner of the private cluster (PostgreSQL refuses root).
as_pg_owner() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

local_pg_ready() { pg_isready -q -h 127.0.0.1 -p "$LOCAL_PG_PORT"; }

local_postgres_up() {
    if local_pg_ready; then return 0; fi
    if [[ ! -f "$LOCAL_PG_DATA/PG_VERSION" ]]; then
        log "creating a private PostgreSQL cluster in $LOCAL_PG_DATA (logical replication on)"
        rm -rf "$LOCAL_PG_DATA"
        mkdir -p "$LOCAL_PG_DATA"
        if [[ "$(id -u)" == 0 ]]; then chown postgres: "$LOCAL_PG_DATA"; fi
        chmod 700 "$LOCAL_PG_DATA"
        as_pg_owner "$(pg_bin initdb)" -D "$LOCAL_PG_DATA" -U postgres --auth=trust \
            --encoding=UTF8 --locale=C.UTF-8 >"$DATA/pg-initdb.log" 2>&1
    fi
    # Settings as the command line, so a cluster made by an older version of this script gets
    # them too. Room for the tests' many databases, each with its own slot and sender.
    log "starting the private PostgreSQL on 127.0.0.1:$LOCAL_PG_PORT"
    as_pg_owner "$(pg_bin pg_ctl)" -D "$LOCAL_PG_DATA" -l "$LOCAL_PG_DATA/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$LOCAL_PG_PORT -c unix_socket_directories='' \
            -c wal_level=logical -c max_replication_slots=200 -c max_wal_senders=200 \
            -c max_connections=500 -c shared_buffers=512MB -c max_slot_wal_keep_size=4GB \
            -c wal_sender_timeout=30s" \
        start >/dev/null
    wait_for "private PostgreSQL" 60 local_pg_ready
}

local_postgres_down() {
    if [[ -f "$LOCAL_PG_DATA/postmaster.pid" ]] && local_pg_ready; then
        log "stopping the private PostgreSQL"
        as_pg_owner "$(pg_bin pg_ctl)" -D "$LOCAL_PG_DATA" -m fast -w stop >/dev/null || true
    fi
}

# --- tansu (Kafka-protocol broker) -------------------------------------------------------

tansu_installed() {
    command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"
}

tansu_up() {
    if port_open "$KAFKA_PORT"; then return 0; fi
    if ! tansu_installed; then
        log "installing tansu $TANSU_VERSION (once per machine, several minutes)"
        cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore
    fi
    log "starting tansu on 127.0.0.1:$KAFKA_PORT"
    # In memory by default: tansu 0.6's sqlite engine serves fetches at ~100 records/s, which
    # would make every consumer test and benchmark measure tansu instead of Ferrybox. Set
    # FERRYBOX_TANSU_STORAGE=sqlite://tansu.db for a broker that survives a restart (sqlite://
    # paths are relative to the working directory: it runs from the data folder).
    (cd "$DATA"; exec nohup tansu broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine "${FERRYBOX_TANSU_STORAGE:-memory://tansu/}" \
        >"$DATA/tansu.log" 2>&1) &
    echo $! >"$DATA/tansu.pid"
    wait_for tansu 60 port_open "$KAFKA_PORT"
}

# --- schema registry ----------------------------------------------------------------------

registry_ready() { curl -fsS "http://127.0.0.1:$REGISTRY_PORT/subjects" >/dev/null 2>&1; }

registry_up() {
    if registry_ready; then return 0; fi
    ensure_database ferrybox_registry
    log "building and starting the schema registry on 127.0.0.1:$REGISTRY_PORT"
    (cd "$ROOT" && cargo build --quiet -p schema-registry --bin ferrybox-schema-registry)
    local target="${CARGO_TARGET_DIR:-$ROOT/target}"
    REGISTRY_LISTEN="127.0.0.1:$REGISTRY_PORT" \
    REGISTRY_DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT/ferrybox_registry" \
        nohup "$target/debug/ferrybox-schema-registry" >"$DATA/registry.log" 2>&1 &
    echo $! >"$DATA/registry.pid"
    wait_for "schema registry" 60 registry_ready
}

# --- commands -------------------------------------------------------------------------------

stop_pidfile() { # stop_pidfile <name>
    local file="$DATA/$1.pid"
    if pid_alive "$file"; then
        local pid
        pid="$(cat "$file")"
        log "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

up() {
    postgres_up
    local_postgres_up
    tansu_up
    registry_up
    log "ready: postgres $PG_HOST:$PG_PORT, private postgres 127.0.0.1:$LOCAL_PG_PORT (logical replication), kafka 127.0.0.1:$KAFKA_PORT, registry http://127.0.0.1:$REGISTRY_PORT"
}

down() {
    stop_pidfile registry
    stop_pidfile tansu
    local_postgres_down
}

status() {
    local rc=0
    if pg_ready; then echo "postgres  up    $PG_HOST:$PG_PORT"; else echo "postgres  down"; rc=1; fi
    if local_pg_ready; then echo "postgres  up    127.0.0.1:$LOCAL_PG_PORT (private, logical replication)"; else echo "postgres  down  127.0.0.1:$LOCAL_PG_PORT (private)"; rc=1; fi
    if port_open "$KAFKA_PORT"; then echo "kafka     up    127.0.0.1:$KAFKA_PORT$(pid_alive "$DATA/tansu.pid" && echo " (started here, pid $(cat "$DATA/tansu.pid"))")"; else echo "kafka     down"; rc=1; fi
    if registry_ready; then echo "registry  up    http://127.0.0.1:$REGISTRY_PORT$(pid_alive "$DATA/registry.pid" && echo " (started here, pid $(cat "$DATA/registry.pid"))")"; else echo "registry  down"; rc=1; fi
    return $rc
}

# --- the Compose file validator (check-jsonschema from PyPI, with the compose-spec schema) ---

VALIDATOR_VERSION=0.39.0

validator() {
    local venv="$DATA/venv-check-jsonschema-$VALIDATOR_VERSION"
    # Tests ask for it in parallel: one installs, the others wait.
    exec 9>"$DATA/validator.lock"
    flock 9
    if [[ ! -x "$venv/bin/check-jsonschema" ]]; then
        log "installing check-jsonschema $VALIDATOR_VERSION (once per machine)"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "check-jsonschema==$VALIDATOR_VERSION"
    fi
    echo "$venv/bin/check-jsonschema"
}

# --- a Python venv with a pinned requirements file installed (for the checkers' tools) ----------

# Prints the path of venv NAME with REQUIREMENTS installed (WHAT says what, in the log). It is
# named after the pins, so changing one installs a new venv. Tests ask in parallel: one
# installs, the others wait; the stamp is written last, so an install cut short is redone.
pip_venv() {
    local name="$1" requirements="$2" what="$3" pins venv
    pins="$(sha256sum "$requirements" | cut -c1-12)"
    venv="$DATA/venv-$name-$pins"
    exec 9>"$DATA/$name.lock"
    flock 9
    if [[ ! -f "$venv/.installed" ]]; then
        log "installing $what (once per machine)"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
            -r "$requirements"
        touch "$venv/.installed"
    fi
    echo "$venv"
}

# --- Confluent's Python client (confluent-kafka + fastavro from PyPI), for the registry's
# --- conformance check (schema-registry/conformance/) -------------------------------------

REGISTRY_CLIENT_REQUIREMENTS="$HERE/schema-registry/conformance/requirements.txt"

registry_client() {
    local venv
    venv="$(pip_venv registry-client "$REGISTRY_CLIENT_REQUIREMENTS" "Confluent's Python client")"
    echo "$venv/bin/python"
}

# --- promtool, from Debian's prometheus package (unpacked here, nothing installed system-wide),
# --- for the rules under deploy/prometheus/ ------------------------------------------------

promtool_path() {
    local dir="$DATA/prometheus-deb"
    # Tests ask for it in parallel: one unpacks, the others wait.
    exec 9>"$DATA/promtool.lock"
    flock 9
    # The directory is moved into place last, so a download cut short is redone, not trusted.
    if [[ ! -x "$dir/usr/bin/promtool" ]]; then
        log "unpacking promtool from Debian's prometheus package (once per machine)"
        local work
        work="$(mktemp -d "$DATA/prometheus-download.XXXXXX")"
        chmod 755 "$work"
        # A machine whose package lists were never fetched has no candidate yet.
        if ! (cd "$work" && apt-get download -qq prometheus 2>/dev/null); then
            apt-get update -qq
            (cd "$work" && apt-get download -qq prometheus)
        fi
        rm -rf "$dir.partial"
        dpkg-deb -x "$work"/prometheus_*.deb "$dir.partial"
        rm -rf "$work"
        mv "$dir.partial" "$dir"
    fi
    echo "$dir/usr/bin/promtool"
}

# --- the official AsyncAPI parser (@asyncapi/parser and its Avro schema parser, from npm, at
# --- the versions deploy/local/asyncapi/package-lock.json pins), for schemas/asyncapi.json ----

ASYNCAPI_DIR="$HERE/asyncapi"

asyncapi_validator() {
    # The install is named after the pinned lock file: changing a pin installs a new one.
    local pins dir
    pins="$(cat "$ASYNCAPI_DIR/package.json" "$ASYNCAPI_DIR/package-lock.json" | sha256sum | cut -c1-12)"
    dir="$DATA/asyncapi-validator-$pins"
    # Tests ask for it in parallel: one installs, the others wait.
    exec 9>"$DATA/asyncapi-validator.lock"
    flock 9
    # The stamp is written last, so an install that was cut short is redone, not trusted.
    if [[ ! -f "$dir/.installed" ]]; then
        log "installing the AsyncAPI parser from npm (once per machine)"
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$ASYNCAPI_DIR/package.json" "$ASYNCAPI_DIR/package-lock.json" "$dir/"
        (cd "$dir" && npm ci --silent --no-audit --no-fund --ignore-scripts >&2)
        touch "$dir/.installed"
    fi
    echo "$dir/node_modules"
}

# --- the OpenAPI checks (openapi-spec-validator and schemathesis from PyPI, pinned in
# --- deploy/local/openapi/requirements.txt) ---------------------------------------------------

OPENAPI_REQUIREMENTS="$HERE/openapi/requirements.txt"

openapi_tools() {
    local venv
    venv="$(pip_venv openapi "$OPENAPI_REQUIREMENTS" "openapi-spec-validator and schemathesis")"
    echo "$venv/bin"
}

STARTED=()
run() {
    port_open "$KAFKA_PORT" || STARTED+=(tansu)
    local_pg_ready || STARTED+=(local_postgres)
    registry_ready || STARTED+=(registry)
    cleanup() {
        local name
        for name in "${STARTED[@]}"; do
            if [[ "$name" == local_postgres ]]; then local_postgres_down; else stop_pidfile "$name"; fi
        done
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    up
    export FERRYBOX_TEST_DATABASE_URL="${FERRYBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:$LOCAL_PG_PORT/postgres}"
    "$@"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    run) shift; [[ $# -gt 0 ]] || { echo "usage: $0 run CMD..." >&2; exit 2; }; run "$@" ;;
    validator) validator ;;
    registry-client) registry_client ;;
    promtool) promtool_path ;;
    asyncapi-validator) asyncapi_validator ;;
    openapi-tools) openapi_tools ;;
    *) echo "usage: $0 up|down|status|run CMD...|validator|registry-client|promtool|asyncapi-validator|openapi-tools" >&2; exit 2 ;;
esac
