#!/usr/bin/env bash
# Platform load benchmark: one epm-platform on 127.0.0.1, AGENTS simulated
# agents enrolled, then all of them checking in back to back for SECONDS.
# Prints check-ins per second and latency. Record results in
# docs/performance.md with the machine and the date.
#
#   scripts/bench-platform.sh [AGENTS] [SECONDS] [RULES]
set -euo pipefail
cd "$(dirname "$0")/.."

agents="${1:-1000}"
seconds="${2:-20}"
rules="${3:-1000}"
port=18443
work="$(mktemp -d)"
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release -q -p epm-platform --bin epm-platform --example loadgen
bin=target/release/epm-platform

EPM_ADMIN_TOKEN="$("$bin" admin create --data "$work/data" --name bench --approver-level 1)"
export EPM_ADMIN_TOKEN
# The load generator is one address standing for a whole fleet: lift the
# per-client connection cap and the call rates, which would otherwise (and
# rightly) stop one client asking this much.
EPM_LOG=warn "$bin" serve --data "$work/data" --listen "127.0.0.1:$port" \
    --max-connections-per-client "$((agents + 64))" --max-connections "$((agents + 1024))" \
    --calls-per-second-per-client 0 --calls-per-second-per-identity 0 &
server=$!
for _ in $(seq 100); do
    "$bin" --url "https://127.0.0.1:$port" --data "$work/data" admin list >/dev/null 2>&1 && break
    sleep 0.1
done

python3 scripts/gen-policy.py "$rules" >"$work/policy.json"
"$bin" --url "https://127.0.0.1:$port" --data "$work/data" policy push "$work/policy.json"
token="$("$bin" --url "https://127.0.0.1:$port" --data "$work/data" enroll-token create --uses "$agents" --expires 1h)"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"
echo "policy: $rules rules; agents: $agents; steady state for ${seconds}s"
target/release/examples/loadgen "https://127.0.0.1:$port" "$work/data/ca.pem" "$token" "$agents" "$seconds"
