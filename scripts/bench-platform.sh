#!/usr/bin/env bash
# Platform load benchmark: simulated agents over TLS against
#   sqlite     one epm-platform on an SQLite file,
#   postgres   one epm-platform on PostgreSQL,
#   postgres2  two epm-platform instances on one PostgreSQL database
#              (agents spread over both, as a load balancer would),
# for (a) check-ins with an unchanged bundle and (b) check-ins that each
# upload 100 audit records, each measured two ways (crates/epm-platform/
# examples/loadgen.rs):
#   closed loop  AGENTS agents checking in back to back: the peak
#                throughput. Its latency is mostly the generator's own
#                queue (AGENTS / throughput), so it is printed but is not
#                the latency figure.
#   open loop    check-ins started on a schedule (Poisson arrivals) at the
#                target rate, EPM_BENCH_RATE_CHECKIN (default 1000/s) and
#                EPM_BENCH_RATE_AUDIT (default 200/s), over
#                EPM_BENCH_OPEN_AGENTS agents (default 256), each timed from
#                its scheduled start, late starts counted: p50/p99/max at
#                the target rate, what a fleet's timers see.
# Record results in docs/scale.md with the machine, the date and what else
# ran on it.
#
#   scripts/bench-platform.sh [AGENTS] [SECONDS] [RULES] [BACKENDS...]
#
# PostgreSQL: EPM_BENCH_POSTGRES_URL (a server where this user may CREATE
# DATABASE), else a private cluster is started in a temporary directory as
# the `postgres` user (Debian's postgresql package, run as root) and
# stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

agents="${1:-64}"
seconds="${2:-15}"
rules="${3:-1000}"
shift $(($# < 3 ? $# : 3))
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(sqlite postgres postgres2)
rate_checkin="${EPM_BENCH_RATE_CHECKIN:-1000}"
rate_audit="${EPM_BENCH_RATE_AUDIT:-200}"
open_agents="${EPM_BENCH_OPEN_AGENTS:-256}"
port=18443
work="$(mktemp -d)"
servers=()
pgdata=""
pgbin=""
pg_server=""
cleanup() {
    local status=$?
    if [ "$status" -ne 0 ] && [ -s "$work/server.log" ]; then
        echo "the servers' log, last lines:" >&2
        tail -20 "$work/server.log" >&2
    fi
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$pgdata" ]; then
        su postgres -c "$pgbin/pg_ctl -D '$pgdata' -m fast stop" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q -p epm-platform --bin epm-platform --example loadgen
# EPM_BENCH_PLATFORM: another epm-platform binary (an earlier build, to
# compare a change against it on the same machine at the same time).
bin="${EPM_BENCH_PLATFORM:-target/release/epm-platform}"
# EPM_BENCH_CONNECT_EACH=1: the open-loop check-ins each on a new
# connection with a full TLS handshake (what a fleet syncing every few
# minutes costs), instead of kept-alive connections.
open_flags=()
[ "${EPM_BENCH_CONNECT_EACH:-0}" = 1 ] && open_flags=(--connect-each)
python3 scripts/gen-policy.py "$rules" >"$work/policy.json"

# Sets $pg_server: EPM_BENCH_POSTGRES_URL, or a private cluster started
# once (not in a subshell: cleanup must see $pgdata to stop it).
start_postgres() {
    if [ -n "${EPM_BENCH_POSTGRES_URL:-}" ]; then
        pg_server="$EPM_BENCH_POSTGRES_URL"
        return
    fi
    if [ -z "$pgdata" ]; then
        pgbin="$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d | sort -V | tail -1)"
        pgdata="$work/pgdata"
        mkdir -p "$pgdata" && chown postgres "$pgdata" && chmod 755 "$work"
        su postgres -c "$pgbin/initdb -D '$pgdata' --no-locale -E UTF8 -A trust -U postgres" >/dev/null
        su postgres -c "$pgbin/pg_ctl -D '$pgdata' -l '$pgdata/log' -w -o '-p 55439 -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200' start" >/dev/null
    fi
    pg_server="postgres://postgres@127.0.0.1:55439/postgres"
}

# Starts $3 instances on data directory $1 and database $2, one after the
# other (the first makes the keys the others share); sets $urls.
start_instances() {
    local data="$1" database="$2" n="$3" i u list=()
    for i in $(seq 0 $((n - 1))); do
        u="https://127.0.0.1:$((port + i))"
        # The load generator is one address standing for a whole fleet:
        # lift the per-client connection cap and the call and audit rates,
        # which would otherwise (and rightly) stop one client asking this much.
        EPM_LOG=warn "$bin" serve --data "$data" --database "$database" \
            --listen "127.0.0.1:$((port + i))" \
            --max-connections-per-client "$((agents + open_agents + 64))" --max-connections "$((agents + open_agents + 1024))" \
            --calls-per-second-per-client 0 --calls-per-second-per-identity 0 \
            --audit-records-per-hour 100000000 --audit-mib-per-hour 100000 \
            >>"$work/server.log" 2>&1 &
        servers+=($!)
        for _ in $(seq 300); do
            "$bin" --url "$u" --data "$data" admin list >/dev/null 2>&1 && break
            sleep 0.1
        done
        list+=("$u")
    done
    urls="$(IFS=,; echo "${list[*]}")"
}

stop_instances() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    servers=()
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "policy: $rules rules; closed loop: $agents agents; open loop: $open_agents agents at $rate_checkin unchanged / $rate_audit audit-uploading check-ins/s; ${seconds}s per measurement"
run=0
for backend in "${backends[@]}"; do
    run=$((run + 1))
    data="$work/data-$run"
    case "$backend" in
        sqlite) database="sqlite://$data/platform.db"; instances=1 ;;
        postgres | postgres2)
            start_postgres
            name="epm_bench_$$_$run"
            psql -q "$pg_server" -c "CREATE DATABASE $name" >/dev/null
            database="${pg_server%/*}/$name"
            instances=1
            [ "$backend" = postgres2 ] && instances=2
            ;;
        *) echo "unknown backend $backend: sqlite, postgres or postgres2" >&2; exit 2 ;;
    esac
    mkdir -p "$data"
    # Ports of their own per run: the last run's may linger a moment.
    port=$((18443 + run * 10))
    # Offline (no token in the environment): the first admin of this database.
    unset EPM_ADMIN_TOKEN
    EPM_ADMIN_TOKEN="$("$bin" admin create --data "$data" --database "$database" --name bench --approver-level 1)"
    export EPM_ADMIN_TOKEN
    start_instances "$data" "$database" "$instances"
    first="${urls%%,*}"
    "$bin" --url "$first" --data "$data" policy push "$work/policy.json" >/dev/null
    token="$("$bin" --url "$first" --data "$data" enroll-token create --uses "$(((agents + open_agents) * 2))" --expires 1h)"
    echo "== $backend ($instances instance(s))"
    loadgen=(target/release/examples/loadgen "$urls" "$data/ca.pem" "$token")
    "${loadgen[@]}" "$agents" "$seconds" checkin
    "${loadgen[@]}" "$open_agents" "$seconds" checkin --rate "$rate_checkin" "${open_flags[@]}"
    "${loadgen[@]}" "$agents" "$seconds" audit100
    "${loadgen[@]}" "$open_agents" "$seconds" audit100 --rate "$rate_audit" "${open_flags[@]}"
    stop_instances
done
