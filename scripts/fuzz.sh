#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each
# (default 60) and prints, per target, the executions, the corpus and the
# crashes. Exits 1 when any target crashed; the inputs are kept in
# fuzz/artifacts/TARGET/ (replay one: TARGET_BINARY fuzz/artifacts/TARGET/crash-...).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs nightly Rust and cargo-fuzz (rustup toolchain install nightly
# --profile minimal; cargo install cargo-fuzz --locked). The corpus of each
# target (fuzz/corpus/TARGET, not committed) starts from the committed seeds
# (fuzz/seeds/TARGET) and the project's test fixtures, and keeps what each
# run finds. EPM_FUZZ_TARGET_DIR changes where the build goes (default
# target/fuzz); EPM_FUZZ_SANITIZER picks a sanitizer (default none: the code
# is safe Rust, and a sanitizer halves the executions per second).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
    exit 2
fi
shift || true

target_dir=${EPM_FUZZ_TARGET_DIR:-$PWD/target/fuzz}
sanitizer=${EPM_FUZZ_SANITIZER:-none}
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')

if (($#)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Seeds: the committed ones, then the fixtures each parser is tested with.
seed() {
    local target=$1 corpus=fuzz/corpus/$1
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    if [[ -d fuzz/seeds/$target ]]; then
        cp -f fuzz/seeds/"$target"/* "$corpus"/
    fi
    case $target in
    policy)
        cp -f examples/policy.json "$corpus/example-policy.json"
        # Every JSON example of the policy reference.
        awk -v dir="$corpus" '
            /^ *```json/ { n++; file = sprintf("%s/doc-policy-%02d.json", dir, n); inside = 1; next }
            /^ *```/ && inside { inside = 0; close(file); next }
            inside { print > file }
        ' docs/policy.md
        ;;
    managed_prefs)
        cp -f crates/epm-agent/tests/fixtures/managed-prefs/* "$corpus"/
        cp -f pkg/profiles/managed-preferences.mobileconfig "$corpus"/
        ;;
    elf_interp)
        # Heads of real programs: dynamic, the loader itself, a script.
        local program
        for program in /bin/true /bin/sh /lib64/ld-linux-x86-64.so.2 /lib/ld-linux-aarch64.so.1; do
            if [[ -r $program ]]; then
                head -c 2048 "$program" >"$corpus/head-$(basename "$program")"
            fi
        done
        ;;
    api_bodies)
        # The API guide's JSON examples, as each body type (first byte).
        local example kind
        awk -v dir="$corpus" '
            /^ *```json/ { n++; file = sprintf("%s/.doc-api-%02d", dir, n); inside = 1; next }
            /^ *```/ && inside { inside = 0; close(file); next }
            inside { print > file }
        ' docs/api.md
        for example in "$corpus"/.doc-api-*; do
            [[ -e $example ]] || continue
            for kind in 0 1 2 3 4 5 6 7 8 9 10; do
                { printf '%b' "\\$(printf '%03o' "$kind")"; cat "$example"; } \
                    >"$corpus/$(basename "$example" | tr -d .)-as-$kind"
            done
            rm -f "$example"
        done
        ;;
    esac
}

echo "building the fuzz targets (nightly, sanitizer: $sanitizer)"
cargo +nightly fuzz build --debug-assertions --sanitizer "$sanitizer" --target-dir "$target_dir"

# Runs one target; leaves its summary line in fuzz/artifacts/TARGET/summary.
run() {
    local target=$1 binary log before after executions per_second corpus status=0
    binary=$target_dir/$triple/release/$target
    log=fuzz/artifacts/$target/last-run.log
    before=$(find "fuzz/artifacts/$target" -type f ! -name last-run.log ! -name summary | wc -l)
    "$binary" "fuzz/corpus/$target" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" \
        >"$log" 2>&1 || status=$?
    after=$(find "fuzz/artifacts/$target" -type f ! -name last-run.log ! -name summary | wc -l)
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    printf '%-16s %6ss %12s %8s/s %7s %8s %5s\n' "$target" "$seconds" "${executions:-?}" \
        "${per_second:-?}" "$corpus" "$((after - before))" "$status" \
        >"fuzz/artifacts/$target/summary"
    if ((status != 0 || after > before)); then
        echo "$target: exit $status, see $log" >&2
        grep -m 20 -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || true
    fi
}

# EPM_FUZZ_PARALLEL=1 runs the targets at once (each for SECONDS of wall
# time, sharing the cores); by default they run one after the other.
for target in "${targets[@]}"; do
    seed "$target"
    echo "fuzzing $target for ${seconds}s"
    if [[ ${EPM_FUZZ_PARALLEL:-0} == 1 ]]; then
        run "$target" &
    else
        run "$target"
    fi
done
wait

# The audit target's scratch directories, of processes that have exited.
for scratch in /dev/shm/epm-fuzz-audit-* "${TMPDIR:-/tmp}"/epm-fuzz-audit-*; do
    [[ -d $scratch ]] || continue
    kill -0 "${scratch##*-}" 2>/dev/null || rm -rf "$scratch"
done

failed=0
printf '\n%-16s %7s %12s %10s %7s %8s %5s\n' target time executions speed corpus crashes exit
for target in "${targets[@]}"; do
    line=$(cat "fuzz/artifacts/$target/summary")
    echo "$line"
    read -r _ _ _ _ _ crashes status <<<"$line"
    if ((crashes > 0 || status != 0)); then
        failed=1
    fi
done
exit "$failed"
