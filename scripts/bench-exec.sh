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
# The configurations are measured in ROUNDS rounds (default 5) of RUNS/ROUNDS
# execs each, one configuration after the other inside each round, and each
# figure is the median over the rounds: load that comes and goes on a shared
# machine then lands on every configuration alike instead of on whichever
# ran when it came. Each round's figure is the mean of its execs; the median
# exec of each round is printed too (less moved by bursts of other load).
# ROUNDS=1 measures each configuration once, in one go.
#
# EPMD_BEFORE=/path/to/an/older/epmd also measures that binary, in the same
# run, beside this tree's with the kernel hook off (before it in odd rounds,
# after it in even ones), and prints the median of the per-round
# differences: the exec overhead before and after a change, with the
# machine's drift cancelled out. Build the older tree's `cargo build
# --release -p epm-agent --bin epmd` elsewhere and point at it.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-3000}
rounds=${ROUNDS:-5}
if ! [[ $rounds =~ ^[1-9][0-9]*$ ]] || ((runs / rounds < 100)); then
    echo "ROUNDS=$rounds: want a positive number of rounds of at least 100 execs each (RUNS=$runs)" >&2
    exit 1
fi
per_round=$((runs / rounds))
before_bin=${EPMD_BEFORE:-}
if [[ -n $before_bin && ! -x $before_bin ]]; then
    echo "EPMD_BEFORE=$before_bin is not an executable" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "bench-exec.sh needs root: fanotify permission events need CAP_SYS_ADMIN" >&2
    exit 1
fi

# A loader with more than one hard link has its path read on every exec
# (epmd remembers paths only of files with one name), which a normal
# machine does not pay. `perf record` makes such links: its build-id cache
# (~/.debug) hard-links every binary it profiled.
loader=$(python3 -c '
import struct, sys
elf = open("/bin/true", "rb").read()
phoff, = struct.unpack_from("<Q", elf, 0x20)
size, count = struct.unpack_from("<HH", elf, 0x36)
for i in range(count):
    kind, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * size)
    if kind == 3:
        print(elf[offset:offset + filesz].rstrip(b"\0").decode())
' 2>/dev/null || true)
if [[ -n $loader ]] && (($(stat -L -c %h "$loader") > 1)); then
    echo "warning: $loader has $(stat -L -c %h "$loader") hard links (perf record's ~/.debug?); epmd reads its path on every exec and the figures are worse than a normal machine's" >&2
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

# epmd's own CPU time (clock ticks; perf's task clock below is finer) and
# voluntary context switches (all its threads), to see what it costs the
# machine besides the exec's wait.
epmd_cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$epmd_pid/stat"; }
epmd_switches() { cat /proc/"$epmd_pid"/task/*/status | awk '/^voluntary_ctxt_switches/ { n += $2 } END { print n }'; }
# epmd's system calls (all its threads) during the loop, counted by the
# kernel's syscall tracepoint (perf stat): a count the machine's other load
# does not change, unlike the times. Empty when perf cannot count them.
have_perf=
if command -v perf >/dev/null 2>&1 && perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
    have_perf=1
fi
# Each loop is 50 warm-up execs and then $per_round measured ones; epmd's
# counters see all of them.
counted=$((per_round + 50))

# A program a user could write (owned by nobody): since issue 15 epmd takes
# a read lease on such a file for each exec, which system programs (only
# root writes them) do not need.
user_program=$work/user-true
cp /bin/true "$user_program"
chown 65534:65534 "$user_program"
chmod 0755 "$user_program"

# Every measurement is one line of $work/results: round, name, then the
# exec_loop's mean and median, or epmd's counters per exec.
results=$work/results
: >"$results"
record() { echo "$round $*" >>"$results"; }
loop() { # $1 = name, $2 = program (default /bin/true)
    record "$1" "$($loop_bin "$per_round" "${2:-/bin/true}")"
}

# Measures the loop under one epmd (left running for the caller), its CPU,
# context switches and system calls per exec, and the loop of the user's
# program. $1 = name, $2 = the epmd binary, $3 = kernel hook (true/false).
measure_epmd() {
    start_epmd 10000 "$2" "${3:-true}"
    local ticks_before switches_before perf_pid="" syscalls="" cpu_ms=""
    if [[ -n $have_perf ]]; then
        perf stat -x, -e raw_syscalls:sys_enter,task-clock -p "$epmd_pid" -o "$work/perf.txt" &
        perf_pid=$!
        sleep 0.5
    fi
    ticks_before=$(epmd_cpu_ticks) switches_before=$(epmd_switches)
    loop "$1"
    local ticks=$(($(epmd_cpu_ticks) - ticks_before)) switches=$(($(epmd_switches) - switches_before))
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
        syscalls=$(awk -F, '/raw_syscalls/ { print $1 }' "$work/perf.txt")
        cpu_ms=$(awk -F, '/task-clock/ { print $1 }' "$work/perf.txt")
    fi
    # CPU from perf's task clock (nanoseconds) where it counts, else from
    # the clock ticks, which over one round are 15 us per exec coarse.
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v ms="$cpu_ms" -v s="$switches" -v c="${syscalls:-0}" -v r="$counted" \
        'BEGIN { cpu = (ms != "") ? ms * 1000 / r : t * 1e6 / hz / r; printf "%.2f %.3f %.2f\n", cpu, s / r, c / r }' |
        { read -r cpu sw sc; record "$1-counters" "$cpu $sw $sc"; }
    loop "$1-user" "$user_program"
}

have_fapolicyd=
if command -v fapolicyd >/dev/null 2>&1; then
    have_fapolicyd=1
    # Run fapolicyd the way its own comparison is usually made: two rules,
    # the file trust backend, in the foreground. Its configuration is
    # restored on exit.
    conf=/etc/fapolicyd
    cp -a "$conf" "$work/fapolicyd.saved"
    restore_fapolicyd() { rm -rf "$conf" && cp -a "$work/fapolicyd.saved" "$conf"; }
    trap 'restore_fapolicyd; cleanup' EXIT
    sed -i 's/^trust = .*/trust = file/; s/^uid = .*/uid = root/; s/^gid = .*/gid = root/' "$conf/fapolicyd.conf"
    rm -f "$conf"/rules.d/*.rules
    printf 'allow perm=execute all : all\nallow perm=open all : all\n' >"$conf/rules.d/50-bench.rules"
    fagenrules >/dev/null 2>&1 || true
    mkdir -p /run/fapolicyd /var/lib/fapolicyd
fi
fapolicyd_note=
measure_fapolicyd() {
    fapolicyd --debug-deny >"$work/fapolicyd.log" 2>&1 &
    local fpid=$! ready=
    for _ in $(seq 1 100); do
        if $loop_bin 5 >/dev/null 2>&1 && grep -q "Starting to listen" "$work/fapolicyd.log" 2>/dev/null; then ready=1; break; fi
        if ! kill -0 "$fpid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    [[ -n $ready ]] || sleep 3  # older builds do not print the line
    if kill -0 "$fpid" 2>/dev/null; then
        loop fapolicyd
        kill "$fpid"; wait "$fpid" 2>/dev/null || true
    else
        fapolicyd_note="did not start (see its log: $(tail -n 1 "$work/fapolicyd.log"))"
    fi
}

hook_state=n/a
for round in $(seq 1 "$rounds"); do
    echo "round $round of $rounds ($per_round execs per configuration)..." >&2
    loop none
    loop none-user "$user_program"
    $bin/examples/gate_floor raw &
    floor_pid=$!
    sleep 0.5
    loop bare
    kill "$floor_pid"; wait "$floor_pid" 2>/dev/null || true
    # The earlier binary and this tree's (hook off, the same settings) in
    # turn, first one then the other, so neither always runs in the same
    # place of the round.
    if [[ -n $before_bin ]] && ((round % 2 == 1)); then
        measure_epmd before "$before_bin" false
        stop_epmd
    fi
    measure_epmd hook-off "$bin/epmd" false
    stop_epmd
    if [[ -n $before_bin ]] && ((round % 2 == 0)); then
        measure_epmd before "$before_bin" false
        stop_epmd
    fi
    measure_epmd epmd "$bin/epmd"
    status=$($bin/epmctl --socket "$work/epmd.sock" status --json)
    hook_state=$(python3 -c 'import json,sys; h=json.load(sys.stdin).get("kernel_hook") or {}; print(h.get("state", "n/a"))' <<<"$status")
    stop_epmd
    if [[ -n $have_fapolicyd ]]; then
        measure_fapolicyd
    fi
done

echo "measuring epmd's RSS with 100000 rules..." >&2
start_epmd 100000
sleep 1
rss_kb=$(awk '/^VmRSS/ { print $2 }' "/proc/$epmd_pid/status")
stop_epmd

p50=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["p50"])' <<<"$status")
p99=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us"]["p99"])' <<<"$status")

echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), Linux $(uname -r), $(date -u +%Y-%m-%d), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$rounds rounds of $per_round execs per configuration; each figure the median over the rounds (mean exec / median exec)"
python3 - "$results" "$hook_state" "${before_bin:+1}" "${have_fapolicyd:+1}" "$fapolicyd_note" <<'PY'
import statistics, sys
from collections import defaultdict

path, hook_state, has_before, has_fapolicyd, fapolicyd_note = sys.argv[1:6]
runs = defaultdict(list)
for line in open(path):
    fields = line.split()
    runs[fields[1]].append([float(x) for x in fields[2:]])

def med(name, i):
    return statistics.median(r[i] for r in runs[name])

def added(name, base="none"):
    # Per round, so a round's load is subtracted from its own baseline.
    return [(r[0] - b[0], r[1] - b[1]) for r, b in zip(runs[name], runs[base])]

def line(label, name, base="none"):
    if not runs[name]:
        return
    a = added(name, base)
    print(f"{label}: {med(name, 0):.1f} / {med(name, 1):.1f} us/exec "
          f"(+{statistics.median(x[0] for x in a):.1f} / +{statistics.median(x[1] for x in a):.1f} us)")

def counters(label, name):
    if runs[name]:
        print(f"{label}: CPU {med(name, 0):.1f} us per exec; "
              f"{med(name, 1):.1f} voluntary context switches per exec; "
              f"{med(name, 2):.1f} system calls per exec")

def ratio(label, name):
    a = [x[0] for x in added(name)]
    f = [x[0] for x in added("bare")]
    per_round = [e / b for e, b in zip(a, f) if b > 0]
    shown = " ".join(f"{r:.2f}" for r in per_round)
    print(f"{label}: {statistics.median(a) / statistics.median(f):.2f} "
          f"(of the medians; per round: {shown or 'n/a: the floor was not above the noise'})"
          if statistics.median(f) > 0 else f"{label}: n/a (the bare listener's median added cost is not above zero)")

print(f"no listener: {med('none', 0):.1f} / {med('none', 1):.1f} us/exec")
line("bare allow-all listener", "bare")
if has_before:
    line("earlier epmd (10000 rules, kernel hook off)", "before")
    counters("earlier epmd", "before-counters")
    line("earlier epmd, a program a user can write", "before-user", "none-user")
    # Side by side in each round (the order alternating), so load that
    # comes and goes cancels out of the difference.
    def paired(name, base, i):
        return statistics.median(r[i] - b[i] for r, b in zip(runs[name], runs[base]))
    print("this epmd - earlier epmd (hook off; the median of the per-round differences): "
          f"{paired('hook-off', 'before', 0):+.1f} / {paired('hook-off', 'before', 1):+.1f} us/exec, "
          f"CPU {paired('hook-off-counters', 'before-counters', 0):+.1f} us per exec, "
          f"{paired('hook-off-counters', 'before-counters', 2):+.1f} system calls per exec, "
          f"a program a user can write {paired('hook-off-user', 'before-user', 0):+.1f} us/exec")
line("epmd (10000 rules, kernel hook off)", "hook-off")
counters("epmd (kernel hook off)", "hook-off-counters")
line(f"epmd (10000 rules, kernel hook {hook_state})", "epmd")
ratio("epmd added / bare listener added (mean exec)", "epmd")
counters("epmd", "epmd-counters")
line("epmd, a program a user can write (leased)", "epmd-user", "none-user")
if has_fapolicyd:
    if runs["fapolicyd"]:
        line("fapolicyd (two allow rules, file trust)", "fapolicyd")
    else:
        print(f"fapolicyd: {fapolicyd_note}")
else:
    print("fapolicyd: not installed")
PY
echo "epmd decision latency: p50 ${p50} us, p99 ${p99} us"
awk -v r="$rss_kb" 'BEGIN { printf "epmd RSS with 100000 rules: %.1f MB\n", r/1024 }'
