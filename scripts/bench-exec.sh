#!/usr/bin/env bash
# Exec overhead of epmd: fork + exec + wait of /bin/true, RUNS times, with no
# listener, with a bare allow-all FAN_OPEN_EXEC_PERM listener on every mount
# (examples/gate_floor.rs raw: the floor any fanotify gate pays), with epmd
# enforcing a 10 000-rule policy on every mount, and with fapolicyd when it
# is installed. /bin/true is a system program the policy allows for
# everyone, so after its first exec epmd's kernel cache answers it (issue
# 17): that line is the cached path; the program a user can write is never
# cached, so its line is the miss path (a decision-cache hit in epmd). Also epmd's RSS with 100 000 rules and its
# decision latency from `epmctl status`. epmd runs with its default kernel
# exec hook (where the kernel allows it; the output says whether it ran), and
# once more with `[kernel_hook] enabled = false`, so the hook's own cost on
# ordinary execs is the difference. Needs root (fanotify).
#
# Usage: sudo scripts/bench-exec.sh [RUNS]     (default 3000)
#
# EPMD_BEFORE=/path/to/an/older/epmd also measures that binary, in the same
# run, right before this tree's (the exec overhead before and after a
# change): build the older tree's `cargo build --release -p epm-agent --bin
# epmd` elsewhere and point at it.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-3000}
before_bin=${EPMD_BEFORE:-}
if [[ -n $before_bin && ! -x $before_bin ]]; then
    echo "EPMD_BEFORE=$before_bin is not an executable" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "bench-exec.sh needs root: fanotify permission events need CAP_SYS_ADMIN" >&2
    exit 1
fi

echo "building release binaries..." >&2
cargo build --release --quiet -p epm-agent --bin epmd --example exec_loop --example gate_floor
cargo build --release --quiet -p epmctl
bin=target/release
loop_bin=$bin/examples/exec_loop

work=$(mktemp -d)
epmd_pid=
cleanup() {
    if [[ -n $epmd_pid ]]; then kill "$epmd_pid" 2>/dev/null || true; wait "$epmd_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

start_epmd() { # $1 = rule count, $2 = the epmd binary (default: this tree's), $3 = kernel hook (true/false, default true)
    local epmd=${2:-$bin/epmd}
    python3 scripts/gen-policy.py "$1" >"$work/policy.json"
    cat >"$work/epmd.toml" <<TOML
state_dir = "$work/state"
socket = "$work/epmd.sock"
policy_file = "$work/policy.json"
[gate]
watch_paths = ["/"]
[kernel_hook]
enabled = ${3:-true}
TOML
    rm -rf "$work/state"
    "$epmd" --config "$work/epmd.toml" 2>"$work/epmd.log" &
    epmd_pid=$!
    for _ in $(seq 1 200); do
        if $bin/epmctl --socket "$work/epmd.sock" status >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    echo "epmd did not start:" >&2; cat "$work/epmd.log" >&2; exit 1
}

stop_epmd() {
    kill -TERM "$epmd_pid"; wait "$epmd_pid" || true; epmd_pid=
}

echo "measuring $runs execs without a listener..." >&2
base=$($loop_bin "$runs")

echo "measuring $runs execs with a bare allow-all listener..." >&2
$bin/examples/gate_floor raw &
floor_pid=$!
sleep 0.5
bare=$($loop_bin "$runs")
kill "$floor_pid"; wait "$floor_pid" 2>/dev/null || true

# epmd's own CPU time (clock ticks) and voluntary context switches (all its
# threads), to see what it costs the machine besides the exec's wait.
epmd_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$epmd_pid/stat"; }
epmd_switches() { cat /proc/"$epmd_pid"/task/*/status | awk '/^voluntary_ctxt_switches/ { n += $2 } END { print n }'; }
# epmd's system calls (all its threads) during the loop, counted by the
# kernel's syscall tracepoint (perf stat): a count the machine's other load
# does not change, unlike the times. Empty when perf cannot count them.
have_perf=
if command -v perf >/dev/null 2>&1 && perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
    have_perf=1
fi
# Each loop is 50 warm-up execs and then $runs measured ones; epmd's
# counters see all of them.
counted=$((runs + 50))

# A program a user could write (owned by nobody): since issue 15 epmd takes
# a read lease on such a file for each exec, which system programs (only
# root writes them) do not need.
user_program=$work/user-true
cp /bin/true "$user_program"
chown 65534:65534 "$user_program"
chmod 0755 "$user_program"
base_user=$($loop_bin "$runs" "$user_program")

# Sets per_exec (µs), ticks (epmd's CPU) and switches (its voluntary
# context switches) for the loop under one epmd, left running, and
# per_user_exec for the loop of the user's program.
measure_epmd() { # $1 = the epmd binary, $2 = kernel hook (true/false)
    start_epmd 10000 "$1" "${2:-true}"
    local ticks_before switches_before perf_pid=
    syscalls=
    if [[ -n $have_perf ]]; then
        perf stat -x, -e raw_syscalls:sys_enter -p "$epmd_pid" -o "$work/perf.txt" &
        perf_pid=$!
        sleep 0.5
    fi
    ticks_before=$(epmd_cpu_ticks) switches_before=$(epmd_switches)
    per_exec=$($loop_bin "$runs")
    ticks=$(($(epmd_cpu_ticks) - ticks_before)) switches=$(($(epmd_switches) - switches_before))
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
        syscalls=$(awk -F, '/raw_syscalls/ { print $1 }' "$work/perf.txt")
    fi
    per_user_exec=$($loop_bin "$runs" "$user_program")
}

if [[ -n $before_bin ]]; then
    echo "measuring $runs execs with the earlier epmd ($before_bin) enforcing 10000 rules..." >&2
    measure_epmd "$before_bin"
    before_epmd=$per_exec before_ticks=$ticks before_switches=$switches before_user=$per_user_exec before_syscalls=$syscalls
    stop_epmd
fi
echo "measuring $runs execs with epmd enforcing 10000 rules, without the kernel hook..." >&2
measure_epmd "$bin/epmd" false
without_hook=$per_exec
stop_epmd
echo "measuring $runs execs with epmd enforcing 10000 rules..." >&2
measure_epmd "$bin/epmd"
with_epmd=$per_exec with_user=$per_user_exec
status=$($bin/epmctl --socket "$work/epmd.sock" status --json)
hook_state=$(python3 -c 'import json,sys; h=json.load(sys.stdin).get("kernel_hook") or {}; print(h.get("state", "n/a"))' <<<"$status")
stop_epmd

fapolicyd_line="fapolicyd: not installed"
if command -v fapolicyd >/dev/null 2>&1; then
    echo "measuring $runs execs with fapolicyd (two allow rules, file trust)..." >&2
    # Run fapolicyd the way its own comparison is usually made: two rules,
    # the file trust backend, in the foreground. Its configuration is
    # restored afterwards.
    conf=/etc/fapolicyd
    cp -a "$conf" "$work/fapolicyd.saved"
    restore_fapolicyd() { rm -rf "$conf" && cp -a "$work/fapolicyd.saved" "$conf"; }
    sed -i 's/^trust = .*/trust = file/; s/^uid = .*/uid = root/; s/^gid = .*/gid = root/' "$conf/fapolicyd.conf"
    rm -f "$conf"/rules.d/*.rules
    printf 'allow perm=execute all : all\nallow perm=open all : all\n' >"$conf/rules.d/50-bench.rules"
    fagenrules >/dev/null 2>&1 || true
    mkdir -p /run/fapolicyd /var/lib/fapolicyd
    fapolicyd --debug-deny >"$work/fapolicyd.log" 2>&1 &
    fpid=$!
    ready=
    for _ in $(seq 1 100); do
        if $loop_bin 5 >/dev/null 2>&1 && grep -q "Starting to listen" "$work/fapolicyd.log" 2>/dev/null; then ready=1; break; fi
        if ! kill -0 "$fpid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    [[ -n $ready ]] || sleep 3  # older builds do not print the line
    if kill -0 "$fpid" 2>/dev/null; then
        with_fapolicyd=$($loop_bin "$runs")
        kill "$fpid"; wait "$fpid" 2>/dev/null || true
        fapolicyd_line=$(awk -v b="$base" -v f="$with_fapolicyd" \
            'BEGIN { printf "fapolicyd: %.1f us/exec (+%.1f us, x%.2f)", f, f-b, f/b }')
    else
        fapolicyd_line="fapolicyd: did not start (see its log: $(tail -n 1 "$work/fapolicyd.log"))"
    fi
    restore_fapolicyd
fi

echo "measuring epmd's RSS with 100000 rules..." >&2
start_epmd 100000
sleep 1
rss_kb=$(awk '/^VmRSS/ { print $2 }' "/proc/$epmd_pid/status")
stop_epmd

p50=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["p50"])' <<<"$status")
p99=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["p99"])' <<<"$status")

echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), Linux $(uname -r), $(date -u +%Y-%m-%d)"
awk -v b="$base" 'BEGIN { printf "no listener: %.1f us/exec\n", b }'
awk -v b="$base" -v f="$bare" \
    'BEGIN { printf "bare allow-all listener: %.1f us/exec (+%.1f us)\n", f, f-b }'
if [[ -n $before_bin ]]; then
    awk -v b="$base" -v e="$before_epmd" \
        'BEGIN { printf "earlier epmd (10000 rules): %.1f us/exec (+%.1f us, x%.2f)\n", e, e-b, e/b }'
    awk -v t="$before_ticks" -v hz="$(getconf CLK_TCK)" -v s="$before_switches" -v r="$counted" \
        'BEGIN { printf "earlier epmd CPU: %.1f us per exec; %.1f voluntary context switches per exec\n", t * 1e6 / hz / r, s / r }'
    awk -v b="$base_user" -v e="$before_user" \
        'BEGIN { printf "earlier epmd, a program a user can write: %.1f us/exec (+%.1f us)\n", e, e-b }'
    if [[ -n $before_syscalls ]]; then
        awk -v c="$before_syscalls" -v r="$counted" 'BEGIN { printf "earlier epmd system calls: %.1f per exec\n", c / r }'
    fi
fi
awk -v b="$base" -v e="$without_hook" \
    'BEGIN { printf "epmd (10000 rules, kernel hook off): %.1f us/exec (+%.1f us, x%.2f)\n", e, e-b, e/b }'
awk -v b="$base" -v e="$with_epmd" -v h="$hook_state" \
    'BEGIN { printf "epmd (10000 rules, kernel hook %s): %.1f us/exec (+%.1f us, x%.2f)\n", h, e, e-b, e/b }'
awk -v b="$base" -v e="$with_epmd" -v f="$bare" \
    'BEGIN { printf "epmd added / bare listener added: %.2f\n", (e-b)/(f-b) }'
awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v s="$switches" -v r="$counted" \
    'BEGIN { printf "epmd CPU: %.1f us per exec; %.1f voluntary context switches per exec\n", t * 1e6 / hz / r, s / r }'
if [[ -n $syscalls ]]; then
    awk -v c="$syscalls" -v r="$counted" 'BEGIN { printf "epmd system calls: %.1f per exec\n", c / r }'
fi
awk -v b="$base_user" -v e="$with_user" \
    'BEGIN { printf "epmd, a program a user can write (leased): %.1f us/exec (+%.1f us)\n", e, e-b }'
echo "$fapolicyd_line"
echo "epmd decision latency: p50 ${p50} us, p99 ${p99} us"
awk -v r="$rss_kb" 'BEGIN { printf "epmd RSS with 100000 rules: %.1f MB\n", r/1024 }'
