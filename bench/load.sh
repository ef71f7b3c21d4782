#!/usr/bin/env bash
# Load on one xferd over loopback, under a memory budget and without one: IDLE (4096) connections
# that handshake and then say nothing, held open while CLIENTS (16) clients each upload the same
# SIZE (256M) file over CONNS (64) connections at the default 4 MiB chunk size: 1,024 connections
# moving data at once. Prints, per budget, the aggregate throughput, the daemon's RSS (baseline,
# with the idle connections, peak, and SETTLE seconds after the load) and whether every copy is
# identical; then checks the targets of the budget (GUIDE.md, "Limits"):
#   - peak RSS <= budget + 64 MiB;
#   - throughput within 10 % of the unlimited run;
#   - RSS within 32 MiB of the baseline SETTLE (10) seconds after the load ends.
# Not a test: run it by hand; it writes CLIENTS x SIZE (4 GiB) per run.
#
#   bench/load.sh
#   REPEAT=2 bench/load.sh
#
# Environment:
#   BENCH_DIR     base work dir; default bench/out. This script works in BENCH_DIR/load only, on a
#                 real disk (not tmpfs).
#   CLIENTS, CONNS, SIZE, IDLE   as above
#   BUDGET        --max-memory of the budgeted run; default 256M
#   UNLIMITED     --max-memory of the run without a budget worth the name; default 1024G
#   SETTLE        seconds after the load before RSS is read again; default 10
#   REPEAT        runs per budget, alternated; the fastest of each is compared; default 1
#   XFER_BIN_DIR  use xfer/xferd from this directory and skip cargo build --release
#   KEEP=1        keep the copies at the end
#
# How it measures:
#   - RSS is VmRSS of /proc/PID/status; the peak is VmHWM, the kernel's own high-water mark,
#     so no sample can miss it.
#   - Throughput is CLIENTS x SIZE over the wall time from the first client's start to the last
#     one's exit; every copy is then compared with the source (cmp).
#   - Each run gets a fresh xferd and a fresh destination, warmed up by one 16 MiB upload first.
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
BENCH_NAME=load
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

BASE="${BENCH_DIR:-$REPO/bench/out}"
CLIENTS="${CLIENTS:-16}"
CONNS="${CONNS:-64}"
SIZE="${SIZE:-256M}"
IDLE="${IDLE:-4096}"
BUDGET="${BUDGET:-256M}"
UNLIMITED="${UNLIMITED:-1024G}"
SETTLE="${SETTLE:-10}"
REPEAT="${REPEAT:-1}"
KEEP="${KEEP:-0}"
MIB=$((1 << 20))

WORK="$(mkdir -p "$BASE/load" && cd "$BASE/load" && pwd)"
real_disk "$WORK"
require_free "$WORK" $(((CLIENTS + 2) * $(parse_size "$SIZE")))
rm -rf "$WORK/srv" "$WORK/logs"
mkdir -p "$WORK/src" "$WORK/srv" "$WORK/logs"
LOGS="$WORK/logs"

IDLE_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    exec 3>&- 2>/dev/null || true
    end_pids --tree "${PIDS[@]+"${PIDS[@]}"}"
    [[ "$KEEP" == 1 ]] || rm -rf "$WORK/srv"
    exit "$rc"
}
on_exit cleanup

((IDLE + CLIENTS * CONNS + 256 < $(ulimit -n))) ||
    die "ulimit -n is $(ulimit -n): too few for $IDLE idle and $((CLIENTS * CONNS)) active connections"

xfer_binaries "$LOGS/build.log"

SRC="$WORK/src/load.bin"
if [[ "$(stat -c %s "$SRC" 2>/dev/null || echo 0)" != "$(parse_size "$SIZE")" ]]; then
    log "creating the $SIZE source"
    head -c "$(parse_size "$SIZE")" /dev/urandom >"$SRC"
fi
head -c $((16 * MIB)) "$SRC" >"$WORK/src/warm.bin"

rss_mib() { awk '/^VmRSS:/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }
hwm_mib() { awk '/^VmHWM:/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }

# run NAME MAX_MEMORY: one run; appends "NAME secs mib_per_s base idle peak after identical" to
# $WORK/results.
run() {
    local name="$1" max_memory="$2" root="$WORK/srv/$1" i pids=() failed=0 same=0
    rm -rf "$root"
    mkdir -p "$root"
    : >"$LOGS/xferd.err"
    start_xferd "$root" --max-memory "$max_memory" --max-streams $((IDLE + CLIENTS * CONNS)) \
        --max-conns-per-ip 65536 --queue-timeout 300 --log-level warn
    "$XFER" send "$WORK/src/warm.bin" "$XFERD_ADDR" --as warm.bin >/dev/null
    rm -f "$root/warm.bin"
    local base idle peak after start secs
    base="$(rss_mib "$XFERD_PID")"

    rm -f "$WORK/idle.fifo"
    mkfifo "$WORK/idle.fifo"
    python3 "$BENCH_HOME/idle.py" "$XFERD_ADDR" "$IDLE" <"$WORK/idle.fifo" >"$LOGS/idle.out" &
    IDLE_PID=$!
    PIDS+=("$IDLE_PID")
    exec 3>"$WORK/idle.fifo"
    for _ in $(seq 600); do
        grep -q '^ready' "$LOGS/idle.out" && break
        kill -0 "$IDLE_PID" 2>/dev/null || die "idle.py failed: $(tail -n3 "$LOGS/idle.out")"
        sleep 0.1
    done
    grep -q '^ready' "$LOGS/idle.out" || die "the $IDLE idle connections were not all welcomed within 60 s"
    idle="$(rss_mib "$XFERD_PID")"

    start="$(now_ns)"
    for i in $(seq "$CLIENTS"); do
        "$XFER" send "$SRC" "$XFERD_ADDR" --as "copy-$i.bin" -c "$CONNS" --retry-deadline 300 \
            >"$LOGS/client-$i.out" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || {
            failed=$((failed + 1))
            log "client $((i + 1)) failed: $(tail -n2 "$LOGS/client-$((i + 1)).out")"
        }
    done
    secs="$(secs_since "$start")"
    exec 3>&-
    wait "$IDLE_PID" || true
    forget_pid "$IDLE_PID"
    peak="$(hwm_mib "$XFERD_PID")"
    sleep "$SETTLE"
    after="$(rss_mib "$XFERD_PID")"
    stop_xferd
    for i in $(seq "$CLIENTS"); do
        cmp -s "$SRC" "$root/copy-$i.bin" && same=$((same + 1))
    done
    rm -rf "$root"
    local rate
    rate="$(python3 -c "import sys; print(f'{$CLIENTS * $(parse_size "$SIZE") / float(sys.argv[1]) / $MIB:.0f}')" "$secs")"
    printf '%-9s %-10s %8s %8s %8s %8s %8s %8s %9s\n' "$name" "$max_memory" "$secs" "$rate" \
        "$base" "$idle" "$peak" "$after" "$same/$CLIENTS" | tee -a "$WORK/results"
    ((failed == 0)) || log "$failed clients failed"
}

log "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
log "$IDLE idle connections + $CLIENTS clients x $CONNS connections x $SIZE, default chunk size"
: >"$WORK/results"
printf '%-9s %-10s %8s %8s %8s %8s %8s %8s %9s\n' run max_memory secs MiB/s \
    base_MiB idle_MiB peak_MiB after_MiB identical
for _ in $(seq "$REPEAT"); do
    run budget "$BUDGET"
    run unlimited "$UNLIMITED"
done

# The targets, from the fastest run of each.
python3 - "$WORK/results" "$(parse_size "$BUDGET")" "$SETTLE" <<'EOF'
import sys
rows = [line.split() for line in open(sys.argv[1])]
budget_mib, settle = int(sys.argv[2]) >> 20, sys.argv[3]
best = {}
for r in rows:
    if r[0] not in best or float(r[3]) > float(best[r[0]][3]):
        best[r[0]] = r
b, u = best["budget"], best["unlimited"]
ok = lambda c: "ok" if c else "MISSED"
peak = max(int(r[6]) for r in rows if r[0] == "budget")
print(f"peak RSS {peak} MiB <= budget {budget_mib} + 64 MiB: {ok(peak <= budget_mib + 64)}")
ratio = float(b[3]) / float(u[3])
print(f"throughput {b[3]} MiB/s = {ratio:.0%} of unlimited {u[3]} MiB/s (>= 90 %): {ok(ratio >= 0.9)}")
for r in rows:
    grown = int(r[7]) - int(r[4])
    print(f"{r[0]}: RSS {settle} s after the load {r[7]} MiB, baseline {r[4]} MiB (+{grown}, <= 32): {ok(grown <= 32)}")
print(f"every copy identical: {ok(all(r[8].split('/')[0] == r[8].split('/')[1] for r in rows))}")
EOF
