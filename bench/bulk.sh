#!/usr/bin/env bash
# Loopback benchmark of directory trees: `xfer send -r` / `xfer recv -r` against `rsync -a` to an
# rsync daemon and `tar c | socat -> socat | tar x` (no checks, no resume, nothing flushed: the
# ceiling). Two trees: many tiny files, and a mixed tree with a few large files. Not a test: run it
# by hand. One command; installs its peers (rsync, socat, tar, time, iproute2) with apt if missing.
#
#   bench/bulk.sh
#   REPEAT=3 BULK_SETS=small bench/bulk.sh
#
# Environment:
#   BENCH_DIR     base work dir; default bench/out. This script works in BENCH_DIR/bulk only, which
#                 must be on a real disk (not tmpfs): durability costs nothing on tmpfs.
#   BULK_SETS     which trees, any of "small mixed mirror"; default all three
#                   small: SMALL_FILES (10000) files of SMALL_SIZE (4K) bytes in SMALL_DIRS (20)
#                   mixed: MIXED_FILES (2000) files of MIXED_MIN..MIXED_MAX (4K..64K) bytes in
#                          MIXED_DIRS (20) directories, plus MIXED_BIG (3) files of MIXED_BIG_SIZE
#                          (64M)
#                   mirror: the mirror row, bench/mirror.sh (1 % changed and 1 % deleted, synced
#                          with --delete against rsync -aH --delete), run after the others
#   CONNS         xfer connection counts, `auto` for no -c (a tree's small files then go over 4
#                 connections and each large file sizes its own pool); default "auto 8"
#   REPEAT        runs per measurement; the fastest is reported (each mode on its own); default 1
#   SOCAT_BLOCK   socat -b for the tar pipe; default 1048576
#   RUN_TIMEOUT   seconds before one copy is killed; default 900
#   XFER_BIN_DIR  use xfer/xferd from this directory and skip cargo build --release
#   KEEP=1        keep the trees (sources and copies) at the end
#   REUSE_DEST=1  every run writes to the same destination, removed (`rm -rf`, `sync`) right after
#                 the run; see "Destinations" below for why that is not the default
#
# How it measures:
#   - The source trees are made once, then flushed; they stay in the page cache for every peer
#     alike (caches cannot be dropped here).
#   - Every destination is fresh: `rm -rf` and then `sync`, outside the timing, and each run
#     writes into a directory of its own that no earlier run used. Each xfer run gets a fresh xferd.
#   - Destinations: copies are removed only at the end (unless REUSE_DEST=1). On ext4 without a
#     journal (as here) the kernel avoids reusing an inode for 60 s after it was freed
#     (fs/ext4/ialloc.c, recently_deleted), and each file created meanwhile scans past every such
#     inode: removing the previous run's 10,000 files slows the next run's file creation several
#     times over, whatever the tool. Anything removed at start-up is followed by a 61 s wait.
#   - xfer ends every tree copy with a syncfs of the destination filesystem: it is durable when
#     it returns. rsync and tar flush nothing. So each peer is reported twice: "as is" (client
#     start to exit; for tar, until the receiving tar has exited) and "durable" (the same, then
#     `sync -f DEST`, timed together). xfer gets the `sync -f` too, which finds nothing to do.
#     Ratios are given in both modes.
#   - `sync -f` and syncfs flush the whole filesystem: anything else writing to it meanwhile adds
#     to the durable times. The header shows the load average.
#   - Every copy is checked once per kind of run: same paths, types, sizes, modes and content
#     (SHA-256) as the source (and mtimes to the second).
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
BENCH_NAME=bulk
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

BASE="${BENCH_DIR:-$REPO/bench/out}"
SETS="${BULK_SETS:-small mixed mirror}"
MIRROR=0
if [[ " $SETS " == *" mirror "* ]]; then
    MIRROR=1
    SETS="$(tr ' ' '\n' <<<"$SETS" | grep -vx mirror | tr '\n' ' ' || true)"
fi
CONNS="${CONNS:-auto 8}"
REPEAT="${REPEAT:-1}"
SOCAT_BLOCK="${SOCAT_BLOCK:-1048576}"
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
KEEP="${KEEP:-0}"
SMALL_FILES="${SMALL_FILES:-10000}"
SMALL_DIRS="${SMALL_DIRS:-20}"
SMALL_SIZE="${SMALL_SIZE:-4K}"
MIXED_FILES="${MIXED_FILES:-2000}"
MIXED_DIRS="${MIXED_DIRS:-20}"
MIXED_MIN="${MIXED_MIN:-4K}"
MIXED_MAX="${MIXED_MAX:-64K}"
MIXED_BIG="${MIXED_BIG:-3}"
MIXED_BIG_SIZE="${MIXED_BIG_SIZE:-64M}"

for s in $SETS; do [[ "$s" == small || "$s" == mixed ]] || die "unknown set in BULK_SETS: $s"; done

# --- peers --------------------------------------------------------------------------------------
ensure_apt rsync rsync
ensure_apt socat socat
ensure_apt tar tar
ensure_apt ss iproute2
ensure_apt python3 python3

# --- processes: every one we start is recorded and ended by PID at exit -------------------------
WORK_READY=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    end_pids --tree "${PIDS[@]+"${PIDS[@]}"}"
    if [[ "$KEEP" != 1 && -n "$WORK_READY" ]]; then
        rm -rf "$WORK/src" "$WORK/srv" "$WORK/dst"
    fi
    exit "$rc"
}
on_exit cleanup

# --- work dir -----------------------------------------------------------------------------------
WORK="$(mkdir -p "$BASE/bulk" && cd "$BASE/bulk" && pwd)"
real_disk "$WORK"
# Every copy is kept to the end: the source plus one copy per run (4 KiB blocks at least).
REUSE_DEST="${REUSE_DEST:-0}"
copies=$((REUSE_DEST == 1 ? 2 : REPEAT * (2 + 2 * $(wc -w <<<"$CONNS")) + 1))
need=$((copies * (SMALL_FILES * ($(parse_size "$SMALL_SIZE") + 4096) + MIXED_FILES * \
    ($(parse_size "$MIXED_MAX") + 4096) + MIXED_BIG * $(parse_size "$MIXED_BIG_SIZE"))))
require_free "$WORK" "$need"
DELETED_AT=0 # when this script last removed files (see "Destinations" above)
if [[ -n "$(ls -A "$WORK/srv" "$WORK/dst" 2>/dev/null)" ]]; then
    DELETED_AT="$(date +%s)"
fi
rm -rf "$WORK/srv" "$WORK/dst" "$WORK/logs"
mkdir -p "$WORK/src" "$WORK/srv" "$WORK/dst" "$WORK/logs"
WORK_READY=1
LOGS="$WORK/logs"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# --- build --------------------------------------------------------------------------------------
xfer_binaries "$LOGS/build.log"

# --- source trees -------------------------------------------------------------------------------
# make_set NAME: the tree $WORK/src/NAME (bench/tree.py), remade only when its parameters changed.
# Content is pseudo-random (incompressible); content, sizes and the layout come from fixed seeds.
make_set() {
    local name="$1" params
    if [[ "$name" == small ]]; then
        params="small $SMALL_FILES $SMALL_DIRS $(parse_size "$SMALL_SIZE")"
    else
        params="mixed $MIXED_FILES $MIXED_DIRS $(parse_size "$MIXED_MIN") $(parse_size "$MIXED_MAX")"
        params="$params $MIXED_BIG $(parse_size "$MIXED_BIG_SIZE")"
    fi
    if [[ -d "$WORK/src/$name" && "$(cat "$WORK/src/$name.params" 2>/dev/null)" == "$params" ]]; then
        return 0
    fi
    log "creating the $name tree ($params)"
    [[ -e "$WORK/src/$name" ]] && DELETED_AT="$(date +%s)"
    rm -rf "$WORK/src/$name" "$WORK/src/$name.params"
    # shellcheck disable=SC2086 # $params is a list of words
    python3 "$BENCH_HOME/tree.py" make "$WORK/src/$name" $params
    echo "$params" >"$WORK/src/$name.params"
}

set_files() { find "$WORK/src/$1" -type f | wc -l; }
set_bytes() { find "$WORK/src/$1" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }

declare -A VERIFIED=()
# verify KIND SET COPY: COPY has the same entries as the source tree of SET
verify() {
    local kind="$1" set="$2" copy="$3"
    [[ -n "${VERIFIED[$kind]:-}" ]] && return 0
    python3 - "$WORK/src/$set" "$copy" <<'EOF' || die "$kind: the copy $copy differs from its source"
import hashlib, os, stat, sys

def manifest(top):
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            entry = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), int(st.st_mtime))
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry += (st.st_size, hashlib.sha256(f.read()).hexdigest())
            out[rel] = entry
    return out

src, dst = manifest(sys.argv[1]), manifest(sys.argv[2])
bad = sorted(set(src) ^ set(dst)) + sorted(p for p in src if p in dst and src[p] != dst[p])
for p in bad[:10]:
    print(f"  {p}: source {src.get(p)}, copy {dst.get(p)}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
    VERIFIED[$kind]=1
    log "$kind: copy verified"
}

# record SET TOOL CONNS SECONDS_AS_IS SECONDS_DURABLE
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
    log "$(printf '%s %s c=%s: %s s as is, %s s durable' "$@")"
}

# dest SIDE ID: a new directory for one run under $WORK/SIDE (srv: the servers' root, dst: the
# local side), removed and flushed outside the timing. Its name relative to $WORK/SIDE is printed.
dest() {
    local id="$2"
    [[ "$REUSE_DEST" == 1 ]] && id=reuse
    rm -rf "${WORK:?}/$1/$id"
    mkdir -p "$WORK/$1/$id"
    sync
    echo "$id"
}
# done_with DIR: with REUSE_DEST=1, remove a run's copy (and flush) right away
done_with() {
    if [[ "$REUSE_DEST" == 1 ]]; then
        rm -rf "$1"
        sync
    fi
}

# timed_sync T0 DEST: prints "AS_IS DURABLE" seconds, the second after `sync -f DEST`
timed_sync() {
    local t1 t2
    t1="$(now_ns)"
    sync -f "$2"
    t2="$(now_ns)"
    echo "$(secs_between "$1" "$t1") $(secs_between "$1" "$t2")"
}

# --- tar c | socat -> socat | tar x -------------------------------------------------------------
run_tar() { # run_tar SET RUN
    local set="$1" dst port rpid t0 times
    dst="$WORK/dst/$(dest dst "$2-tar")"
    port="$(free_port)"
    (socat -u -b "$SOCAT_BLOCK" "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr" STDOUT |
        tar -x -C "$dst") 2>"$LOGS/tar-recv.err" &
    rpid=$!
    PIDS+=("$rpid")
    wait_listening "$port"
    t0="$(now_ns)"
    # shellcheck disable=SC2016 # expanded by the inner shell
    timeout -k 5 "$RUN_TIMEOUT" bash -c \
        'set -o pipefail; tar -c -C "$1" "$2" | socat -u -b "$3" STDIN "TCP:127.0.0.1:$4"' \
        _ "$WORK/src" "$set" "$SOCAT_BLOCK" "$port" 2>"$LOGS/tar-send.err" ||
        die "tar sender failed: $(cat "$LOGS/tar-send.err")"
    wait "$rpid" || die "tar receiver failed: $(cat "$LOGS/tar-recv.err")"
    forget_pid "$rpid"
    times="$(timed_sync "$t0" "$dst/$set")"
    verify "tar-$set" "$set" "$dst/$set"
    done_with "$dst"
    # shellcheck disable=SC2086
    record "$set" "tar c + socat + tar x" 1 $times
}

# --- rsync -a to an rsync daemon (upload) -------------------------------------------------------
run_rsync() { # run_rsync SET RUN
    local set="$1" id port tpid t0 times
    id="$(dest srv "$2-rsync")"
    port="$(free_port)"
    rsyncd_conf "$WORK/rsyncd.conf" bulk "$WORK/srv"
    rsync --daemon --no-detach --address=127.0.0.1 --port="$port" \
        --config="$WORK/rsyncd.conf" 2>>"$LOGS/rsyncd.err" &
    tpid=$!
    PIDS+=("$tpid")
    wait_listening "$port"
    t0="$(now_ns)"
    timeout -k 5 "$RUN_TIMEOUT" rsync -a "$WORK/src/$set" "rsync://127.0.0.1:$port/bulk/$id/" \
        2>"$LOGS/rsync.err" || die "rsync failed: $(cat "$LOGS/rsync.err")"
    times="$(timed_sync "$t0" "$WORK/srv/$id/$set")"
    # The per-connection child may still be exiting; the daemon reaps it.
    for _ in $(seq 100); do
        [[ -z "$(ps -o pid= --ppid "$tpid")" ]] && break
        sleep 0.05
    done
    kill -TERM "$tpid" 2>/dev/null || true
    wait "$tpid" 2>/dev/null || true
    forget_pid "$tpid"
    verify "rsync-$set" "$set" "$WORK/srv/$id/$set"
    done_with "$WORK/srv/$id"
    # shellcheck disable=SC2086
    record "$set" "rsync -a (daemon)" 1 $times
}

# --- xfer ---------------------------------------------------------------------------------------
XFERD_PID=""
XFERD_ADDR=""
run_xfer() { # run_xfer send|recv SET CONNS RUN
    local mode="$1" set="$2" n="$3" id dst t0 times args kind="xfer-$1-$2-$3" c=()
    [[ "$n" == auto ]] || c=(-c "$n")
    if [[ "$mode" == send ]]; then
        id="$(dest srv "$4-xfer-$1-$3")"
        dst="$WORK/srv/$id/$set"
        start_xferd "$WORK/srv"
        args=(send -r -q --json "${c[@]}" "$WORK/src/$set" "$XFERD_ADDR" --as "$id/$set")
    else
        id="$(dest dst "$4-xfer-$1-$3")"
        dst="$WORK/dst/$id/$set"
        start_xferd "$WORK/src" --read-only
        args=(recv -r -q --json "${c[@]}" "$set" "$XFERD_ADDR" -o "$dst")
    fi
    t0="$(now_ns)"
    timeout -k 5 "$RUN_TIMEOUT" "$XFER" "${args[@]}" >"$LOGS/$kind.json" 2>"$LOGS/$kind.err" ||
        die "xfer ${args[*]} failed: $(cat "$LOGS/$kind.err")"
    times="$(timed_sync "$t0" "$dst")"
    stop_xferd
    python3 - "$LOGS/$kind.json" "$(set_files "$set")" <<'EOF' || die "$kind: bad --json summary"
import json, sys
s = json.load(open(sys.argv[1]))
want = int(sys.argv[2])
ok = s["files_total"] == want and s["files_transferred"] == want and s["files_skipped"] == 0
if not ok:
    print(f"summary {s}: expected {want} files, all transferred", file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
    verify "$kind" "$set" "$dst"
    done_with "$(dirname "$dst")"
    local tool="xfer send -r"
    [[ "$mode" == recv ]] && tool="xfer recv -r"
    # shellcheck disable=SC2086
    record "$set" "$tool" "$n" $times
}

# --- header -------------------------------------------------------------------------------------
commit="$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
[[ -z "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]] || commit="$commit (+ uncommitted changes)"
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
mem_gib="$(awk '/^MemTotal:/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)"
device="$(df -P "$WORK" | awk 'NR == 2 {print $1}')"
HEADER="$WORK/header.md"
{
    echo "# xfer directory-tree benchmark (loopback)"
    echo
    echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "- machine: $(hostname), $(nproc) CPUs (${cpu_model:-unknown}), ${mem_gib} GiB RAM, $(uname -srm)"
    echo "- commit: $commit"
    echo "- disk: $WORK on $device ($FSTYPE)"
    echo "- peers: $(rsync --version | head -n1 | awk '{print "rsync", $3}'), $(tar --version | head -n1),"\
        "$(socat -V | awk '/socat version/ {print "socat", $3; exit}')"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (anything else running skews the numbers)"
    echo "- repeats: $REPEAT (fastest shown, each mode on its own); xfer connections: $CONNS"
    if [[ "$REUSE_DEST" == 1 ]]; then
        echo "- destinations: one per side, removed after every run (REUSE_DEST=1)"
    else
        echo "- destinations: a new directory per run, all removed at the end"
    fi
} >"$HEADER"

# --- runs ---------------------------------------------------------------------------------------
SETS_INFO="$WORK/sets.tsv"
: >"$SETS_INFO"
for set in $SETS; do
    make_set "$set"
    printf '%s\t%s\t%s\n' "$set" "$(set_files "$set")" "$(set_bytes "$set")" >>"$SETS_INFO"
done
sync
wait_s=$((DELETED_AT + 61 - $(date +%s)))
if ((wait_s > 0)); then
    log "waiting $wait_s s: files were removed at start-up (see 'Destinations' in the header)"
    sleep "$wait_s"
fi
for set in $SETS; do
    for rep in $(seq "$REPEAT"); do
        log "$set: round $rep of $REPEAT"
        run_tar "$set" "$set-$rep"
        run_rsync "$set" "$set-$rep"
        for n in $CONNS; do run_xfer send "$set" "$n" "$set-$rep"; done
        for n in $CONNS; do run_xfer recv "$set" "$n" "$set-$rep"; done
    done
done
echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$HEADER"

cat "$HEADER"
echo
python3 - "$RESULTS" "$SETS_INFO" <<'EOF'
import sys
from collections import OrderedDict

VS_RSYNC, VS_TAR = 2.0, 0.7
TAR, RSYNC = "tar c + socat + tar x", "rsync -a (daemon)"

sets = OrderedDict()
for line in open(sys.argv[2]):
    name, files, size = line.split("\t")
    sets[name] = (int(files), int(size))
runs = OrderedDict()
for line in open(sys.argv[1]):
    s, tool, conns, as_is, durable = line.rstrip("\n").split("\t")
    r = runs.setdefault((s, tool, conns), {"as_is": [], "durable": []})
    r["as_is"].append(float(as_is))
    r["durable"].append(float(durable))

modes = (("as_is", "as is"), ("durable", "durable"))
targets = []
for s, (files, size) in sets.items():
    rows = [(tool, conns, {m: min(r[m]) for m, _ in modes}) for (rs, tool, conns), r in runs.items() if rs == s]
    if not rows:
        continue
    print(f"## {s}: {files} files, {size / 1e6:.1f} MB")
    print()
    best = {m: {t: min(r[2][m] for r in rows if r[0] == t) for t in (TAR, RSYNC) if any(r[0] == t for r in rows)} for m, _ in modes}
    head = ["peer", "-c"]
    for _, label in modes:
        head += [f"{label}: s", "files/s", "MB/s", "× rsync", "× tar"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for tool, conns, t in rows:
        cells = [tool, str(conns)]
        for m, _ in modes:
            secs = t[m]
            cells += [f"{secs:.2f}", f"{files / secs:,.0f}", f"{size / 1e6 / secs:.1f}"]
            for base in (RSYNC, TAR):
                b = best[m].get(base)
                cells.append(f"{b / secs:.2f}" if b else "n/a")
        print("| " + " | ".join(cells) + " |")
    print()
    xfer = [r for r in rows if r[0].startswith("xfer")]
    for m, label in modes:
        if not xfer:
            break
        tool, conns, t = min(xfer, key=lambda r: r[2][m])
        who = f"{s}, {label}: best xfer ({tool} -c {conns}, {files / t[m]:,.0f} files/s)"
        for base, need in ((RSYNC, VS_RSYNC), (TAR, VS_TAR)):
            b = best[m].get(base)
            if b is None:
                continue
            ratio = b / t[m]
            targets.append(ratio >= need)
            verdict = "PASS" if ratio >= need else "FAIL"
            print(f"- {verdict}: {who} is {ratio:.2f} x {base} (target >= {need} x)")
    print()
print(
    "s = wall seconds (fastest run); files/s and MB/s (10^6 bytes) = the tree's regular files and "
    "their bytes over those seconds. 'as is': until the client exits (tar: until the receiving "
    "tar exits); 'durable': the same followed by `sync -f DEST`, timed together. xfer flushes the "
    "destination filesystem (syncfs) before it exits, so it is durable in both columns. "
    "× rsync and × tar = this row's speed over that peer's, in the same mode (> 1: this row is "
    "faster)."
)
print()
print(f"{sum(targets)} of {len(targets)} targets met")
EOF
echo
echo "Raw results (every run): $RESULTS; logs: $LOGS"
if ((MIRROR)); then
    echo
    BENCH_DIR="$BASE" REPEAT="$REPEAT" SMALL_FILES="$SMALL_FILES" SMALL_DIRS="$SMALL_DIRS" \
        SMALL_SIZE="$(parse_size "$SMALL_SIZE")" RUN_TIMEOUT="$RUN_TIMEOUT" "$BENCH_HOME/mirror.sh"
fi
