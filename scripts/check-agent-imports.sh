#!/usr/bin/env bash
# Fails when the agent's top-level modules (crates/epm-agent/src: config,
# control, daemon, exec, grants, managed) import each other in a circle.
# The agent reads top-down (daemon → control → managed → grants → exec,
# config to the side; docs/architecture.md): a module may use the ones
# below it, never one above. Test code (`#[cfg(test)]` modules, tests.rs)
# may reach anywhere and is not counted.
#
# Usage: scripts/check-agent-imports.sh [--edges]
#   --edges prints each module's imports of the others.
set -euo pipefail
cd "$(dirname "$0")/../crates/epm-agent/src"

# The perl program is in single quotes on purpose: no shell expansion.
# shellcheck disable=SC2016
edges=$(
    find . -name '*.rs' ! -name tests.rs ! -path '*/tests/*' ! -name lib.rs ! -name main.rs -print0 |
        xargs -0 perl -0777 -ne '
            my $file = $ARGV;
            (my $from = $file) =~ s{^\./}{};
            $from =~ s{[/.].*}{};
            my $text = $_;
            # Drop #[cfg(test)] modules: from the attribute to the closing
            # brace at the same indentation.
            $text =~ s/^([ \t]*)#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{.*?^\1\}//msg;
            # Line comments (docs name modules without importing them).
            $text =~ s{//[^\n]*}{}g;
            my %to;
            # crate::name and each first name inside crate::{...}.
            while ($text =~ /\bcrate::(\{|[a-z_]+)/g) {
                if ($1 eq "{") {
                    # Split the group at its top-level commas; each item
                    # starts with the module it names.
                    my ($depth, $i, $item) = (1, pos($text), "");
                    while ($depth > 0 && $i < length $text) {
                        my $c = substr($text, $i++, 1);
                        $depth++ if $c eq "{";
                        $depth-- if $c eq "}";
                        if ($depth == 0 || ($depth == 1 && $c eq ",")) {
                            $to{$1} = 1 if $item =~ /^\s*([a-z_]+)/;
                            $item = "";
                        } else {
                            $item .= $c;
                        }
                    }
                } else {
                    $to{$1} = 1;
                }
            }
            for my $to (sort keys %to) { print "$from $to\n" if $to ne $from }
        ' | sort -u
)

# Only edges between the agent's own modules (crate::names and the like are
# re-exports of other crates).
modules=$(find . -mindepth 1 -maxdepth 1 \( -name '*.rs' -o -type d \) ! -name lib.rs ! -name main.rs |
    sed 's#^\./##; s#\.rs$##' | sort -u)
edges=$(printf '%s\n' "$edges" | while read -r from to; do
    if grep -qx "$to" <<<"$modules"; then printf '%s %s\n' "$from" "$to"; fi
done)

if [[ ${1:-} == --edges ]]; then
    printf '%s\n' "$edges"
fi

if ! loop=$(printf '%s\n' "$edges" | tsort 2>&1 >/dev/null) || [[ -n $loop ]]; then
    echo "epm-agent: its modules import each other in a circle:" >&2
    printf '%s\n' "$loop" >&2
    echo "(scripts/check-agent-imports.sh --edges lists every import)" >&2
    exit 1
fi
echo "epm-agent: no import circle between its modules"
