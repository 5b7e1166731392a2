#!/usr/bin/env bash
# Each crate's share of the workspace's non-test code, largest first, as a
# Markdown table (docs/architecture.md keeps the latest). Counted: every
# line of crates/*/src/**/*.rs, except files named tests.rs, anything under
# a tests/ folder, and `#[cfg(test)]` modules (from the attribute to the
# module's closing brace at the same indentation). Examples, benches and
# the crates' tests/ are not product code and are not counted.
#
# Usage: scripts/crate-shares.sh [MAX_PERCENT]
#   With MAX_PERCENT, exits 1 when a crate's share is above it.
set -euo pipefail
cd "$(dirname "$0")/.."

max=${1:-}

# Non-test lines of one Rust file.
count_file() {
    awk '
        skipping == 0 && /^[ \t]*#\[cfg\(test\)\]/ {
            match($0, /^[ \t]*/); indent = substr($0, 1, RLENGTH)
            pending = 1; next
        }
        pending == 1 {
            if ($0 ~ /^[ \t]*#\[/) next
            pending = 0
            if ($0 ~ /^[ \t]*(pub(\([a-z]+\))? )?mod [a-z_]+ *\{/) { skipping = 1; next }
            if ($0 ~ /^[ \t]*(pub(\([a-z]+\))? )?mod [a-z_]+;/) next
            # A test-only item other than a module: count as code.
        }
        skipping == 1 {
            if ($0 == indent "}") skipping = 0
            next
        }
        { n++ }
        END { print n + 0 }
    ' "$1"
}

declare -A lines
total=0
for dir in crates/*/; do
    crate=$(basename "$dir")
    n=0
    while IFS= read -r -d '' file; do
        n=$((n + $(count_file "$file")))
    done < <(find "$dir/src" -name '*.rs' ! -name tests.rs ! -path '*/tests/*' -print0 2>/dev/null)
    lines[$crate]=$n
    total=$((total + n))
done

over=0
printf '| crate | non-test lines | share |\n|---|---:|---:|\n'
for crate in "${!lines[@]}"; do
    printf '%s %s\n' "${lines[$crate]}" "$crate"
done | sort -rn | while read -r n crate; do
    # Tenths of a percent, in integers.
    tenths=$(((n * 1000 + total / 2) / total))
    printf '| %s | %d | %d.%d %% |\n' "$crate" "$n" $((tenths / 10)) $((tenths % 10))
done
printf '| **total** | %d | 100 %% |\n' "$total"

if [[ -n $max ]]; then
    for crate in "${!lines[@]}"; do
        if ((lines[$crate] * 100 > max * total)); then
            echo "crate $crate holds more than $max % of the non-test code" >&2
            over=1
        fi
    done
fi
exit "$over"
