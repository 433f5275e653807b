#!/bin/sh
# Where the instructions of one trivial job go, function by function, from the counts
# that `bench --instructions --keep-callgrind DIR` keeps:
#
#   cargo run --release --example bench -- --instructions --keep-callgrind /tmp/cg
#   examples/bench/instructions-by-function.sh /tmp/cg [TOP]
#
# For the manager and the worker process, each function's inclusive count in the larger
# run minus the smaller one, divided by the difference in jobs: instructions per job
# spent in that function and what it calls (so the rows overlap; the first ones are
# thread entry points). Needs valgrind's callgrind_annotate.
set -eu
dir=${1:?usage: $0 DIR [TOP]}
top=${2:-25}
command -v callgrind_annotate >/dev/null || { echo "$0: callgrind_annotate (valgrind) is needed" >&2; exit 1; }
runs=$(ls -d "$dir"/callgrind-* | sed 's/.*callgrind-//' | sort -n)
set -- $runs
[ $# -eq 2 ] || { echo "$0: expected two runs (callgrind-SMALL, callgrind-LARGE) in $dir" >&2; exit 1; }
small=$1 large=$2
inclusive() { # file -> "count<TAB>function" lines
    callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
        awk '/^ *[0-9,]+ \(/ { n=$1; gsub(",", "", n); sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, ""); sub(/ \[.*\]$/, ""); print n "\t" $0 }'
}
for who in manager worker; do
    a=$(ls "$dir/callgrind-$small/$who".[0-9]*)
    b=$(ls "$dir/callgrind-$large/$who".[0-9]*)
    echo "== $who process: instructions per job by function (inclusive), runs of $small and $large jobs"
    { inclusive "$a" | sed 's/^/A\t/'; inclusive "$b" | sed 's/^/B\t/'; } |
        awk -F'\t' -v d=$((large - small)) '
            $1 == "A" { a[$3] = $2 } $1 == "B" { b[$3] = $2 }
            END { for (f in b) { if (f ~ /\047[0-9]+$/) continue; x = (b[f] - a[f]) / d; if (x >= 500) printf "%10.0f  %s\n", x, f } }' |
        sort -rn | head -n "$top"
done
