#!/usr/bin/env bash
# The table of issue 13 (fill the link by default): for each lossy profile, a 128 MiB and a 2 GiB
# file, up and down, xfer with its defaults beside iperf3 with the connections and congestion
# control xfer chose, moving the same bytes, and GridFTP -p 16, aria2c -x 16 (downloads) and
# rsync. Each profile x size x direction is one piece: one bench/wan.sh run under
# `flock /work/wt/bench.lock` (a few minutes each, so others' runs get the machine in between),
# its results kept in FILL_DIR/PROFILE_SIZE_DIR; the table is made from every piece there.
# Run as root (wan.sh makes namespaces).
#
#   bench/fill.sh                               # everything: ~16 pieces of 1-4 min
#   FILL_PROFILES=loss1 FILL_SIZES=128M bench/fill.sh
#   FILL_PEERS= FILL_DIRS=download bench/fill.sh # xfer and iperf3 only, downloads only
#   bench/fill.sh report                        # the table again from the pieces already run
#
# Environment:
#   FILL_PROFILES  wan.sh profiles; default "wan loss1 loss10 far" (50 ms at 0.01/0.1/1 % and
#                  150 ms at 0.1 %); lan adds the clean 0.2 ms LAN
#   FILL_SIZES     default "128M 2G"
#   FILL_DIRS      default "upload download"
#   FILL_PEERS     any of "gridftp aria2 rsync"; default all three
#   FILL_CC        congestion control of both namespaces (the system default xfer starts from);
#                  default cubic
#   FILL_CAP       seconds before xfer or iperf3 is stopped; default 30 for files under 1 GiB,
#                  90 for larger ones. FILL_PEER_CAP: the same for the peers; default 30
#   FILL_DIR       where the pieces go; default bench/out/fill (a piece run again replaces its
#                  directory)
#   XFER_BIN_DIR   xfer and xferd to measure; default: cargo build --release of the work tree,
#                  copied to FILL_DIR/bin once, so every piece runs the same binaries
#   FILL_LOCK      the lock file; default /work/wt/bench.lock
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
PROFILES="${FILL_PROFILES:-wan loss1 loss10 far}"
SIZES="${FILL_SIZES:-128M 2G}"
DIRS="${FILL_DIRS:-upload download}"
PEERS="${FILL_PEERS-gridftp aria2 rsync}"
CC="${FILL_CC:-cubic}"
PEER_CAP="${FILL_PEER_CAP:-30}"
OUT="${FILL_DIR:-$REPO/bench/out/fill}"
LOCK="${FILL_LOCK:-/work/wt/bench.lock}"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
header() {
    echo "# Issue 13: fill the link by default (bench/fill.sh)"
    echo
    echo "- made (UTC): $(date -u '+%Y-%m-%d %H:%M:%S') from the pieces in $OUT"
    echo "- machine: nproc $(nproc); $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo); kernel $(uname -r)"
    local p
    for p in "$OUT"/*/report.md; do
        [[ -f "$p" ]] || continue
        echo "- $(basename "$(dirname "$p")"): $(grep -m1 '^- date' "$p" | sed 's/^- //'); $(grep -m1 '^- commit' "$p" | sed 's/^- //'); $(grep -m1 '^- load' "$p" | sed 's/^- //; s/ (other.*//')"
    done
    echo
}
if [[ "${1:-}" == report ]]; then
    header
    python3 "$BENCH_HOME/fill_report.py" "$OUT"
    exit 0
fi
[[ $EUID == 0 ]] || { echo "fill.sh: run as root (wan.sh makes namespaces)" >&2; exit 1; }

if [[ -z "${XFER_BIN_DIR:-}" ]]; then
    echo "# cargo build --release" >&2
    (cd "$REPO" && cargo build --release --locked -p xfer -p xferd) >&2
    mkdir -p "$OUT/bin"
    install -m 0755 "$REPO/target/release/xfer" "$REPO/target/release/xferd" "$OUT/bin/"
    XFER_BIN_DIR="$OUT/bin"
fi
XFER_BIN_DIR="$(cd "$XFER_BIN_DIR" && pwd)"

for profile in $PROFILES; do
    for size in $SIZES; do
        bytes="$(numfmt --from=iec "$size")"
        cap="${FILL_CAP:-$((bytes >= 1 << 30 ? 90 : 30))}"
        for dir in $DIRS; do
            piece="$OUT/${profile}_${size}_${dir}"
            echo "# piece $profile $size $dir (waiting for $LOCK)" >&2
            rm -rf "$piece"
            # shellcheck disable=SC2086 # word lists
            # -o: a process the piece leaves behind must not keep the lock once it is over.
            flock -o "$LOCK" env XFER_BIN_DIR="$XFER_BIN_DIR" WAN_DIR="$piece" WAN_PROFILES="$profile" \
                WAN_CCS="$CC" WAN_SIZE="$size" WAN_DIRS="$dir" WAN_WORKLOADS=file CONNS=auto \
                WAN_TOOLS="xfer iperf3-same $PEERS" GRIDFTP_STREAMS=16 ARIA2_CONNS=16 \
                WAN_CAP="$cap" WAN_PEER_CAP="$PEER_CAP" "$BENCH_HOME/wan.sh" >"$OUT/${profile}_${size}_${dir}.log" 2>&1 ||
                echo "# piece $profile $size $dir failed: see $OUT/${profile}_${size}_${dir}.log" >&2
            # The source file is made again by the next piece of another size; a piece keeps
            # only its report, results and logs.
            rm -rf "${piece:?}/src" "${piece:?}/bin" "${piece:?}/wanem"
        done
    done
done
header
python3 "$BENCH_HOME/fill_report.py" "$OUT"
