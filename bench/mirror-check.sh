#!/usr/bin/env bash
# Real trees nobody here wrote, mirrored with the real binaries every way a tree travels
# (`send -r`, `recv -r`, `copy -r` between two daemons), each copy then compared with its source
# by `rsync -aHAX --dry-run --itemize-changes --checksum` (content, perms, owners, times, links,
# hard links, ACLs, attributes: any output line is a difference), and each copy run a second
# time, which must move no data (`bytes_transferred` 0). Not a timing: a correctness check of
# issue 12's "Done when", run as root so owners are kept. XFER_BIN_DIR=DIR uses prebuilt
# binaries (bench/lib.sh).
#
#   bench/mirror-check.sh                      # the default trees below
#   bench/mirror-check.sh /usr/share/doc /opt/x
#
# Default trees: /usr/share/doc (documentation), /usr/lib/python3.11 (a system library tree),
# /usr/include (headers), and the cargo registry's sources of tokio (a source tree), those that
# exist. Works in BENCH_DIR/mirror-check (default bench/out).
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
BENCH_NAME=mirror-check
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

((EUID == 0)) || die "run as root: owners are only kept by a privileged receiver"
ensure_apt rsync rsync
TREES=("$@")
if ((${#TREES[@]} == 0)); then
    for t in /usr/share/doc /usr/lib/python3.11 /usr/include "$HOME"/.cargo/registry/src/*/tokio-1.*; do
        [[ -d "$t" ]] && TREES+=("$t")
    done
fi

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    end_pids "${PIDS[@]+"${PIDS[@]}"}"
    exit "$rc"
}
on_exit cleanup

WORK="$(mkdir -p "${BENCH_DIR:-$REPO/bench/out}/mirror-check" && cd "$_" && pwd)"
rm -rf "$WORK/a" "$WORK/b" "$WORK/out" "$WORK/logs"
mkdir -p "$WORK/a" "$WORK/b" "$WORK/out" "$WORK/logs"
LOGS="$WORK/logs"
xfer_binaries "$LOGS/build.log"
start_xferd "$WORK/a" --allow-delete
A="$XFERD_ADDR"
start_xferd "$WORK/b" --allow-delete
B="$XFERD_ADDR"

failures=0
check() { # check WHAT SRC COPY: rsync finds no difference
    local diff
    diff="$(rsync -aHAX --dry-run --itemize-changes --checksum "$2/" "$3/")"
    if [[ -n "$diff" ]]; then
        echo "- FAIL: $1: rsync -aHAX --checksum finds differences:"
        echo "$diff" | head -n 10 | sed 's/^/      /'
        failures=$((failures + 1))
    else
        echo "- PASS: $1: rsync -aHAX --dry-run --itemize-changes --checksum reports nothing"
    fi
}
moved() { # moved WHAT JSON: the rerun moved no data
    local bytes
    bytes="$(python3 -c 'import json, sys
d = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(d.get("bytes_transferred", d.get("results", [{}])[0].get("bytes_transferred")))' <<<"$2")"
    if [[ "$bytes" == 0 ]]; then
        echo "- PASS: $1: the second run moved 0 bytes"
    else
        echo "- FAIL: $1: the second run moved $bytes bytes"
        failures=$((failures + 1))
    fi
}

commit="$(git rev-parse --short=12 HEAD)"
[[ -z "$(git status --porcelain)" ]] || commit="$commit (+ uncommitted changes)"
echo "# xfer mirror check: real trees, every way, against rsync -aHAX --checksum"
echo
echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S'); commit: $commit"
echo "- machine: $(uname -n), $(nproc) CPUs, $(uname -sr); rsync $(rsync --version | awk 'NR == 1 {print $3}')"
echo
for tree in "${TREES[@]}"; do
    name="$(basename "$tree")"
    echo "## $tree ($(find "$tree" -type f | wc -l) files, $(du -sh "$tree" | cut -f1))"
    echo
    "$XFER" send -r --delete --json "$tree" "$A" --as "$name" >"$LOGS/send.json"
    check "send -r" "$tree" "$WORK/a/$name"
    moved "send -r" "$("$XFER" send -r --delete --json "$tree" "$A" --as "$name")"
    "$XFER" recv -r --delete --json "$name" "$A" -o "$WORK/out/$name" >"$LOGS/recv.json"
    check "recv -r" "$tree" "$WORK/out/$name"
    moved "recv -r" "$("$XFER" recv -r --delete --json "$name" "$A" -o "$WORK/out/$name")"
    "$XFER" copy -r --delete --json "$A:$name" "$B:$name" >"$LOGS/copy.json"
    check "copy -r" "$tree" "$WORK/b/$name"
    moved "copy -r" "$("$XFER" copy -r --delete --json "$A:$name" "$B:$name")"
    echo
done
echo "$failures failures"
exit $((failures > 0))
