#!/usr/bin/env bash
# What a fixed number of TCP connections can do for one medium file on an emulated path, with
# the kernel's initial window: iperf3 -n SIZE -P N -C CC beside xfer -c N, both ways, for each N.
# Each run prints one line: its wall time (command start to exit, connect included), the rate over
# it, and for iperf3 its own interval (from all streams connected to the end) and the time before
# it (iperf3 connects its streams one after another, a round trip each). Runs alternate, round by
# round, and each takes the lock alone with the emulator up only for it.
# Run as root (namespaces). Takes CEILING_LOCK itself, once per run: do not wrap it in flock.
#
#   bench/ceiling.sh BIN_DIR                            # far profile, 128M, -P/-c 16 32 64
#   CEILING_NS="16 64" CEILING_TOOLS="iperf3-bbr xfer" bench/ceiling.sh target/release
#
# Environment:
#   CEILING_WAN     wanem options; default the far profile: "--delay-ms 75 --loss 0.001 --rate-mbit 1000"
#   CEILING_SIZE    default 128M; CEILING_DIRS default "upload download"; CEILING_ROUNDS default 2
#   CEILING_NS      connection counts; default "16 32 64"
#   CEILING_TOOLS   any of "iperf3-bbr iperf3-cubic xfer"; default all three
#   CEILING_DIR     where the file and logs go; default bench/out/ceiling
#   CEILING_LOCK    default /work/wt/bench.lock
#   XFERD_ARGS      extra xferd flags; default raises its per-client limits past 64 connections
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
[[ $# -ge 1 ]] || { echo "usage: bench/ceiling.sh BIN_DIR" >&2; exit 2; }
[[ $EUID == 0 ]] || { echo "ceiling.sh: run as root (namespaces)" >&2; exit 1; }
BIN="$(cd "$1" && pwd)"
WAN="${CEILING_WAN:---delay-ms 75 --loss 0.001 --rate-mbit 1000}"
SIZE="${CEILING_SIZE:-128M}"
DIRS="${CEILING_DIRS:-upload download}"
ROUNDS="${CEILING_ROUNDS:-2}"
COUNTS="${CEILING_NS:-16 32 64}"
TOOLS="${CEILING_TOOLS:-iperf3-bbr iperf3-cubic xfer}"
OUT="${CEILING_DIR:-$REPO/bench/out/ceiling}"
LOCK="${CEILING_LOCK:-/work/wt/bench.lock}"
export XFERD_ARGS="${XFERD_ARGS:---max-streams 160 --max-conns-per-ip 160}"
export OUT WAN BIN SIZE
export WAN_NS_A=ceiling-a WAN_NS_B=ceiling-b WANEM_RUN=/run/wanem-ceiling
mkdir -p "$OUT/wanem" "$OUT/srv" "$OUT/dst" "$OUT/log"
OUT="$(cd "$OUT" && pwd)"

# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"
emulated_file_setup "$OUT" "$SIZE"

# one NAME TOOL DIR N: one run under the lock, with the emulator up only for it
one() {
    # -o: a process the run leaves behind must not keep the lock once the run is over.
    flock -o "$LOCK" bash -s "$@" <<'EOS'
set -euo pipefail
name="$1" tool="$2" dir="$3" n="$4"
orig_cc="$(sysctl -n net.ipv4.tcp_allowed_congestion_control)"
cleanup() {
    [[ -n "${server:-}" ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    "$OUT/wanem/wan.sh" down >/dev/null 2>&1 || true
    sysctl -qw net.ipv4.tcp_allowed_congestion_control="$orig_cc"
    rm -f "$OUT/srv/up.bin" "$OUT/dst/down.bin" "$OUT"/srv/.up.bin.* "$OUT"/dst/.down.bin.*
}
trap cleanup EXIT
sysctl -qw net.ipv4.tcp_allowed_congestion_control="reno cubic bbr"
# shellcheck disable=SC2086 # option list
"$OUT/wanem/wan.sh" up $WAN --cc cubic --seed 1 >"$OUT/log/$name.wan" 2>&1
fast_open_on "$WAN_NS_A" "$WAN_NS_B"
load="$(cut -d' ' -f1 /proc/loadavg)"
case "$tool" in
iperf3-*)
    ip netns exec "$WAN_NS_B" iperf3 -s -1 -B 10.78.0.2 -p 5299 >"$OUT/log/$name.server" 2>&1 &
    server=$!
    for _ in $(seq 100); do ip netns exec "$WAN_NS_B" ss -ltn | grep -q ':5299 ' && break; sleep 0.05; done
    args=(-c 10.78.0.2 -p 5299 -n "$SIZE" -P "$n" -C "${tool#iperf3-}" -J)
    [[ "$dir" == download ]] && args+=(-R)
    t0="$(date +%s.%N)"
    ip netns exec "$WAN_NS_A" iperf3 "${args[@]}" >"$OUT/log/$name.json" 2>"$OUT/log/$name.err"
    t1="$(date +%s.%N)"
    wait "$server" 2>/dev/null || true
    server=
    own="$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]; print(e["sum_received"]["seconds"])' "$OUT/log/$name.json")"
    ;;
xfer)
    # shellcheck disable=SC2086 # option list
    ip netns exec "$WAN_NS_B" "$BIN/xferd" --listen 10.78.0.2:0 --root "$OUT/srv" --token-file "$OUT/token" \
        $XFERD_ARGS >"$OUT/log/$name.xferd.out" 2>"$OUT/log/$name.xferd.err" &
    server=$!
    for _ in $(seq 200); do grep -q "listening on" "$OUT/log/$name.xferd.out" && break; sleep 0.05; done
    addr="$(head -n1 "$OUT/log/$name.xferd.out" | sed 's/^xferd listening on //')"
    conns=()
    [[ "$n" == auto ]] || conns=(-c "$n")
    t0="$(date +%s.%N)"
    if [[ "$dir" == upload ]]; then
        ip netns exec "$WAN_NS_A" "$BIN/xfer" send --json "${conns[@]}" --token-file "$OUT/token" \
            --as up.bin "$OUT/src.bin" "$addr" >"$OUT/log/$name.json" 2>"$OUT/log/$name.err"
        got="$OUT/srv/up.bin"
    else
        ip netns exec "$WAN_NS_A" "$BIN/xfer" recv --json "${conns[@]}" --token-file "$OUT/token" \
            -o "$OUT/dst/down.bin" src.bin "$addr" >"$OUT/log/$name.json" 2>"$OUT/log/$name.err"
        got="$OUT/dst/down.bin"
    fi
    t1="$(date +%s.%N)"
    cmp -s "$OUT/src.bin" "$got" || { echo "$name: the copy differs from the source" >&2; exit 1; }
    own="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["connections"])' "$OUT/log/$name.json")"
    ;;
esac
python3 - "$name" "$tool" "$dir" "$n" "$t0" "$t1" "$own" "$load" "$(numfmt --from=iec "$SIZE")" <<'EOP'
import sys
name, tool, d, n, t0, t1, own, load, size = sys.argv[1:]
wall = float(t1) - float(t0)
mb = int(size) / wall / 1e6
if tool.startswith("iperf3"):
    own = float(own)
    extra = f"own interval {own:5.2f} s ({int(size) / own / 1e6:5.1f} MB/s), before it {wall - own:4.2f} s"
else:
    extra = f"connections {own}"
print(f"{name:<26} {tool:<12} {d:<8} N={n:<4} wall {wall:5.2f} s {mb:5.1f} MB/s = {mb / 125:.2f} link | {extra} | load {load}")
EOP
EOS
}

echo "# ceiling: $SIZE, wanem $WAN; $(nproc) cores, load at start $(cut -d' ' -f1-3 /proc/loadavg); $(date -u '+%F %T') UTC"
echo "# xfer: $BIN; xferd $XFERD_ARGS"
for round in $(seq "$ROUNDS"); do
    for dir in $DIRS; do
        runs=()
        for n in $COUNTS; do for tool in $TOOLS; do runs+=("$tool:$n"); done; done
        # Alternated: the order reversed in even rounds.
        ((round % 2 == 0)) && mapfile -t runs < <(printf '%s\n' "${runs[@]}" | tac)
        for r in "${runs[@]}"; do
            one "r$round-${r%%:*}-${r##*:}-$dir" "${r%%:*}" "$dir" "${r##*:}" || echo "# r$round $r $dir failed"
        done
    done
done
rm -f "$OUT/srv/src.bin"
