#!/usr/bin/env bash
# Delta benchmark: a file the receiver already holds in an older version, sent again by xfer
# --whole-file, xfer --delta, xfer with its automatic choice, and rsync (delta) to an rsync
# daemon, through the WAN emulator's 50 ms / 500 Mbit profile and on loopback. Not a test: run it
# by hand, as root (the WAN profile makes namespaces), under `flock /work/wt/bench.lock`.
#
#   bench/delta.sh                                   # everything at 2 GiB (needs ~14 GB free)
#   DELTA_SIZE=256M DELTA_TREE_FILES=200 REPEAT=1 bench/delta.sh   # a quick run
#
# Workloads (made once under DELTA_DIR, same content every time for the same sizes):
#   inplace  DELTA_SIZE random bytes, 1 % rewritten in place in 200 runs at scattered offsets
#   insert   the same file with 1 MiB inserted 64 KiB from its start
#   append   the same file with 2 % appended
#   real     files of /usr/lib and /usr/share concatenated up to DELTA_SIZE, changed as inplace
#            plus 1 MiB inserted near its start
#   tree     DELTA_TREE_FILES files of DELTA_TREE_FILE_SIZE, DELTA_TREE_CHANGED of them with 8 KiB
#            rewritten in place and a new mtime (xfer send -r; rsync -a)
# Before every run the receiver's copy is reset to the old version with the old mtime.
# DELTA_DIRECTION=recv times downloads instead: the daemon serves the new version and the client
# holds the old one (xfer recv -o; rsync from the rsync daemon), into DELTA_DIR/local (run on the
# single-file workloads so far).
#
# Measurements, per run: wall seconds of the client (the receiver's final flush included: xfer
# commits with fsync, rsync is followed by `sync -f`); on the WAN profile the bytes that crossed
# the emulated link both ways (the client namespace's wan0 counters: payload, signatures and
# headers), as a share of the new file; xfer's own literal_bytes (--json). The fastest of REPEAT
# runs is kept. Page caches are not dropped (a shared machine): the old and new files are read
# from memory when they fit, which favours reading both files (delta) over the link.
#
# Environment: DELTA_SIZE (2G), DELTA_TREE_FILES (1000), DELTA_TREE_FILE_SIZE (2M),
# DELTA_TREE_CHANGED (50), DELTA_PROFILES ("wan loopback"), DELTA_WORKLOADS ("inplace insert
# append real tree"), DELTA_TOOLS ("whole delta auto rsync"), REPEAT (1), DELTA_DIR
# (bench/out/delta), XFER_BIN_DIR (skip cargo build), KEEP=1 (keep the workloads), DELTA_LOG=1 (the
# client's debug log of every run, timestamped, in DELTA_DIR/logs/PROFILE-TOOL-WORKLOAD.err),
# DELTA_REUSE=1 (time the workloads an earlier KEEP=1 run made, e.g. with DELTA_PROFILES=" "
# outside the bench lock, instead of making them again), DELTA_BUILDS="NAME=DIR ..." (A/B: every
# xfer run alternates these builds of xfer and xferd, each with its own daemon; rows are
# labelled TOOL@NAME).
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
BENCH_NAME=delta-bench
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

SIZE="$(parse_size "${DELTA_SIZE:-2G}")"
TREE_FILES="${DELTA_TREE_FILES:-1000}"
TREE_FILE_SIZE="$(parse_size "${DELTA_TREE_FILE_SIZE:-2M}")"
TREE_CHANGED="${DELTA_TREE_CHANGED:-50}"
PROFILES="${DELTA_PROFILES:-wan loopback}"
WORKLOADS="${DELTA_WORKLOADS:-inplace insert append real tree}"
TOOLS="${DELTA_TOOLS:-whole delta auto rsync}"
REPEAT="${REPEAT:-1}"
WORK="${DELTA_DIR:-$REPO/bench/out/delta}"
KEEP="${KEEP:-0}"
DIRECTION="${DELTA_DIRECTION:-send}"
LOCAL="$WORK/local"
LOGS="$WORK/logs"
SRV="$WORK/srv"
NS_A=wa
NS_B=wb
IP_B=10.78.0.2
WAN_IS_UP=0

[[ $EUID == 0 ]] || die "run as root (network namespaces)"
mkdir -p "$WORK" "$LOGS" "$SRV"
# A daemon reached over a network (the WAN profile) serves only with a token.
TOKEN="$WORK/token"
[[ -s "$TOKEN" ]] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TOKEN"; chmod 600 "$TOKEN"; }
real_disk "$WORK"
# The workloads (unless reused), the receiver's copy and its partial.
if [[ "${DELTA_REUSE:-0}" == 1 ]]; then
    require_free "$WORK" $((SIZE * 3 + TREE_FILES * TREE_FILE_SIZE * 2))
else
    require_free "$WORK" $((SIZE * 7 + TREE_FILES * TREE_FILE_SIZE * 3))
fi
xfer_binaries "$LOGS/build.log"
# The builds each xfer tool runs with: NAME=DIR pairs, or the one build above.
declare -A BUILD_DIR=()
BUILDS=()
for b in ${DELTA_BUILDS:-}; do
    [[ "$b" == *=* && -x "${b#*=}/xfer" && -x "${b#*=}/xferd" ]] || die "DELTA_BUILDS: $b is not NAME=DIR with xfer and xferd"
    BUILDS+=("${b%%=*}")
    BUILD_DIR[${b%%=*}]="${b#*=}"
done
# "_": the one build, unlabelled.
((${#BUILDS[@]})) || { BUILDS=(_); BUILD_DIR[_]="$(dirname "$XFER")"; }
label() { [[ "$1" == _ ]] || echo "$1"; }
declare -A ADDRS=()
need rsync rsync rsync
[[ -z "${NA[rsync]:-}" ]] || TOOLS="${TOOLS/rsync/}"

WANEM_SRC=/work/shared/wanem
[[ -d "$WANEM_SRC" ]] || WANEM_SRC="$REPO/../shared/wanem"
WANSH="$WORK/wanem/wan.sh"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    end_pids --tree "${PIDS[@]+"${PIDS[@]}"}"
    if ((WAN_IS_UP)); then "$WANSH" down >"$LOGS/wan-down.log" 2>&1 || log "wan.sh down failed"; fi
    rm -rf "$SRV" "$LOCAL"
    [[ "$KEEP" == 1 ]] || rm -rf "$WORK/data"
    exit "$rc"
}
on_exit cleanup

# --- workloads -----------------------------------------------------------------------------------
if [[ "${DELTA_REUSE:-0}" == 1 ]]; then
    [[ -d "$WORK/data/new" ]] || die "DELTA_REUSE=1 but no workloads under $WORK/data (make them with KEEP=1)"
    log "reusing the workloads under $WORK/data"
else
log "making the workloads under $WORK/data"
python3 - "$WORK/data" "$SIZE" "$TREE_FILES" "$TREE_FILE_SIZE" "$TREE_CHANGED" <<'EOF'
import os, random, sys
data, size, files, fsize, changed = sys.argv[1], *map(int, sys.argv[2:])
os.makedirs(f"{data}/old", exist_ok=True)
os.makedirs(f"{data}/new", exist_ok=True)
rng = random.Random(1)
# Edits draw from their own stream: the same bytes whether or not the files they edit were
# made in this run (a kept base made earlier left `rng` unread, so edits then repeated it).
edit_rng = random.Random(2)
MIB = 1 << 20
OLD_MTIME, NEW_MTIME = 1_700_000_000, 1_800_000_000

def done(path, mtime):
    os.utime(path, (mtime, mtime))

def random_file(path, n):
    if os.path.exists(path) and os.path.getsize(path) == n:
        return
    with open(path, "wb") as f:
        left = n
        while left:
            k = min(left, 64 * MIB)
            f.write(rng.randbytes(k))
            left -= k
    done(path, OLD_MTIME)

def copy_with(src, dst, edit):
    # A fresh inode: dst may be a hard link to src left by a run that changed other files.
    if os.path.exists(dst):
        os.unlink(dst)
    with open(src, "rb") as i, open(dst, "wb") as o:
        while chunk := i.read(64 * MIB):
            o.write(chunk)
    with open(dst, "r+b") as o:
        edit(o)
    done(dst, NEW_MTIME)

def in_place(o, n):
    run = max(1, n // 100 // 200)
    for k in range(200):
        o.seek((k * n) // 200 + edit_rng.randrange(max(1, n // 200 - run)))
        o.write(edit_rng.randbytes(run))

def insert_at(src, dst, at, blob, edit=None):
    with open(src, "rb") as i, open(dst, "wb") as o:
        o.write(i.read(at))
        o.write(blob)
        while chunk := i.read(64 * MIB):
            o.write(chunk)
    if edit:
        with open(dst, "r+b") as o:
            edit(o)
    done(dst, NEW_MTIME)

base = f"{data}/old/base.bin"
random_file(base, size)
for name in ("inplace", "insert", "append"):
    if not os.path.exists(f"{data}/old/{name}.bin"):
        os.link(base, f"{data}/old/{name}.bin")
copy_with(base, f"{data}/new/inplace.bin", lambda o: in_place(o, size))
insert_at(base, f"{data}/new/insert.bin", 64 * 1024, edit_rng.randbytes(MIB))
copy_with(base, f"{data}/new/append.bin", lambda o: (o.seek(0, 2), o.write(edit_rng.randbytes(size // 50))))

real = f"{data}/old/real.bin"
if not (os.path.exists(real) and os.path.getsize(real) == size):
    with open(real, "wb") as o:
        left = size
        for top in ("/usr/lib", "/usr/share"):
            for root, dirs, names in os.walk(top):
                dirs.sort()
                for n in sorted(names):
                    p = os.path.join(root, n)
                    if left == 0 or os.path.islink(p) or not os.path.isfile(p):
                        continue
                    try:
                        with open(p, "rb") as i:
                            b = i.read(left)
                    except OSError:
                        continue
                    o.write(b)
                    left -= len(b)
        o.write(bytes(left))
    done(real, OLD_MTIME)
insert_at(real, f"{data}/new/real.bin", 4 * MIB, edit_rng.randbytes(MIB), lambda o: in_place(o, size))

for side in ("old", "new"):
    os.makedirs(f"{data}/{side}/tree", exist_ok=True)
for k in range(files):
    old = f"{data}/old/tree/f{k:05}"
    random_file(old, fsize)
    new = f"{data}/new/tree/f{k:05}"
    if k % (files // max(1, changed)) == 0 and k // (files // max(1, changed)) < changed:
        copy_with(old, new, lambda o: (o.seek(fsize // 2), o.write(edit_rng.randbytes(8192))))
    else:
        if os.path.exists(new):
            os.unlink(new)
        os.link(old, new)
EOF
fi
# Written out before the first timed run, which would otherwise pay their writeback.
sync -f "$WORK/data"

# --- one run ---------------------------------------------------------------------------------------
# reset WORKLOAD: the receiver holds the old version, with its old mtime
reset() {
    if [[ "$DIRECTION" == recv ]]; then
        # The daemon serves the new version; the client holds the old one.
        mkdir -p "$LOCAL"
        rm -rf "${SRV:?}/$1" "${SRV:?}/.$1".* "${LOCAL:?}/$1" "${LOCAL:?}/.$1".*
        if [[ "$1" == tree ]]; then
            cp -a "$WORK/data/new/tree" "$SRV/tree"
            cp -a "$WORK/data/old/tree" "$LOCAL/tree"
        else
            cp -p "$WORK/data/new/$1.bin" "$SRV/$1"
            cp -p "$WORK/data/old/$1.bin" "$LOCAL/$1"
        fi
        sync -f "$SRV"
        return
    fi
    rm -rf "${SRV:?}/$1" "${SRV:?}/.$1".*
    if [[ "$1" == tree ]]; then cp -a "$WORK/data/old/tree" "$SRV/tree"; else cp -p "$WORK/data/old/$1.bin" "$SRV/$1"; fi
    sync -f "$SRV"
}
# link_bytes: bytes sent plus received on the client side of the emulated link
link_bytes() {
    # shellcheck disable=SC2016 # expanded by the shell inside the namespace
    ip netns exec "$NS_A" sh -c 'echo $(($(cat /sys/class/net/wan0/statistics/tx_bytes) + $(cat /sys/class/net/wan0/statistics/rx_bytes)))'
}
# in_ns: a prefix running the client in the client namespace on the WAN profile
in_ns() { if [[ "$PROFILE" == wan ]]; then echo "ip netns exec $NS_A"; fi; }

# one_run TOOL WORKLOAD [BUILD]: sets SECS, WIRE (bytes or "n/a"), LITERAL (bytes or "n/a")
one_run() {
    local tool="$1" w="$2" build="${3:-_}" src dest t0 b0 out="$LOGS/run.json" ns
    local xfer="${BUILD_DIR[$build]:-}/xfer" addr="${ADDRS[$build]:-}"
    read -r -a ns <<<"$(in_ns)"
    reset "$w"
    # rsync runs carry no build: no xferd log of their own.
    XFERD_LOG_POS="$(stat -c %s "$LOGS/xferd$build.err" 2>/dev/null || echo 0)"
    if [[ "$w" == tree ]]; then src="$WORK/data/new/tree"; else src="$WORK/data/new/$w.bin"; fi
    dest="$SRV/$w"
    [[ "$DIRECTION" != recv ]] || dest="$LOCAL/$w"
    b0=0
    [[ "$PROFILE" != wan ]] || b0="$(link_bytes)"
    t0="$(now_ns)"
    case "$tool" in
        whole | delta | auto)
            local flags=(-q --json --token-file "$TOKEN")
            [[ "$tool" == whole ]] && flags+=(--whole-file)
            [[ "$tool" == delta ]] && flags+=(--delta)
            [[ "$w" == tree ]] && flags+=(-r)
            if [[ "$DIRECTION" == recv ]]; then
                "${ns[@]+"${ns[@]}"}" env ${DELTA_LOG:+XFER_LOG=xfer=debug,xfer_client=debug} "$xfer" recv "${flags[@]}" "$w" "$addr" -o "$dest" >"$out" 2>"$LOGS/run.err" ||
                    die "$tool $w failed: $(tail -n1 "$LOGS/run.err")"
            else
                "${ns[@]+"${ns[@]}"}" env ${DELTA_LOG:+XFER_LOG=xfer=debug,xfer_client=debug} "$xfer" send "${flags[@]}" "$src" "$addr" --as "$w" >"$out" 2>"$LOGS/run.err" ||
                    die "$tool $w failed: $(tail -n1 "$LOGS/run.err")"
            fi
            ;;
        rsync)
            local from="$src" to="rsync://$RSYNC_HOST:$RSYNC_PORT/bench/$w"
            [[ "$DIRECTION" != recv ]] || { from="$to"; to="$dest"; }
            [[ "$w" == tree ]] && { from="$from/"; to="$to/"; }
            "${ns[@]+"${ns[@]}"}" rsync -a "$from" "$to" 2>"$LOGS/run.err" || die "rsync $w failed: $(tail -n1 "$LOGS/run.err")"
            sync -f "$dest"
            echo '{}' >"$out"
            ;;
    esac
    SECS="$(secs_since "$t0")"
    if [[ -n "${DELTA_LOG:-}" ]]; then
        cp "$LOGS/run.err" "$LOGS/$PROFILE-$tool$(label "$build")-$w.err"
        # The daemon's log of this run: what it wrote since the run started.
        [[ ! -f "$LOGS/xferd$build.err" ]] ||
            tail -c +"$((XFERD_LOG_POS + 1))" "$LOGS/xferd$build.err" >"$LOGS/$PROFILE-$tool$(label "$build")-$w.xferd.err"
    fi
    WIRE=n/a
    [[ "$PROFILE" != wan ]] || WIRE=$(($(link_bytes) - b0))
    LITERAL="$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("literal_bytes", d.get("bytes_transferred", "n/a")))' "$out")"
    if [[ "$w" == tree ]]; then
        diff -rq "$src" "$dest" >/dev/null || die "$tool $w: the copy differs from the source"
    else
        cmp -s "$src" "$dest" || die "$tool $w: the copy differs from the source"
    fi
}

# --- servers -------------------------------------------------------------------------------------
start_servers() {
    local ns=() host=127.0.0.1
    if [[ "$PROFILE" == wan ]]; then
        ns=(ip netns exec "$NS_B")
        host="$IP_B"
    fi
    local build
    for build in "${BUILDS[@]}"; do
        : >"$LOGS/xferd$build.out"
        "${ns[@]+"${ns[@]}"}" env ${DELTA_LOG:+RUST_LOG=info,xferd=debug,xfer_core=debug} "${BUILD_DIR[$build]}/xferd" --listen "$host:0" --root "$SRV" --token-file "$TOKEN" >"$LOGS/xferd$build.out" 2>"$LOGS/xferd$build.err" &
        XFERD_PID=$!
        PIDS+=("$XFERD_PID")
        ADDRS[$build]="$(xferd_addr "$LOGS/xferd$build.out" "$LOGS/xferd$build.err" "$XFERD_PID")"
    done
    if has_tool rsync; then
        RSYNC_HOST="$host"
        RSYNC_PORT="$(free_port)"
        rsyncd_conf "$WORK/rsyncd.conf" bench "$SRV"
        "${ns[@]+"${ns[@]}"}" rsync --daemon --no-detach --address="$host" --port="$RSYNC_PORT" \
            --config="$WORK/rsyncd.conf" 2>"$LOGS/rsyncd.err" &
        RSYNCD_PID=$!
        PIDS+=("$RSYNCD_PID")
        if [[ "$PROFILE" == wan ]]; then wait_listening "$RSYNC_PORT" "$NS_B"; else wait_listening "$RSYNC_PORT"; fi
    fi
}
stop_servers() {
    end_pids --tree "${PIDS[@]+"${PIDS[@]}"}"
    PIDS=()
}

# --- the matrix ----------------------------------------------------------------------------------
echo "# Delta transfer benchmark"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')."
echo "Direction: $DIRECTION (send: the daemon holds the old version; recv: the client does)."
echo "File size $SIZE bytes; tree $TREE_FILES files of $TREE_FILE_SIZE bytes, $TREE_CHANGED changed; REPEAT=$REPEAT (fastest kept)."
for PROFILE in $PROFILES; do
    if [[ "$PROFILE" == wan ]]; then
        mkdir -p "$WORK/wanem"
        for f in wan.sh wanem.c; do install -m 0755 "$WANEM_SRC/$f" "$WORK/wanem/$f"; done
        "$WANSH" build >&2 || die "building wanem failed"
        # A failed start may leave the namespaces or the emulator up: taken down before dying.
        "$WANSH" up --delay-ms 25 --loss 0.0001 --rate-mbit 500 >"$LOGS/wan-up.log" 2>&1 || {
            "$WANSH" down >"$LOGS/wan-down.log" 2>&1 || true
            die "wan.sh up failed: $(tail -n3 "$LOGS/wan-up.log")"
        }
        WAN_IS_UP=1
        fast_open_on "$NS_A" "$NS_B"
        desc="WAN: 50 ms RTT, 0.01 % loss each way, 500 Mbit/s, TCP Fast Open on"
    else
        desc="loopback"
    fi
    start_servers
    echo
    echo "## $desc"
    echo
    echo "| workload | tool | seconds | on the wire | of the new file | literal bytes |"
    echo "|---|---|---|---|---|---|"
    for w in $WORKLOADS; do
        if [[ "$w" == tree ]]; then new_bytes=$(du -sb --apparent-size "$WORK/data/new/tree" | cut -f1); else new_bytes=$(stat -c %s "$WORK/data/new/$w.bin"); fi
        for tool in $TOOLS; do
            # rsync runs once per round; each xfer tool once per build, the builds alternated.
            builds=("${BUILDS[@]}")
            [[ "$tool" != rsync ]] || builds=(_)
            declare -A best=() best_wire=() best_lit=()
            for _ in $(seq "$REPEAT"); do
                for build in "${builds[@]}"; do
                    one_run "$tool" "$w" "$build"
                    if [[ -z "${best[$build]:-}" ]] || python3 -c 'import sys; sys.exit(float(sys.argv[1]) >= float(sys.argv[2]))' "$SECS" "${best[$build]}"; then
                        best[$build]="$SECS" best_wire[$build]="$WIRE" best_lit[$build]="$LITERAL"
                    fi
                done
            done
            for build in "${builds[@]}"; do
                share=n/a
                [[ "${best_wire[$build]}" == n/a ]] || share="$(python3 -c 'import sys; print(f"{100 * int(sys.argv[1]) / int(sys.argv[2]):.2f} %")' "${best_wire[$build]}" "$new_bytes")"
                echo "| $w | ${tool/whole/xfer --whole-file}$(label "$build" | sed 's/^/@/') | ${best[$build]} | ${best_wire[$build]} | $share | ${best_lit[$build]} |" |
                    sed 's/| delta\(@[^ |]*\)\? |/| xfer --delta\1 |/; s/| auto\(@[^ |]*\)\? |/| xfer (auto)\1 |/; s/| rsync |/| rsync (daemon) |/'
            done
            unset best best_wire best_lit
        done
    done
    stop_servers
    if ((WAN_IS_UP)); then
        "$WANSH" down >"$LOGS/wan-down.log" 2>&1 || log "wan.sh down failed"
        WAN_IS_UP=0
    fi
done
