#!/usr/bin/env bash
# Where a transfer's wall time goes on an emulated path: one file up or down with xfer's
# defaults, the receiving namespace's byte counter read every 0.1 s beside it, and the client's
# pool decisions (XFER_LOG=xfer_client=debug). Each run prints one line: when the first data
# arrived, when the link was first full, when 20/100/300/1000 MB had arrived, how long the rate
# stayed full, the trickle of the last chunks and the end (commit) after the last data, and the
# pool's steps. Builds are alternated run by run, so their lines compare side by side.
# Run as root (namespaces). Takes TIMELINE_LOCK itself, once per run: do not wrap it in flock.
#
#   bench/timeline.sh NEW_BIN_DIR OLD_BIN_DIR          # far profile, 2 GiB, up and down, 1 round
#   TIMELINE_ROUNDS=3 TIMELINE_DIRS=upload bench/timeline.sh target/release /work/main/target/release
#
# Environment:
#   TIMELINE_WAN     wanem options; default the far profile of wan.sh:
#                    "--delay-ms 75 --loss 0.001 --rate-mbit 1000"
#   TIMELINE_CC      congestion control of both namespaces (xfer's starting point); default cubic
#   TIMELINE_SIZE    default 2G; TIMELINE_DIRS default "upload download"; TIMELINE_ROUNDS default 1
#   TIMELINE_DIR     where the file, logs and samples go; default bench/out/timeline
#   TIMELINE_LOCK    default /work/wt/bench.lock
#   TIMELINE_NS      prefix of the two namespaces; default timeline
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
[[ $# -ge 1 ]] || { echo "usage: bench/timeline.sh BIN_DIR [BIN_DIR...]" >&2; exit 2; }
[[ $EUID == 0 ]] || { echo "timeline.sh: run as root (namespaces)" >&2; exit 1; }
WAN="${TIMELINE_WAN:---delay-ms 75 --loss 0.001 --rate-mbit 1000}"
CC="${TIMELINE_CC:-cubic}"
SIZE="${TIMELINE_SIZE:-2G}"
DIRS="${TIMELINE_DIRS:-upload download}"
ROUNDS="${TIMELINE_ROUNDS:-1}"
OUT="${TIMELINE_DIR:-$REPO/bench/out/timeline}"
LOCK="${TIMELINE_LOCK:-/work/wt/bench.lock}"
export OUT WAN CC
export WAN_NS_A="${TIMELINE_NS:-timeline}-a" WAN_NS_B="${TIMELINE_NS:-timeline}-b"
export WANEM_RUN="/run/wanem-${TIMELINE_NS:-timeline}"
mkdir -p "$OUT/wanem" "$OUT/srv" "$OUT/dst" "$OUT/log"
OUT="$(cd "$OUT" && pwd)"
BINS=()
for b in "$@"; do BINS+=("$(cd "$b" && pwd)"); done

# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"
emulated_file_setup "$OUT" "$SIZE"

# one RUN_NAME BIN DIR: one transfer under the lock, with the emulator up only for it
one() {
    local name="$1" bin="$2" dir="$3"
    # -o: a process the run leaves behind (a wanem that came up after wan.sh gave up on it) must
    # not keep the lock, and every other benchmark on the machine waiting, once the run is over.
    flock -o "$LOCK" bash -s "$name" "$bin" "$dir" <<'EOS'
set -euo pipefail
name="$1" bin="$2" dir="$3"
orig_cc="$(sysctl -n net.ipv4.tcp_allowed_congestion_control)"
cleanup() {
    [[ -n "${sampler:-}" ]] && kill "$sampler" 2>/dev/null
    [[ -n "${daemon:-}" ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    "$OUT/wanem/wan.sh" down >/dev/null 2>&1 || true
    sysctl -qw net.ipv4.tcp_allowed_congestion_control="$orig_cc"
    rm -f "$OUT/srv/up.bin" "$OUT/dst/down.bin" "$OUT"/srv/.up.bin.* "$OUT"/dst/.down.bin.*
}
trap cleanup EXIT
sysctl -qw net.ipv4.tcp_allowed_congestion_control="reno cubic bbr"
# shellcheck disable=SC2086 # option list
"$OUT/wanem/wan.sh" up $WAN --cc "$CC" --seed 1 >"$OUT/log/$name.wan" 2>&1
fast_open_on "$WAN_NS_A" "$WAN_NS_B"
ip netns exec "$WAN_NS_B" "$bin/xferd" --listen 10.78.0.2:0 --root "$OUT/srv" --token-file "$OUT/token" \
    >"$OUT/log/$name.xferd.out" 2>"$OUT/log/$name.xferd.err" &
daemon=$!
for _ in $(seq 200); do grep -q "listening on" "$OUT/log/$name.xferd.out" && break; sleep 0.05; done
addr="$(head -n1 "$OUT/log/$name.xferd.out" | sed 's/^xferd listening on //')"
[[ "$dir" == upload ]] && ns="$WAN_NS_B" || ns="$WAN_NS_A"
(while :; do echo "$(date +%s.%N) $(ip netns exec "$ns" cat /sys/class/net/wan0/statistics/rx_bytes)"; sleep 0.1; done) \
    >"$OUT/log/$name.rx" &
sampler=$!
t0="$(date +%s.%N)"
if [[ "$dir" == upload ]]; then
    ip netns exec "$WAN_NS_A" env XFER_LOG=xfer_client=debug "$bin/xfer" send --json --token-file "$OUT/token" \
        --as up.bin "$OUT/src.bin" "$addr" >"$OUT/log/$name.out" 2>"$OUT/log/$name.err"
    got="$OUT/srv/up.bin"
else
    ip netns exec "$WAN_NS_A" env XFER_LOG=xfer_client=debug "$bin/xfer" recv --json --token-file "$OUT/token" \
        -o "$OUT/dst/down.bin" src.bin "$addr" >"$OUT/log/$name.out" 2>"$OUT/log/$name.err"
    got="$OUT/dst/down.bin"
fi
t1="$(date +%s.%N)"
cmp -s "$OUT/src.bin" "$got" || { echo "$name: the copy differs from the source" >&2; exit 1; }
echo "$t0 $t1" >"$OUT/log/$name.times"
EOS
    python3 - "$OUT/log/$name" "$name" <<'EOP'
import re, sys
base, name = sys.argv[1], sys.argv[2]
t0, t1 = map(float, open(base + ".times").read().split())
rows = [(float(a), int(b)) for a, b in (l.split() for l in open(base + ".rx") if len(l.split()) == 2)]
b0 = rows[0][1]
rate = [(ta - t0, (bb - ba) / (tb - ta) / 1e6) for (ta, ba), (tb, bb) in zip(rows, rows[1:])]
first = min(t for t, r in rate if r > 1)
full = min(t for t, r in rate if r > 100)
full_until = max(t for t, r in rate if r > 90)
last = max(t for t, r in rate if r > 1)
# Marks the file is too small to reach are left out.
reach = " ".join(
    f"{mb}MB@{next(t - t0 for t, b in rows if b - b0 >= mb * 1e6):.2f}"
    for mb in (20, 100, 300, 1000)
    if rows[-1][1] - b0 >= mb * 1e6
)
log = re.sub(r"\x1b\[[0-9;]*m", "", open(base + ".err").read())
steps = " ".join(
    f"{a}>{b}" if a else f"={c}"
    for a, b, c in re.findall(r"from=(\d+) to=(\d+)|connections=(\d+) mib", log)
)
print(f"{name:<16} wall {t1 - t0:6.2f} s | first data {first:.2f} full {full:.2f} | {reach} | "
      f"full until {full_until:.2f} last data {last:.2f}: trickle {last - full_until:.2f} end {t1 - t0 - last:.2f} | pool {steps}")
EOP
}

echo "# timeline: $SIZE, wanem $WAN, namespaces' cc $CC; $(nproc) cores, load at start $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
    for dir in $DIRS; do
        # Alternated: the first build first in odd rounds, last in even ones.
        order=("${!BINS[@]}")
        ((round % 2 == 0)) && order=($(printf '%s\n' "${order[@]}" | tac))
        for i in "${order[@]}"; do
            one "r$round-b$i-$dir" "${BINS[$i]}" "$dir"
        done
    done
done
echo "# builds: $(for i in "${!BINS[@]}"; do printf 'b%s=%s ' "$i" "${BINS[$i]}"; done)"
rm -f "$OUT/srv/src.bin"
