#!/usr/bin/env bash
# Fails when the agent's modules (crates/epm-agent/src) import each other in
# a circle, at two levels: its top-level modules (config, control, daemon,
# exec, grants, managed), and every module file (exec::decider,
# grants::flows, ...; a module and its own parent or child are one unit).
# The agent reads top-down (daemon → control → managed → grants → exec,
# config to the side; docs/architecture.md): a module may use the ones
# below it, never one above. Test code (`#[cfg(test)]` modules, tests.rs)
# may reach anywhere and is not counted.
#
# Usage: scripts/check-agent-imports.sh [--edges]
#   --edges prints each module's imports of the others.
set -euo pipefail
cd "$(dirname "$0")/../crates/epm-agent/src"

# Every module file, as a path: exec/decider.rs → exec::decider,
# control/mod.rs → control. lib.rs and main.rs only wire.
modules=$(find . -name '*.rs' ! -name tests.rs ! -path '*/tests/*' ! -name lib.rs ! -name main.rs |
    sed 's#^\./##; s#/mod\.rs$##; s#\.rs$##; s#/#::#g' | sort -u)

# Each file's imports of crate:: paths, resolved to the longest module
# path they name. The perl program is in single quotes on purpose.
# shellcheck disable=SC2016
edges=$(
    find . -name '*.rs' ! -name tests.rs ! -path '*/tests/*' ! -name lib.rs ! -name main.rs -print0 |
        MODULES="$modules" xargs -0 perl -0777 -ne '
            my %module = map { $_ => 1 } split /\n/, $ENV{MODULES};
            (my $from = $ARGV) =~ s{^\./}{};
            $from =~ s{/mod\.rs$}{};
            $from =~ s{\.rs$}{};
            $from =~ s{/}{::}g;
            my $text = $_;
            # Drop #[cfg(test)] modules: from the attribute to the closing
            # brace at the same indentation; and line comments.
            $text =~ s/^([ \t]*)#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{.*?^\1\}//msg;
            $text =~ s{//[^\n]*}{}g;
            # Every full path a use tree names: a::{b::c, d} → a::b::c, a::d.
            sub expand {
                my ($prefix, $tree) = @_;
                $tree =~ s/^\s+|\s+$//g;
                if ($tree =~ /^([\w:]*?)(?:::)?\{(.*)\}$/s) {
                    my ($head, $body) = ($1, $2);
                    my $base = join "::", grep { length } $prefix, $head;
                    my ($depth, $item, @out) = (0, "");
                    for my $c (split //, "$body,") {
                        if ($c eq "," && $depth == 0) {
                            push @out, expand($base, $item) if $item =~ /\S/;
                            $item = "";
                            next;
                        }
                        $depth++ if $c eq "{";
                        $depth-- if $c eq "}";
                        $item .= $c;
                    }
                    return @out;
                }
                $tree =~ s/\s+as\s+\w+$//;
                return join "::", grep { length } $prefix, $tree;
            }
            my %to;
            while ($text =~ /\bcrate::((?:\w+::)*(?:\{|\w+))/g) {
                my $tree = $1;
                if ($tree =~ /\{$/) {
                    # Take the braces whole.
                    my ($depth, $i) = (1, pos($text));
                    while ($depth > 0 && $i < length $text) {
                        my $c = substr($text, $i++, 1);
                        $depth++ if $c eq "{";
                        $depth-- if $c eq "}";
                    }
                    $tree .= substr($text, pos($text), $i - pos($text));
                }
                for my $path (expand("", $tree)) {
                    my @parts = split /::/, $path;
                    while (@parts && !$module{join "::", @parts}) { pop @parts }
                    $to{join "::", @parts} = 1 if @parts;
                }
            }
            for my $to (sort keys %to) { print "$from $to\n" }
        ' | sort -u
)

if [[ ${1:-} == --edges ]]; then
    printf '%s\n' "$edges"
fi

# A loop among `from to` pairs, or nothing.
find_loop() {
    local out
    if ! out=$(tsort 2>&1 >/dev/null) || [[ -n $out ]]; then
        printf '%s\n' "$out"
    fi
}

# Top level: the first component of each side.
top=$(printf '%s\n' "$edges" | awk '{split($1, a, "::"); split($2, b, "::"); if (a[1] != b[1]) print a[1], b[1]}' | sort -u)
# Files: a module and its ancestors or descendants are one unit.
files=$(printf '%s\n' "$edges" | awk '
    { if (index($2 "::", $1 "::") != 1 && index($1 "::", $2 "::") != 1) print $1, $2 }' | sort -u)

status=0
check_level() {
    local loop
    loop=$(printf '%s\n' "$2" | find_loop)
    if [[ -n $loop ]]; then
        echo "epm-agent: its modules import each other in a circle ($1 level):" >&2
        printf '%s\n' "$loop" >&2
        status=1
    fi
}
check_level top "$top"
check_level files "$files"
if ((status)); then
    echo "(scripts/check-agent-imports.sh --edges lists every import)" >&2
    exit 1
fi
echo "epm-agent: no import circle between its modules"
