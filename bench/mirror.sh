#!/usr/bin/env bash
# Loopback benchmark of mirroring (bench/bulk.sh's mirror row): a tree already copied, then 1 % of
# its files changed and 1 % deleted at the source, synced again with `xfer send -r --delete` to an
# xferd --allow-delete and with `rsync -aH --delete` to an rsync daemon, side by side in one run.
# Target: xfer >= 2 x rsync's files per second. Not a test: run it by hand (bench/bulk.sh runs it
# when BULK_SETS has "mirror"). Installs rsync and iproute2 with apt if missing. XFER_BIN_DIR=DIR
# uses prebuilt binaries (bench/lib.sh).
#
#   bench/mirror.sh
#   REPEAT=3 MIRROR_REAL=/usr/include bench/mirror.sh
#
# Environment:
#   BENCH_DIR     base work dir; default bench/out. Works in BENCH_DIR/mirror only (a real disk).
#   MIRROR_TREES  which trees, any of "gen real"; default both
#                   gen:  SMALL_FILES (10000) files of SMALL_SIZE (4K) in SMALL_DIRS (20)
#                         directories, made by bench/tree.py (same content every run)
#                   real: a copy of MIRROR_REAL (default /usr/share/doc), a tree nobody here wrote
#   REPEAT        rounds; the fastest of each tool is reported; default 1
#   MIRROR_WAN=1  through the WAN emulator instead of loopback (root; shared/wanem): bench/wan.sh's
#                 `wan` profile, 50 ms RTT, 0.01 % loss, 500 Mbit/s, the system's congestion
#                 control (a per-namespace one would need a global sysctl); clients in netns
#                 xm-a, both daemons in netns xm-b (names of their own, so a wan.sh run elsewhere
#                 is not disturbed); the namespaces are removed at exit
#   RUN_TIMEOUT   seconds before one sync is killed; default 900
#   XFER_ARGS     more arguments for `xfer send` (e.g. -v: its timestamped steps land in
#                 BENCH_DIR/mirror/logs/xfer.log, the last run's)
#
# How it measures, per tree and round:
#   - The source is copied (`cp -a`: modes and mtimes to the nanosecond) to the destination of
#     each tool, so both start from a complete, identical copy; then 1 % of the source's regular
#     files get new content (same path, size changed, mtime moved) and another 1 % are deleted,
#     chosen from a fixed seed (the same files for both tools). All of it is flushed before timing.
#   - Each tool then syncs the source to its own destination with deletion; the time runs from
#     the client's start to its exit ("as is") and to the end of a following `sync -f` ("durable";
#     xfer flushes the destination itself before it exits, rsync does not).
#   - files/s = regular files of the source tree over the seconds: what a mirror run has to look
#     at. Afterwards each destination must hold exactly the source's regular files (content, mode,
#     mtime to the second) and directories, and nothing else; links are not compared (both tools
#     copy them as they are).
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
BENCH_NAME=mirror
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

BASE="${BENCH_DIR:-$REPO/bench/out}"
TREES="${MIRROR_TREES:-gen real}"
REAL="${MIRROR_REAL:-/usr/share/doc}"
REPEAT="${REPEAT:-1}"
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
SMALL_FILES="${SMALL_FILES:-10000}"
SMALL_DIRS="${SMALL_DIRS:-20}"
SMALL_SIZE="$(parse_size "${SMALL_SIZE:-4K}")"

for t in $TREES; do [[ "$t" == gen || "$t" == real ]] || die "unknown tree in MIRROR_TREES: $t"; done
ensure_apt rsync rsync
ensure_apt ss iproute2
ensure_apt python3 python3

WAN="${MIRROR_WAN:-0}"
WANSH=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    end_pids --tree "${PIDS[@]+"${PIDS[@]}"}"
    [[ -z "$WANSH" ]] || "$WANSH" down >&2 || true
    exit "$rc"
}
on_exit cleanup

mkdir -p "$BASE/mirror"
WORK="$(cd "$BASE/mirror" && pwd)"
real_disk "$WORK"
rm -rf "$WORK/srv" "$WORK/src" "$WORK/logs"
mkdir -p "$WORK/srv" "$WORK/src" "$WORK/pristine" "$WORK/logs"
LOGS="$WORK/logs"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
xfer_binaries "$LOGS/build.log"

# --- the link: loopback, or the WAN emulator between two namespaces ---------------------------
CLIENT=()     # prefix of the client commands
SERVER=()     # prefix of the daemons
SERVER_IP=127.0.0.1
NS_B=""
LINK="loopback"
if [[ "$WAN" == 1 ]]; then
    ((EUID == 0)) || die "MIRROR_WAN=1 needs root (network namespaces)"
    WANEM_SRC=/work/shared/wanem
    [[ -d "$WANEM_SRC" ]] || WANEM_SRC="$REPO/../shared/wanem"
    [[ -f "$WANEM_SRC/wan.sh" ]] || die "no WAN emulator in $WANEM_SRC"
    export WAN_NS_A=xm-a WAN_NS_B=xm-b WANEM_RUN="$WORK/wanem-run"
    mkdir -p "$WORK/wanem"
    # shared/wanem is read-only; its wan.sh builds next to itself
    for f in wan.sh wanem.c; do
        cmp -s "$WANEM_SRC/$f" "$WORK/wanem/$f" || install -m 0755 "$WANEM_SRC/$f" "$WORK/wanem/$f"
    done
    WANSH="$WORK/wanem/wan.sh"
    "$WANSH" up --delay-ms 25 --loss 0.0001 --rate-mbit 500 >"$LOGS/wanem-up.log" 2>&1 ||
        die "the WAN emulator did not come up: $(tail -n3 "$LOGS/wanem-up.log")"
    fast_open_on "$WAN_NS_A" "$WAN_NS_B"
    CLIENT=(ip netns exec "$WAN_NS_A")
    SERVER=(ip netns exec "$WAN_NS_B")
    SERVER_IP=10.78.0.2
    NS_B="$WAN_NS_B"
    LINK="WAN emulator, wan profile: 50 ms RTT, 0.01 % loss, 500 Mbit/s, TCP Fast Open on,"
    LINK="$LINK $("${CLIENT[@]}" sysctl -n net.ipv4.tcp_congestion_control)"
fi

# --- daemons: one of each for the whole run -----------------------------------------------------
# No token on either side (the rsync module has none): the emulated link is a private pair of
# namespaces, where xferd needs --allow-anonymous to listen off loopback.
ANON=()
[[ "$WAN" == 1 ]] && ANON=(--allow-anonymous)
"${SERVER[@]+"${SERVER[@]}"}" "$XFERD" --listen "$SERVER_IP:0" --root "$WORK/srv" --allow-delete \
    "${ANON[@]+"${ANON[@]}"}" >"$LOGS/xferd.out" 2>"$LOGS/xferd.err" &
XFERD_PID=$!
PIDS+=("$XFERD_PID")
XFERD_ADDR="$(xferd_addr "$LOGS/xferd.out" "$LOGS/xferd.err" "$XFERD_PID")" || exit 1
RSYNC_PORT="$(free_port)"
rsyncd_conf "$WORK/rsyncd.conf" mirror "$WORK/srv"
"${SERVER[@]+"${SERVER[@]}"}" rsync --daemon --no-detach --address="$SERVER_IP" --port="$RSYNC_PORT" \
    --config="$WORK/rsyncd.conf" 2>"$LOGS/rsyncd.err" &
PIDS+=("$!")
wait_listening "$RSYNC_PORT" "$NS_B"

# --- trees --------------------------------------------------------------------------------------
pristine() { # pristine TREE: the unchanged tree, made once per run of this script
    local tree="$1" dir="$WORK/pristine/$1"
    if [[ "$tree" == gen ]]; then
        local params="small $SMALL_FILES $SMALL_DIRS $SMALL_SIZE"
        if [[ "$(cat "$dir.params" 2>/dev/null)" != "$params" ]]; then
            rm -rf "$dir"
            # shellcheck disable=SC2086 # $params is a list of words
            python3 "$BENCH_HOME/tree.py" make "$dir" $params
            echo "$params" >"$dir.params"
        fi
    elif [[ "$(cat "$dir.params" 2>/dev/null)" != "$REAL" ]]; then
        rm -rf "$dir"
        cp -a "$REAL" "$dir"
        echo "$REAL" >"$dir.params"
    fi
}

# mutate DIR: 1 % of the regular files changed, another 1 % deleted, from a fixed seed
mutate() {
    python3 - "$1" <<'EOF'
import os, random, sys
top = sys.argv[1]
files = sorted(
    os.path.relpath(os.path.join(d, f), top)
    for d, _, fs in os.walk(top)
    for f in fs
    if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
)
rng = random.Random(20261204)
picked = rng.sample(files, 2 * max(1, len(files) // 100))
half = len(picked) // 2
for rel in picked[:half]:
    path = os.path.join(top, rel)
    st = os.stat(path)
    with open(path, "ab") as f:
        f.write(rng.randbytes(100))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
for rel in picked[half:]:
    os.remove(os.path.join(top, rel))
print(f"{half} changed, {len(picked) - half} deleted of {len(files)}")
EOF
}

# same TREE COPY: COPY holds exactly the regular files and directories of the source
same() {
    python3 - "$WORK/src/$1" "$2" <<'EOF' || die "the copy $2 differs from its source"
import hashlib, os, stat, sys

def manifest(top):
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            entry = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                entry += (int(st.st_mtime), st.st_size, digest)
            out[os.path.relpath(path, top)] = entry
    return out

src, dst = manifest(sys.argv[1]), manifest(sys.argv[2])
bad = sorted(set(src) ^ set(dst)) + sorted(p for p in src if p in dst and src[p] != dst[p])
for p in bad[:10]:
    print(f"  {p}: source {src.get(p)}, copy {dst.get(p)}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
}

timed() { # timed LOG CMD...: runs CMD; prints "AS_IS DURABLE" seconds (durable: + sync -f)
    local out="$1" t0 t1 t2
    shift
    t0="$(now_ns)"
    timeout -k 5 "$RUN_TIMEOUT" "$@" >"$out" 2>&1 || die "$* failed: $(tail -n5 "$out")"
    t1="$(now_ns)"
    sync -f "$WORK/srv"
    t2="$(now_ns)"
    echo "$(secs_between "$t0" "$t1") $(secs_between "$t0" "$t2")"
}

record() { # record TREE TOOL FILES AS_IS DURABLE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
    log "$(printf '%s %s (%s files): %s s as is, %s s durable' "$@")"
}

# --- runs ---------------------------------------------------------------------------------------
commit="$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
[[ -z "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]] || commit="$commit (+ uncommitted changes)"
for tree in $TREES; do
    pristine "$tree"
    for rep in $(seq "$REPEAT"); do
        rm -rf "${WORK:?}/src/$tree" "$WORK/srv/xfer" "$WORK/srv/rsync"
        mkdir -p "$WORK/srv/xfer" "$WORK/srv/rsync"
        cp -a "$WORK/pristine/$tree" "$WORK/src/$tree"
        cp -a "$WORK/pristine/$tree" "$WORK/srv/xfer/$tree"
        cp -a "$WORK/pristine/$tree" "$WORK/srv/rsync/$tree"
        log "$tree, round $rep: $(mutate "$WORK/src/$tree")"
        files="$(find "$WORK/src/$tree" -type f | wc -l)"
        sync
        # Alternate who goes first, so neither always meets the other's dirty pages.
        for tool in $( ((rep % 2)) && echo "xfer rsync" || echo "rsync xfer"); do
            if [[ "$tool" == xfer ]]; then
                # shellcheck disable=SC2046,SC2086 # XFER_ARGS is a list of words
                record "$tree" "xfer send -r --delete" "$files" $(timed "$LOGS/xfer.log" \
                    "${CLIENT[@]+"${CLIENT[@]}"}" "$XFER" send -r -q --delete ${XFER_ARGS:-} \
                    "$WORK/src/$tree" "$XFERD_ADDR" --as "xfer/$tree")
                same "$tree" "$WORK/srv/xfer/$tree"
            else
                # shellcheck disable=SC2046
                record "$tree" "rsync -aH --delete (daemon)" "$files" $(timed "$LOGS/rsync.log" \
                    "${CLIENT[@]+"${CLIENT[@]}"}" rsync -aH --delete "$WORK/src/$tree/" \
                    "rsync://$SERVER_IP:$RSYNC_PORT/mirror/rsync/$tree/")
                same "$tree" "$WORK/srv/rsync/$tree"
            fi
        done
    done
done

echo "# xfer mirror benchmark ($LINK)"
echo
echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S'); commit: $commit"
echo "- machine: $(hostname), $(nproc) CPUs, $(uname -srm); disk: $WORK ($FSTYPE)"
echo "- peers: $(rsync --version | head -n1 | awk '{print "rsync", $3}')"
echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (anything else running skews the numbers)"
echo "- trees: gen = $SMALL_FILES files of $SMALL_SIZE bytes; real = $REAL; repeats: $REPEAT (fastest shown)"
echo
python3 - "$RESULTS" <<'EOF'
import sys
from collections import OrderedDict

NEED = 2.0
RSYNC = "rsync -aH --delete (daemon)"
runs = OrderedDict()
for line in open(sys.argv[1]):
    tree, tool, files, as_is, durable = line.rstrip("\n").split("\t")
    r = runs.setdefault((tree, tool), {"files": int(files), "as_is": [], "durable": []})
    r["as_is"].append(float(as_is))
    r["durable"].append(float(durable))
print("| tree | tool | files | as is: s | files/s | × rsync | durable: s | files/s | × rsync |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
met = []
for (tree, tool), r in runs.items():
    base = runs.get((tree, RSYNC))
    cells = [tree, tool, str(r["files"])]
    for mode in ("as_is", "durable"):
        s = min(r[mode])
        cells += [f"{s:.2f}", f"{r['files'] / s:,.0f}"]
        cells.append(f"{min(base[mode]) / s:.2f}" if base else "n/a")
    print("| " + " | ".join(cells) + " |")
print()
for (tree, tool), r in runs.items():
    base = runs.get((tree, RSYNC))
    if tool == RSYNC or not base:
        continue
    for mode, label in (("as_is", "as is"), ("durable", "durable")):
        ratio = min(base[mode]) / min(r[mode])
        met.append(ratio >= NEED)
        verdict = "PASS" if ratio >= NEED else "FAIL"
        print(f"- {verdict}: {tree}, {label}: {tool} is {ratio:.2f} x rsync's files/s (target >= {NEED} x)")
print()
print(f"{sum(met)} of {len(met)} targets met")
EOF
echo
echo "Raw results: $RESULTS; logs: $LOGS"
