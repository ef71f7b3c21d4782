#!/usr/bin/env bash
# WAN benchmark: xfer (-c 1/4/8/16 and without -c, upload and download) through the userspace WAN emulator
# (shared/wanem: netns wa = client 10.78.0.1, netns wb = server 10.78.0.2) against iperf3
# (-P 1/8/16; -P 16 is the ceiling), a raw socat stream, an rsync daemon, scp (sshd in wb),
# globus-url-copy -p 8/16 against a GridFTP server and aria2c -x 8 from nginx; then a tree of
# 10,000 small files through the same links with xfer -r, rsync, a tar pipe and scp -r. Not a
# test: run it by hand, as root (it makes namespaces and changes one sysctl, restored at exit).
#
#   bench/wan.sh                                  # everything, ~1 h 5 min on the 2-core machine
#   WAN_PROFILES=lossy WAN_CCS=cubic bench/wan.sh # one table
#   WAN_TOOLS="iperf3 xfer" CONNS=16 WAN_CAP=30 bench/wan.sh
#   WAN_WORKLOADS=tree WAN_TOOLS="xfer rsync socat" CONNS="8 16 auto" bench/wan.sh # trees only
#
# Profiles (wanem, offload mode; --loss applies to both directions, so to ACKs too):
#   lan     --delay-ms 0.1 (0.2 ms RTT), no loss, 1000 Mbit/s
#   wan     --delay-ms 25 (50 ms RTT), 0.01 % loss, 500 Mbit/s
#   lossy   --delay-ms 25 (50 ms RTT), 0.5 % loss, 500 Mbit/s
#   loss1   --delay-ms 25 (50 ms RTT), 0.1 % loss, 500 Mbit/s      (issue 13's profiles: wan is
#   loss10  --delay-ms 25 (50 ms RTT), 1 % loss, 500 Mbit/s         its 0.01 %, lan its LAN)
#   far     --delay-ms 75 (150 ms RTT), 0.1 % loss, 1000 Mbit/s
# each with cubic and with bbr as the default congestion control in both namespaces.
#
# Size and duration (why every run is capped, not sized per profile): one source file of WAN_SIZE
# (default 1G) is sent up (xfer send, wa -> wb) and down (xfer recv, wb -> wa) by every tool, and
# every transfer is stopped after WAN_CAP seconds (default 20). A run that completes within the cap
# is reported as file size / wall time (including connection set-up and the final fsync). A run
# stopped at the cap is reported as the TCP payload that crossed the emulated link in the data
# direction (wanem counters) / wall time. So every loss-limited run lasts the full 20 s, as the
# wanem README asks (slow start overstates short loss-limited runs); a run can only finish sooner by
# moving 1 GiB in < 20 s, i.e. > 54 MB/s = 86 % of the 500 Mbit/s link, where the link (not slow
# start) bounds it. On lan complete runs take 10-18 s here. With 23 runs per profile x cc the full
# matrix stays under an hour; one cubic stream on lossy (rsync, scp, socat) moves 0.5-0.6 MB/s, so a
# sized 1 GiB transfer would take half an hour on its own. iperf3 runs with -t WAN_CAP.
#
# Trees (WAN_WORKLOADS tree), after the file runs of each profile x cc: the trees of bench/bulk.sh
# (made by bench/tree.py, same content every time) are copied up (wa -> wb) and down by xfer -r
# (send -r / recv -r, each CONNS value), rsync -a to the rsync daemon, `tar c | socat` into
# `socat | tar x` (one stream; WAN_TOOLS "socat") and scp -r, each into a new directory, each
# capped at WAN_CAP like the file runs. A complete run is reported as the tree's files and bytes /
# wall time (client start to exit, plus a `sync -f` of the copy for every tool but xfer, which
# flushes itself) after its copy matched the source (file count, and one sha256 over the sorted
# paths, sizes and contents); a capped run as the files (and bytes) found whole in the copy after
# the stop / wall time. Copies stay until the end of the profile x cc (removing 10,000 files slows
# file creation for a minute after on this disk; see DELETED_AT below). scp -r over a 50 ms RTT
# moves ~4 files/s, so it is always capped there.
#
# Environment:
#   WAN_SIZE        file size, bytes or K/M/G (powers of 1024); default 1G
#   WAN_CAP         seconds before each transfer is stopped (and iperf3 -t); default 20
#   WAN_PROFILES    default "lan wan lossy"
#   WAN_CCS         default "cubic bbr"
#   WAN_TOOLS       any of "iperf3 xfer socat rsync scp gridftp aria2"; default all
#   WAN_DIRS        "upload download" (default) or one of them
#   WAN_WORKLOADS   "file tree" (default) or one of them: file = the WAN_SIZE file by every tool;
#                   tree = the WAN_TREES trees by the xfer, rsync, socat (tar pipe) and scp of
#                   WAN_TOOLS
#   WAN_TREES       any of "small mixed"; default "small" (10,000 files of 4 KiB in 20
#                   directories); mixed: 2,000 files of 4-64 KiB in 20 directories + three of 64 MiB
#   CONNS           xfer connection counts, `auto` for xfer without -c (its adaptive pool; the
#                   report compares it with the best fixed -c); default "1 4 8 16 auto"
#   IPERF_STREAMS   iperf3 -P values for upload; default "1 8 16" (download: -P 16 only, the ceiling)
#   WAN_TOOLS iperf3-same: after each `xfer auto` run, iperf3 with the connections and congestion
#                   control that run reported (-P N -C CC), moving the same bytes (-n WAN_SIZE)
#   WAN_PEER_CAP    seconds before a peer's transfer (socat, rsync, scp, GridFTP, aria2c) is
#                   stopped; default WAN_CAP (a capped run still gives its rate)
#   ARIA2_CONNS     aria2c -x/-s value; default 8
#   GRIDFTP_STREAMS globus-url-copy -p values; default "8 16"
#   REPEAT          runs per measurement, the fastest is reported; default 1
#   WAN_SOCKBUF_MB  wan.sh --sockbuf-mb (tcp_rmem/tcp_wmem max inside wa and wb); default: inherited
#                   from the root namespace (here rmem 32 MiB, wmem 4 MiB)
#   WAN_SEED        wanem loss seed; default 1
#   XFER_ARGS       extra xfer flags (e.g. "--chunk-size 8M"); XFERD_ARGS extra xferd flags
#                   (e.g. "--window 8")
#   WAN_BUILD       tree (default): cargo build --release of the work tree, as it is; head: build
#                   the committed HEAD (git archive) in WAN_DIR/build, for a defined commit when the
#                   work tree is mid-edit. Either way the two binaries are copied into WAN_DIR/bin
#                   for the run, so a rebuild by someone else cannot swap them half way.
#   XFER_BIN_DIR    use xfer/xferd from this directory and skip cargo build
#   WAN_NICE        niceness of the whole benchmark (emulator, servers, clients); default -10, so
#                   other work on this 2-core machine (builds, tests) disturbs it less; 0 = as is
#   WAN_DIR         work dir; default bench/out/wan (a real disk, not tmpfs)
#   KEEP=1          keep the source file and trees at the end
#
# Measurements, per run (a fresh server for every run, so its CPU and memory belong to that run):
#   CPU      user+sys of everything the client, and everything the server, started: one cgroup v1
#            cpuacct group per side (children count even when a client stopped at the cap left
#            them unreaped); without cpuacct, /usr/bin/time and /proc/PID/stat instead.
#   RSS      client: /usr/bin/time %M (largest single process, e.g. ssh under scp); server: xferd
#            VmHWM; iperf3 -s -1, rsync --daemon, sshd -D, globus-gridftp-server -1 and nginx
#            (master_process off) under /usr/bin/time; the tar pipe: its largest process on each
#            side (client: /usr/bin/time of the pipeline; server: the same around its pipeline).
#   link     wanem counters: payload bytes, loss drops and queue (tail) drops in the data direction.
#   sender   `ss -ti` in the sending namespace once a second: busy / rwnd-limited / sndbuf-limited
#            time, cwnd, rtt and retransmits of the data connections (see bench/wan_report.py).
#   machine  share of both cores busy during the run (/proc/stat); wanem itself costs ~1/2 core.
# Peers: iperf3 (no -w: autotuned buffers), socat -b 1M, rsync -a to an rsync daemon, scp with
# OpenSSH defaults (SFTP protocol, default cipher) against sshd -D on a high port with key auth,
# globus-url-copy -p N against globus-gridftp-server -aa (anonymous, ftp://, MODE E), aria2c -x 8 -s 8
# against nginx; tar c | socat -b 1M -> socat -b 1M | tar x for trees. Everything the script
# starts is ended by PID (the tar pipe's server side by its process group, a session of its own
# made by setsid); the emulator by `wan.sh down`.
# Side effects, undone at exit: net.ipv4.tcp_allowed_congestion_control gains cubic and bbr;
# /etc/netns/{wa,wb}/hosts name 10.78.0.1/2 (the GridFTP server resolves its own address and the
# namespaces have no DNS); cpuacct cgroups wan-bench-PID. Left: /run/sshd (sshd's privsep dir),
# the installed packages, WAN_DIR/build (the HEAD build, reused by the next WAN_BUILD=head) and
# WAN_DIR/deleted-at (when the tree copies were removed, for the next run's DELETED_AT).
# Timing: file runs: lan ~9 min per cc, wan and lossy ~10 min per cc (47 min in all on
# 2026-11-22). Trees (small, default tools and CONNS): an estimate of 2-4 min more per profile x cc
# (lossy cubic longest: every single stream is capped there), from a reduced run on 2026-12-02:
# xfer -c 8, rsync, tar and scp both ways on wan/cubic with WAN_CAP=10 took 52 s; removing a
# profile x cc's copies (70,000 files) and flushing took up to 77 s while other work wrote to
# the same disk.
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
BENCH_NAME=wan-bench
BENCH_FAIL=fail # a helper failing inside a run ends that run (see fail below)
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

SIZE_SPEC="${WAN_SIZE:-1G}"
CAP="${WAN_CAP:-20}"
PROFILES="${WAN_PROFILES:-lan wan lossy}"
CCS="${WAN_CCS:-cubic bbr}"
TOOLS="${WAN_TOOLS:-iperf3 xfer socat rsync scp gridftp aria2}"
PEER_CAP="${WAN_PEER_CAP:-${WAN_CAP:-20}}"
ARIA2_CONNS="${ARIA2_CONNS:-8}"
DIRS="${WAN_DIRS:-upload download}"
CONNS="${CONNS:-1 4 8 16 auto}"
WORKLOADS="${WAN_WORKLOADS:-file tree}"
TREES="${WAN_TREES:-small}"
IPERF_STREAMS="${IPERF_STREAMS:-1 8 16}"
GRIDFTP_STREAMS="${GRIDFTP_STREAMS:-8 16}"
REPEAT="${REPEAT:-1}"
SOCKBUF_MB="${WAN_SOCKBUF_MB:-}"
SEED="${WAN_SEED:-1}"
WORK="${WAN_DIR:-$REPO/bench/out/wan}"
KEEP="${KEEP:-0}"
SOCAT_BLOCK=1048576
# The trees of bench/bulk.sh at its defaults, as bench/tree.py makes them (name and parameters):
# small: 10,000 files of 4 KiB in 20 directories; mixed: 2,000 files of 4-64 KiB in 20 directories
# plus three of 64 MiB.
declare -A TREE_PARAMS=([small]="small 10000 20 4096" [mixed]="mixed 2000 20 4096 65536 3 67108864")
read -r -a XFER_EXTRA <<<"${XFER_ARGS:-}"
read -r -a XFERD_EXTRA <<<"${XFERD_ARGS:-}"

WANEM_SRC=/work/shared/wanem
[[ -d "$WANEM_SRC" ]] || WANEM_SRC="$REPO/../shared/wanem"
export WAN_NS_A="${WAN_NS_A:-wa}" WAN_NS_B="${WAN_NS_B:-wb}" WANEM_RUN="${WANEM_RUN:-/run/wanem}"
NS_A="$WAN_NS_A"
NS_B="$WAN_NS_B"
IP_A=10.78.0.1
IP_B=10.78.0.2

SIZE="$(parse_size "$SIZE_SPEC")"
((SIZE > 0)) || die "WAN_SIZE must be > 0"
[[ "$CAP" =~ ^[0-9]+$ ]] && ((CAP >= 5)) || die "WAN_CAP must be a whole number of seconds >= 5"
[[ "$PEER_CAP" =~ ^[0-9]+$ ]] && ((PEER_CAP >= 5)) || die "WAN_PEER_CAP must be a whole number of seconds >= 5"
[[ "$ARIA2_CONNS" =~ ^[0-9]+$ ]] && ((ARIA2_CONNS >= 1)) || die "ARIA2_CONNS must be a whole number >= 1"
[[ $EUID == 0 ]] || die "run as root (network namespaces, sysctl)"
NICE="${WAN_NICE:--10}"
[[ "$NICE" =~ ^-?[0-9]+$ ]] || die "WAN_NICE must be an integer"
# Inherited by everything started from here on, the emulator included.
((NICE == 0)) || renice -n "$NICE" -p $$ >/dev/null || die "renice $NICE failed"

has_workload() { [[ " $WORKLOADS " == *" $1 "* ]]; }
has_dir() { [[ " $DIRS " == *" $1 "* ]]; }

profile_args() {
    case "$1" in
        lan) echo "--delay-ms 0.1 --rate-mbit 1000" ;;
        wan) echo "--delay-ms 25 --loss 0.0001 --rate-mbit 500" ;;
        lossy) echo "--delay-ms 25 --loss 0.005 --rate-mbit 500" ;;
        loss1) echo "--delay-ms 25 --loss 0.001 --rate-mbit 500" ;;
        loss10) echo "--delay-ms 25 --loss 0.01 --rate-mbit 500" ;;
        far) echo "--delay-ms 75 --loss 0.001 --rate-mbit 1000" ;;
        *) die "unknown profile $1 (lan, wan, lossy, loss1, loss10, far)" ;;
    esac
}
profile_desc() {
    case "$1" in
        lan) echo "0.2 ms RTT, no loss, 1000 Mbit/s" ;;
        wan) echo "50 ms RTT, 0.01 % loss each way, 500 Mbit/s" ;;
        lossy) echo "50 ms RTT, 0.5 % loss each way, 500 Mbit/s" ;;
        loss1) echo "50 ms RTT, 0.1 % loss each way, 500 Mbit/s" ;;
        loss10) echo "50 ms RTT, 1 % loss each way, 500 Mbit/s" ;;
        far) echo "150 ms RTT, 0.1 % loss each way, 1000 Mbit/s" ;;
    esac
}
for p in $PROFILES; do profile_args "$p" >/dev/null; done
for n in $CONNS; do [[ "$n" =~ ^[0-9]+$ || "$n" == auto ]] || die "CONNS: $n is neither a number nor auto"; done
for w in $WORKLOADS; do [[ "$w" == file || "$w" == tree ]] || die "WAN_WORKLOADS: $w is neither file nor tree"; done
for t in $TREES; do [[ -n "${TREE_PARAMS[$t]:-}" ]] || die "WAN_TREES: unknown tree $t (small, mixed)"; done
[[ -n "${WORKLOADS// /}" ]] || die "WAN_WORKLOADS is empty"

# --- peers: install what is missing; a peer that cannot be had becomes an n/a row ---------------
need base /usr/bin/time time
need base ip iproute2
need base ss iproute2
need base gcc gcc
has_workload tree && need base tar tar
[[ -z "${NA[base]:-}" ]] || die "${NA[base]}"
if has_tool iperf3 || has_tool iperf3-same; then need iperf3 iperf3 iperf3; fi
has_tool socat && need socat socat socat
has_tool rsync && need rsync rsync rsync
if has_tool scp; then
    need scp scp openssh-client
    need scp ssh-keygen openssh-client
    need scp /usr/sbin/sshd openssh-server
fi
if has_tool gridftp; then
    need gridftp globus-url-copy globus-gass-copy-progs
    need gridftp globus-gridftp-server globus-gridftp-server-progs
fi
if has_tool aria2; then
    need aria2 aria2c aria2
    need aria2 nginx nginx-light nginx
fi

# --- work dir -----------------------------------------------------------------------------------
WORK="$(mkdir -p "$WORK" && cd "$WORK" && pwd)"
real_disk "$WORK"
tree_disk_bytes() { # tree_disk_bytes TREE: more than one copy of TREE takes on disk
    local p=()
    read -r -a p <<<"${TREE_PARAMS[$1]}"
    if [[ "${p[0]}" == small ]]; then
        echo $((p[1] * (p[3] + 8192)))
    else
        echo $((p[1] * (p[4] + 8192) + p[5] * p[6]))
    fi
}
# Disk: the source file and two copies of it; per tree, the source and every copy of one profile x
# cc (they are removed after it).
need_bytes=0
has_workload file && need_bytes=$((3 * SIZE))
if has_workload tree; then
    for t in $TREES; do
        need_bytes=$((need_bytes + (REPEAT * $(wc -w <<<"$DIRS") * ($(wc -w <<<"$CONNS") + 3) + 1) * $(tree_disk_bytes "$t")))
    done
fi
require_free "$WORK" "$need_bytes"
LOGS="$WORK/logs"
SRV="$WORK/srv"
DST="$WORK/dst"
# On ext4 without a journal (as here) the kernel avoids reusing an inode for 60 s after it was
# freed, and each file created meanwhile scans past every such inode (see "Destinations" in
# bench/bulk.sh): a tree run within a minute of removing 10,000 files creates its files several
# times slower. DELETED_AT is when this script (or its last run, at exit) last removed many files;
# settle_deletes waits out the minute before a tree run. The minute holds only while the freed
# inodes' table block is clean: while it is dirty the kernel avoids them for 360 s
# (RECENTCY_DIRTY). Every removal here is followed by `sync -f` before DELETED_AT is taken, but a
# tree run that creates files in the same block dirties it again: 61 s is a lower bound.
DELETED_AT=0
deleted_now() { # after removing many files: flush them out, then take the time
    sync -f "$WORK"
    DELETED_AT="$(date +%s)"
}
deleted_prev="$(cat "$WORK/deleted-at" 2>/dev/null || true)"
[[ "$deleted_prev" =~ ^[0-9]+$ ]] && DELETED_AT="$deleted_prev"
leftovers="$(ls -A "$SRV" "$DST" 2>/dev/null || true)"
rm -rf "$SRV" "$DST" "$LOGS" "$WORK/verified"
[[ -z "$leftovers" ]] || deleted_now
mkdir -p "$WORK/src" "$SRV" "$DST" "$LOGS" "$WORK/verified" "$WORK/conf"
# The GridFTP server serves anonymous sessions as `nobody`: it must read the source and write into
# the server root.
chmod 1777 "$SRV" "$DST"
chmod 755 "$WORK" "$WORK/src"
RESULTS="$WORK/results.tsv"
COMBOS="$WORK/combos.tsv"
TREE_RESULTS="$WORK/trees.tsv"
TREE_SETS="$WORK/tree_sets.tsv"
: >"$RESULTS"
: >"$COMBOS"
: >"$TREE_RESULTS"
: >"$TREE_SETS"
RUN_PIDS="$WORK/run.pids"
: >"$RUN_PIDS"

# --- cleanup: PIDs of the current run, the emulator, the sysctl ---------------------------------
WAN_IS_UP=0
ORIG_ALLOWED_CC=""
CG=""
MADE_NETNS_ETC=()
kill_tracked() { # TERM, then KILL after 5 s, every PID the current run recorded
    [[ -s "$RUN_PIDS" ]] || return 0
    local pids=()
    mapfile -t pids <"$RUN_PIDS"
    end_pids "${pids[@]}"
    : >"$RUN_PIDS"
}
track() { echo "$1" >>"$RUN_PIDS"; }
wan_down() {
    if ((WAN_IS_UP)); then
        "$WANSH" down >"$LOGS/wan-down.log" 2>&1 || log "wan.sh down failed: $(cat "$LOGS/wan-down.log")"
        WAN_IS_UP=0
    fi
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    kill_tracked
    wan_down
    if [[ -n "$ORIG_ALLOWED_CC" ]]; then
        sysctl -qw net.ipv4.tcp_allowed_congestion_control="$ORIG_ALLOWED_CC" ||
            log "could not restore net.ipv4.tcp_allowed_congestion_control=$ORIG_ALLOWED_CC"
    fi
    if [[ -n "$CG" ]]; then
        rmdir "$CG/client" "$CG/server" "$CG" 2>/dev/null || log "could not remove cgroup $CG (a process left in it?)"
    fi
    local ns
    for ns in "${MADE_NETNS_ETC[@]+"${MADE_NETNS_ETC[@]}"}"; do rm -rf "/etc/netns/$ns"; done
    rmdir /etc/netns 2>/dev/null || true
    rm -rf "$SRV" "$DST"
    [[ "$KEEP" == 1 ]] || rm -rf "$WORK/src"
    if has_workload tree; then
        sync -f "$WORK" || true
        date +%s >"$WORK/deleted-at"
    fi
    exit "$rc"
}
on_exit cleanup

# --- emulator: a private copy of shared/wanem (that directory is read-only; wan.sh builds there) --
mkdir -p "$WORK/wanem"
for f in wan.sh wanem.c; do
    [[ -f "$WANEM_SRC/$f" ]] || die "no $WANEM_SRC/$f"
    cmp -s "$WANEM_SRC/$f" "$WORK/wanem/$f" || install -m 0755 "$WANEM_SRC/$f" "$WORK/wanem/$f"
done
WANSH="$WORK/wanem/wan.sh"
"$WANSH" build >&2 || die "building wanem failed"
for ns in "$NS_A" "$NS_B"; do
    [[ -e "/run/netns/$ns" ]] && die "netns $ns already exists (someone else's emulator?); not touching it"
done

# Name resolution inside the namespaces: they have no route to a DNS server, and the GridFTP server
# resolves its own listening address at start ("Temporary failure in name resolution"). `ip netns
# exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts: give both sides a hosts file naming
# 10.78.0.1/2. Removed at exit (only what this script made).
for ns in "$NS_A" "$NS_B"; do
    if [[ ! -e "/etc/netns/$ns" ]]; then
        mkdir -p "/etc/netns/$ns"
        MADE_NETNS_ETC+=("$ns")
        { cat /etc/hosts; echo "$IP_A wan-a"; echo "$IP_B wan-b"; } >"/etc/netns/$ns/hosts"
    fi
done

# CPU accounting: a cpuacct cgroup for the client and one for the server, so CPU of forked
# children counts whether or not anyone reaped them (a client stopped at the cap often is not).
# Without cgroup v1 cpuacct, /usr/bin/time's numbers are used instead.
CG_ROOT=/sys/fs/cgroup/cpuacct
if [[ -w "$CG_ROOT/cgroup.procs" ]] && mkdir -p "$CG_ROOT/wan-bench-$$/client" "$CG_ROOT/wan-bench-$$/server" 2>/dev/null; then
    CG="$CG_ROOT/wan-bench-$$"
fi
# CGC / CGS: a prefix that moves the command into the group, then execs it (same PID). It goes
# before `ip netns exec`, which remounts /sys and so hides the cgroup file system.
CGC=()
CGS=()
if [[ -n "$CG" ]]; then
    # shellcheck disable=SC2016
    CGC=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG/client")
    # shellcheck disable=SC2016
    CGS=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG/server")
fi
cg_reset() { [[ -z "$CG" ]] || { echo 0 >"$CG/client/cpuacct.usage"; echo 0 >"$CG/server/cpuacct.usage"; }; }
cg_cpu() { awk '{printf "%.2f", $1 / 1e9}' "$CG/$1/cpuacct.usage"; }
# client_cpu KIND / server_cpu FALLBACK: seconds of CPU of this run's client / server
client_cpu() { if [[ -n "$CG" ]]; then cg_cpu client; else time_cpu "$LOGS/$1.time"; fi; }
server_cpu() { if [[ -n "$CG" ]]; then cg_cpu server; else echo "$1"; fi; }

# Congestion control: a namespace may only pick what the root namespace allows.
ORIG_ALLOWED_CC="$(sysctl -n net.ipv4.tcp_allowed_congestion_control)"
want_cc="$ORIG_ALLOWED_CC"
for cc in reno cubic bbr $CCS; do [[ " $want_cc " == *" $cc "* ]] || want_cc="$want_cc $cc"; done
sysctl -qw net.ipv4.tcp_allowed_congestion_control="$want_cc" || die "cannot allow $want_cc"

# --- build --------------------------------------------------------------------------------------
BUILD_MODE="${WAN_BUILD:-tree}"
if [[ -n "${XFER_BIN_DIR:-}" ]]; then
    XFER="$XFER_BIN_DIR/xfer"
    XFERD="$XFER_BIN_DIR/xferd"
    BUILD_NOTE="prebuilt from $XFER_BIN_DIR (not rebuilt)"
elif has_tool xfer && [[ "$BUILD_MODE" == head ]]; then
    log "building the committed HEAD in $WORK/build"
    rm -rf "$WORK/build/src"
    mkdir -p "$WORK/build/src"
    git -C "$REPO" archive HEAD | tar -x -C "$WORK/build/src"
    (cd "$WORK/build/src" && CARGO_TARGET_DIR="$WORK/build/target" timeout 3600 \
        nice -n $((NICE < 0 ? -NICE : 0)) cargo build --release --locked -p xfer -p xferd) >"$LOGS/build.log" 2>&1 ||
        die "cargo build of HEAD failed (log: $LOGS/build.log)"
    XFER="$WORK/build/target/release/xfer"
    XFERD="$WORK/build/target/release/xferd"
    BUILD_NOTE="cargo build --release of the committed HEAD only (work tree changes not included)"
elif has_tool xfer; then
    [[ "$BUILD_MODE" == tree ]] || die "WAN_BUILD is tree or head, not $BUILD_MODE"
    log "cargo build --release"
    built=0
    for attempt in 1 2 3; do
        if timeout 1800 nice -n $((NICE < 0 ? -NICE : 0)) cargo build --release >"$LOGS/build.log" 2>&1; then
            built=1
            break
        fi
        log "cargo build --release failed (attempt $attempt; other work may be mid-edit): $(grep -m1 '^error' "$LOGS/build.log" || tail -n1 "$LOGS/build.log")"
        ((attempt < 3)) && sleep 60
    done
    ((built)) || die "cargo build --release failed 3 times (log: $LOGS/build.log); WAN_BUILD=head builds the last commit, XFER_BIN_DIR=target/release uses the binaries there"
    XFER="$REPO/target/release/xfer"
    XFERD="$REPO/target/release/xferd"
    BUILD_NOTE="cargo build --release of the work tree"
fi
if has_tool xfer; then
    [[ -x "$XFER" && -x "$XFERD" ]] || die "no xfer/xferd binaries at $XFER, $XFERD"
    BUILD_NOTE="$BUILD_NOTE; binaries of $(date -u -r "$XFERD" '+%Y-%m-%d %H:%M:%S') UTC"
    mkdir -p "$WORK/bin"
    install -m 0755 "$XFER" "$WORK/bin/xfer"
    install -m 0755 "$XFERD" "$WORK/bin/xferd"
    XFER="$WORK/bin/xfer"
    XFERD="$WORK/bin/xferd"
fi

# --- header -------------------------------------------------------------------------------------
commit="$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [[ "$BUILD_MODE" != head || -n "${XFER_BIN_DIR:-}" ]] &&
    ! git -C "$REPO" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null; then
    commit="$commit (+ uncommitted changes under crates/ or Cargo.*)"
fi
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
{
    echo "# xfer WAN benchmark (bench/wan.sh, through shared/wanem)"
    echo
    echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "- commit: $commit${BUILD_NOTE:+; $BUILD_NOTE}"
    echo "- machine: nproc $(nproc); CPU: ${cpu_model:-unknown}; kernel: $(uname -srm)"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the numbers; the benchmark runs at nice $NICE)"
    echo "- workloads: $WORKLOADS; each transfer capped at $CAP s; repeats: $REPEAT (fastest shown); work dir $WORK ($FSTYPE)"
    if has_workload file; then echo "- file: $SIZE bytes ($SIZE_SPEC)"; fi
    if has_workload tree; then
        echo "- trees (bench/tree.py make DIR ...): $(for t in $TREES; do printf '%s; ' "${TREE_PARAMS[$t]}"; done)xfer connections: $CONNS"
    fi
    echo "- socket buffers in wa/wb: $(if [[ -n "$SOCKBUF_MB" ]]; then echo "tcp_rmem/tcp_wmem max ${SOCKBUF_MB} MiB (--sockbuf-mb)"; else echo "inherited: tcp_rmem $(sysctl -n net.ipv4.tcp_rmem | tr '\t' ' '), tcp_wmem $(sysctl -n net.ipv4.tcp_wmem | tr '\t' ' ')"; fi)"
    echo "- xfer: default chunk 4M, xferd --window 2 unless set here: XFER_ARGS='${XFER_ARGS:-}' XFERD_ARGS='${XFERD_ARGS:-}'; token auth (--token-file) on both sides"
    echo "- peers: $(for t in iperf3 socat rsync scp gridftp aria2; do has_tool "$t" && printf '%s ' "$t${NA[$t]:+ (n/a)}"; done)"
    echo
} | tee "$WORK/report.md"

# --- helpers ------------------------------------------------------------------------------------
cpu_sample() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6; exit}' /proc/stat; }
cpu_busy_pct() { # cpu_busy_pct "T0 I0" "T1 I1"
    python3 -c "import sys; t0, i0 = map(int, sys.argv[1].split()); t1, i1 = map(int, sys.argv[2].split()); print(f'{100 * (1 - (i1 - i0) / max(t1 - t0, 1)):.0f}')" "$1" "$2"
}
PORT=40000
next_port() { PORT=$((PORT + 1)); }
wait_gone() { # wait_gone PID SECS: true once PID has exited
    for _ in $(seq $(($2 * 10))); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$1" 2>/dev/null
}
wait_children_gone() { # wait_children_gone PID SECS, then KILL what is left
    local kids
    for _ in $(seq $(($2 * 10))); do
        kids="$(ps -o pid= --ppid "$1" | tr -d ' ')"
        [[ -z "$kids" ]] && return 0
        sleep 0.1
    done
    for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    sleep 0.2
}
stop_server() { # stop_server WRAPPER_PID SERVER_PID: TERM the server, wait for its /usr/bin/time
    kill -TERM "$2" 2>/dev/null || true
    wait_gone "$1" 10 || {
        kill -KILL "$2" 2>/dev/null || true
        wait_gone "$1" 5 || true
    }
    wait "$1" 2>/dev/null || true
}
fail() { # inside a run: say why, end the run
    echo "$*" >"$WORK/run.reason"
    log "  failed: $*"
    exit 1
}
wanem_stats() { "$WANSH" stats 2>/dev/null || true; }

# verify KIND FILE: sha256 against the source, once per kind over the whole benchmark
verify() {
    local kind="$1" file="$2" sum
    [[ -e "$WORK/verified/$kind" ]] && return 0
    [[ -f "$file" ]] || fail "$kind: $file was not created"
    sum="$(sha256sum "$file" | awk '{print $1}')"
    [[ "$sum" == "$SRC_SHA" ]] || fail "$kind: CHECKSUM MISMATCH: $file has sha256 $sum, source $SRC_SHA"
    touch "$WORK/verified/$kind"
    log "  $kind: sha256 ok"
}

# record STATUS WALL BYTES CCPU CRSS SCPU SRSS NOTE (profile, cc, tool, dir and link/sender numbers
# come from the run's globals). WORKLOAD=tree writes a row of trees.tsv instead, with TREE, T_CONNS
# and R_FILES (regular files that arrived) and R_SYNC (seconds of `sync -f`, part of WALL).
record() {
    local status="$1" wall="$2" bytes="$3" ccpu="$4" crss="$5" scpu="$6" srss="$7" note="${8:-${R_NOTE:-}}" rate
    local what="$TOOL $DIR"
    if [[ "${WORKLOAD:-file}" == tree ]]; then
        what="$TREE tree: $TOOL -c $T_CONNS $DIR"
        printf '%s\t' "$PROFILE" "$CC" "$TREE" "$TOOL" "$T_CONNS" "$DIR" "$status" "$wall" "${R_FILES:-}" \
            "$bytes" "$ccpu" "$crss" "$scpu" "$srss" "${R_PAYLOAD:-}" "${R_LOSS:-}" "${R_QD:-}" \
            "${R_BUSY:-}" "${R_WCPU:-}" "${R_SYNC:-}" >>"$TREE_RESULTS"
        printf '%s\n' "$note" >>"$TREE_RESULTS"
    else
        printf '%s\t' "$PROFILE" "$CC" "$TOOL" "$DIR" "$status" "$wall" "$bytes" "$ccpu" "$crss" "$scpu" \
            "$srss" "${R_PAYLOAD:-}" "${R_LOSS:-}" "${R_QD:-}" "${R_BUSY:-}" "${R_NCONN:-}" "${R_SBUSY:-}" \
            "${R_RWND:-}" "${R_SNDBUF:-}" "${R_CWND:-}" "${R_RTT:-}" "${R_RETRANS:-}" "${R_WCPU:-}" >>"$RESULTS"
        printf '%s\n' "$note" >>"$RESULTS"
    fi
    if [[ "$status" == complete || "$status" == capped || "$status" == timed ]]; then
        rate="$(python3 -c "import sys; print(f'{int(sys.argv[1]) / float(sys.argv[2]) / 1e6:.1f}')" "$bytes" "$wall") MB/s"
        if [[ "${WORKLOAD:-file}" == tree ]]; then
            rate="$(python3 -c "import sys; print(f'{int(sys.argv[1]) / float(sys.argv[2]):.0f}')" "$R_FILES" "$wall") files/s, $rate"
        fi
        log "  $what: $rate ($status, ${wall} s; link drops loss/queue ${R_LOSS:-?}/${R_QD:-?}; machine CPU ${R_BUSY:-?} %)"
    else
        log "  $what: $status ${note}"
    fi
}

# client_run NS KIND TIMEOUT CMD...: run a client under /usr/bin/time and timeout in NS, with the
# link counters, machine CPU and the sender's socket states taken around it. Sets RC, T0 and the
# R_* globals; the caller decides the status and the wall time.
client_run() {
    local ns="$1" kind="$2" tmo="$3" sender_ns wdir c0 c1 sampler
    shift 3
    if [[ "$DIR" == upload ]]; then
        sender_ns="$NS_A"
        wdir=ab
    else
        sender_ns="$NS_B"
        wdir=ba
    fi
    RUN_CAP="$tmo"
    wanem_stats >"$LOGS/$kind.wanem0"
    (
        while :; do
            echo "@@ $(date +%s.%N)"
            ip netns exec "$sender_ns" ss -tinH state established 2>/dev/null || true
            sleep 1
        done
    ) >"$LOGS/$kind.ss" 2>/dev/null &
    sampler=$!
    track "$sampler"
    c0="$(cpu_sample)"
    T0="$(now_ns)"
    set +e
    "${CGC[@]+"${CGC[@]}"}" ip netns exec "$ns" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.time" \
        timeout -k 5 "$tmo" "$@" >"$LOGS/$kind.out" 2>"$LOGS/$kind.err"
    RC=$?
    set -e
    # socat's sender is done when its socket buffer holds the data: there the receiver's exit ends
    # the transfer (RECEIVER_PID).
    if [[ $RC == 0 && -n "${RECEIVER_PID:-}" ]]; then
        wait_gone "$RECEIVER_PID" $((tmo + 10)) || RC=124
    fi
    CLIENT_WALL="$(secs_since "$T0")"
    wanem_stats >"$LOGS/$kind.wanem1"
    c1="$(cpu_sample)"
    kill -TERM "$sampler" 2>/dev/null || true
    R_BUSY="$(cpu_busy_pct "$c0" "$c1")"
    read -r R_PAYLOAD R_LOSS R_QD R_WCPU < <(python3 "$BENCH_HOME/wan_report.py" wanem \
        "$LOGS/$kind.wanem0" "$LOGS/$kind.wanem1" "$wdir")
    read -r R_NCONN R_SBUSY R_RWND R_SNDBUF R_CWND R_RTT R_RETRANS < <(python3 \
        "$BENCH_HOME/wan_report.py" ss "$LOGS/$kind.ss" "$CLIENT_WALL")
}
capped() { [[ $RC == 124 || $RC == 137 ]]; }
err_line() { grep -v '^\s*$' "$LOGS/$1.err" 2>/dev/null | tail -n1 | tr '\t' ' ' | cut -c1-160; }

# finish KIND DSTFILE FSYNC: record the run from RC: complete (verified; FSYNC=1 adds a sync of the
# received file to the wall time), capped (payload over the link) or failed. Server numbers from
# S_CPU and S_RSS.
finish() {
    local kind="$1" dst="$2" fsync="$3" wall t
    if [[ $RC == 0 ]]; then
        wall="$CLIENT_WALL"
        if [[ "$fsync" == 1 ]]; then
            t="$(now_ns)"
            sync "$dst"
            wall="$(python3 -c "import sys; print(f'{float(sys.argv[1]) + float(sys.argv[2]):.3f}')" "$wall" "$(secs_since "$t")")"
        fi
        verify "$TOOL-$DIR" "$dst"
        record complete "$wall" "$SIZE" "$(client_cpu "$kind")" \
            "$(time_field "$LOGS/$kind.time" 2)" "$S_CPU" "$S_RSS"
    elif capped; then
        record capped "$CLIENT_WALL" "$R_PAYLOAD" "$(client_cpu "$kind")" \
            "$(time_field "$LOGS/$kind.time" 2)" "$S_CPU" "$S_RSS" "stopped at ${RUN_CAP:-$CAP} s"
    else
        fail "exit $RC: $(err_line "$kind")"
    fi
}

# settle_deletes: wait until a minute has passed since many files were removed (see DELETED_AT)
settle_deletes() {
    local wait_s=$((DELETED_AT + 61 - $(date +%s)))
    if ((wait_s > 0)); then
        log "  waiting $wait_s s: files were removed less than a minute ago (see DELETED_AT)"
        sleep "$wait_s"
    fi
}
# tree_dest BASE KIND: a new, empty directory BASE/copies/KIND for one tree run's copy (printed);
# every copy stays until the end of the profile x cc (drop_tree_copies), so no run creates its
# files among the freshly freed inodes of the one before.
tree_dest() {
    local d="$1/copies/$2"
    settle_deletes
    rm -rf "$d"
    mkdir -p "$d"
    echo "$d"
}
drop_tree_copies() {
    local t
    if [[ -n "$(ls -A "$SRV/copies" "$DST/copies" 2>/dev/null)" ]]; then
        t="$(now_ns)"
        rm -rf "$SRV/copies" "$DST/copies"
        deleted_now
        log "removed the tree copies of $PROFILE/$CC (and flushed) in $(secs_since "$t") s"
    fi
}

# finish_tree KIND COPY SYNC: record a tree run from RC: complete (COPY has the source tree's
# digest: file count, one sha256 over paths, sizes and contents; SYNC=1 adds `sync -f COPY`, a
# syncfs, to the wall time), capped (the files and bytes that arrived, counted after the stop) or
# failed. Server numbers from S_CPU and S_RSS.
finish_tree() {
    local kind="$1" copy="$2" fsync="$3" wall t digest
    if [[ $RC == 0 ]]; then
        wall="$CLIENT_WALL"
        R_SYNC=""
        if [[ "$fsync" == 1 ]]; then
            t="$(now_ns)"
            sync -f "$copy"
            R_SYNC="$(secs_since "$t")"
            wall="$(python3 -c "import sys; print(f'{float(sys.argv[1]) + float(sys.argv[2]):.3f}')" "$wall" "$R_SYNC")"
        fi
        [[ -d "$copy" ]] || fail "$kind: $copy was not created"
        digest="$(python3 "$BENCH_HOME/tree.py" digest "$copy")" || fail "$kind: cannot digest $copy"
        [[ "$digest" == "${TREE_DIGEST[$TREE]}" ]] ||
            fail "$kind: COPY DIFFERS: $copy has (files bytes sha256) $digest, source ${TREE_DIGEST[$TREE]}"
        log "  $kind: $(cut -d' ' -f1 <<<"$digest") files, digest ok"
        R_FILES="$(cut -d' ' -f1 <<<"$digest")"
        record complete "$wall" "$(cut -d' ' -f2 <<<"$digest")" "$(client_cpu "$kind")" \
            "$(time_field "$LOGS/$kind.time" 2)" "$S_CPU" "$S_RSS"
    elif capped; then
        local files=0 bytes=0
        if [[ -d "$copy" ]]; then
            read -r files bytes < <(python3 "$BENCH_HOME/tree.py" count "$WORK/src/trees/$TREE" "$copy")
        fi
        R_FILES="$files"
        record capped "$CLIENT_WALL" "$bytes" "$(client_cpu "$kind")" \
            "$(time_field "$LOGS/$kind.time" 2)" "$S_CPU" "$S_RSS" "stopped at ${CAP} s"
    else
        fail "exit $RC: $(err_line "$kind")"
    fi
}

# --- the tools ----------------------------------------------------------------------------------
# Each run_* runs in a subshell (see measure) with PROFILE, CC, TOOL, DIR set.

# iperf3_run KIND TIMEOUT CAPPABLE ARGS...: a one-shot iperf3 server in NS_B, the client in NS_A with
# ARGS after its address and port; a run that hit TIMEOUT counts as capped when CAPPABLE is 1.
iperf3_run() {
    local kind="$1" timeout="$2" cappable="$3" tpid spid bytes secs
    shift 3
    next_port
    "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
        iperf3 -s -1 -B "$IP_B" -p "$PORT" >"$LOGS/$kind.server" 2>&1 &
    tpid=$!
    track "$tpid"
    spid="$(child_of "$tpid")"
    track "$spid"
    wait_listening "$PORT" "$NS_B"
    client_run "$NS_A" "$kind" "$timeout" iperf3 -c "$IP_B" -p "$PORT" "$@"
    wait_gone "$tpid" 10 || stop_server "$tpid" "$spid"
    wait "$tpid" 2>/dev/null || true
    if [[ "$cappable" == 1 ]] && capped; then
        record capped "$CLIENT_WALL" "$R_PAYLOAD" "$(client_cpu "$kind")" "$(time_field "$LOGS/$kind.time" 2)" \
            "$(server_cpu "$(time_cpu "$LOGS/$kind.stime")")" "$(time_field "$LOGS/$kind.stime" 2)" "stopped at ${CAP} s"
        return 0
    fi
    [[ $RC == 0 ]] || fail "iperf3 exit $RC: $(err_line "$kind") $(tail -c 300 "$LOGS/$kind.out" | tr '\n\t' '  ')"
    read -r bytes secs < <(python3 "$BENCH_HOME/wan_report.py" iperf "$LOGS/$kind.out")
    record timed "$secs" "$bytes" "$(client_cpu "$kind")" "$(time_field "$LOGS/$kind.time" 2)" \
        "$(server_cpu "$(time_cpu "$LOGS/$kind.stime")")" "$(time_field "$LOGS/$kind.stime" 2)"
}

run_iperf3() { # run_iperf3 STREAMS: STREAMS connections for CAP seconds
    local args=(-t "$CAP" -P "$1" -J)
    [[ "$DIR" == download ]] && args+=(-R)
    iperf3_run "iperf3-P$1-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" $((CAP + 30)) 0 "${args[@]}"
}

# run_iperf3_same CC STREAMS: iperf3 -P STREAMS -C CC moving the file's bytes (-n), as xfer
# auto did just before (iperf3-same)
run_iperf3_same() {
    local args=(-n "$SIZE" -P "$2" -J)
    [[ "$1" == - ]] || args+=(-C "$1")
    [[ "$DIR" == download ]] && args+=(-R)
    iperf3_run "iperf3same-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" "$CAP" 1 "${args[@]}"
}

# start_ns_xferd KIND: a fresh xferd in NS_B serving SRV; sets XFERD_PID, XFERD_ADDR and XFERD_CPU0
start_ns_xferd() {
    local kind="$1"
    : >"$LOGS/$kind.xferd.out"
    "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" "$XFERD" --listen "$IP_B:0" --root "$SRV" --token-file "$WORK/conf/token" \
        "${XFERD_EXTRA[@]+"${XFERD_EXTRA[@]}"}" >"$LOGS/$kind.xferd.out" 2>"$LOGS/$kind.xferd.err" &
    XFERD_PID=$!
    track "$XFERD_PID"
    XFERD_ADDR="$(xferd_addr "$LOGS/$kind.xferd.out" "$LOGS/$kind.xferd.err" "$XFERD_PID")" || exit 1
    XFERD_CPU0="$(proc_cpu "$XFERD_PID")"
}
# stop_ns_xferd: S_CPU (since start_ns_xferd) and S_RSS of the xferd, then end it
stop_ns_xferd() {
    local cpu1
    cpu1="$(proc_cpu "$XFERD_PID")"
    S_RSS="$(proc_hwm_kib "$XFERD_PID")"
    S_CPU="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$XFERD_CPU0" "$cpu1")"
    kill -TERM "$XFERD_PID"
    wait_gone "$XFERD_PID" 15 || kill -KILL "$XFERD_PID" 2>/dev/null || true
    wait "$XFERD_PID" 2>/dev/null || true
    S_CPU="$(server_cpu "$S_CPU")"
}
# xfer_args CONNS: the client flags every xfer run shares, into XFER_COMMON
xfer_args() {
    local conns=()
    [[ "$1" == auto ]] || conns=(-c "$1")
    XFER_COMMON=(-q --json "${conns[@]+"${conns[@]}"}" --token-file "$WORK/conf/token" "${XFER_EXTRA[@]+"${XFER_EXTRA[@]}"}")
}

run_xfer() { # run_xfer CONNS (a number, or auto: no -c)
    local n="$1" kind="xfer-c$1-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" dst args
    if [[ "$DIR" == upload ]]; then dst="$SRV/up-xfer-$n.bin"; else dst="$DST/down-xfer-$n.bin"; fi
    rm -f "$dst" "$(dirname "$dst")/.$(basename "$dst").xfer-part" "$(dirname "$dst")/.$(basename "$dst").xfer-state"
    start_ns_xferd "$kind"
    xfer_args "$n"
    if [[ "$DIR" == upload ]]; then
        args=(send "${XFER_COMMON[@]}" --as "$(basename "$dst")" "$SRC" "$XFERD_ADDR")
    else
        args=(recv "${XFER_COMMON[@]}" -o "$dst" src.bin "$XFERD_ADDR")
    fi
    client_run "$NS_A" "$kind" "$CAP" "$XFER" "${args[@]}"
    stop_ns_xferd
    # What the run chose (--json): its congestion control and connections, for this row's note
    # and for the iperf3 run that follows it (iperf3-same).
    local chose
    chose="$(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(d.get("congestion") or "-", d["connections"])' \
        "$LOGS/$kind.out" 2>/dev/null || true)"
    if [[ -n "$chose" ]]; then
        R_NOTE="cc=${chose% *} conns=${chose#* }"
        [[ "$n" == auto ]] && echo "$chose" >"$WORK/xfer-chose-$DIR"
    fi
    finish "$kind" "$dst" 0
    rm -f "$dst" "$(dirname "$dst")/.$(basename "$dst").xfer-part" "$(dirname "$dst")/.$(basename "$dst").xfer-state"
}

run_socat() {
    local kind="socat-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" dst tpid spid
    next_port
    if [[ "$DIR" == upload ]]; then
        dst="$SRV/up-socat.bin"
        "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
            socat -u -b "$SOCAT_BLOCK" "TCP-LISTEN:$PORT,bind=$IP_B,reuseaddr" "OPEN:$dst,creat,trunc" \
            2>"$LOGS/$kind.server" &
    else
        dst="$DST/down-socat.bin"
        "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
            socat -u -b "$SOCAT_BLOCK" "OPEN:$SRV/src.bin,rdonly" "TCP-LISTEN:$PORT,bind=$IP_B,reuseaddr" \
            2>"$LOGS/$kind.server" &
    fi
    tpid=$!
    track "$tpid"
    spid="$(child_of "$tpid")"
    track "$spid"
    wait_listening "$PORT" "$NS_B"
    rm -f "$DST/down-socat.bin"
    if [[ "$DIR" == upload ]]; then
        RECEIVER_PID="$tpid"
        client_run "$NS_A" "$kind" "$PEER_CAP" socat -u -b "$SOCAT_BLOCK" "OPEN:$SRC,rdonly" "TCP:$IP_B:$PORT"
        RECEIVER_PID=""
    else
        client_run "$NS_A" "$kind" "$PEER_CAP" socat -u -b "$SOCAT_BLOCK" "TCP:$IP_B:$PORT" "OPEN:$dst,creat,trunc"
    fi
    stop_server "$tpid" "$spid"
    S_CPU="$(server_cpu "$(time_cpu "$LOGS/$kind.stime")")"
    S_RSS="$(time_field "$LOGS/$kind.stime" 2)"
    finish "$kind" "$dst" 1
    rm -f "$dst"
}

# start_rsyncd KIND: an rsync daemon in NS_B with the module `bench` = SRV, on a new PORT, under
# /usr/bin/time; sets SRV_TPID (the time wrapper) and SRV_SPID (the daemon)
start_rsyncd() {
    local kind="$1"
    next_port
    rsyncd_conf "$WORK/conf/rsyncd.conf" bench "$SRV"
    "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
        rsync --daemon --no-detach --address="$IP_B" --port="$PORT" --config="$WORK/conf/rsyncd.conf" \
        2>"$LOGS/$kind.server" &
    SRV_TPID=$!
    track "$SRV_TPID"
    SRV_SPID="$(child_of "$SRV_TPID")"
    track "$SRV_SPID"
    wait_listening "$PORT" "$NS_B"
}
# stop_session_server KIND: once the session's processes are gone, end the server started for
# it (rsync daemon, sshd) under /usr/bin/time; sets S_CPU and S_RSS
stop_session_server() {
    wait_children_gone "$SRV_SPID" 10
    stop_server "$SRV_TPID" "$SRV_SPID"
    S_CPU="$(server_cpu "$(time_cpu "$LOGS/$1.stime")")"
    S_RSS="$(time_field "$LOGS/$1.stime" 2)"
}

run_rsync() {
    local kind="rsync-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" dst from to
    start_rsyncd "$kind"
    if [[ "$DIR" == upload ]]; then
        dst="$SRV/up-rsync.bin"
        from="$SRC"
        to="rsync://$IP_B:$PORT/bench/up-rsync.bin"
    else
        dst="$DST/down-rsync.bin"
        from="rsync://$IP_B:$PORT/bench/src.bin"
        to="$dst"
    fi
    rm -f "$dst"
    client_run "$NS_A" "$kind" "$PEER_CAP" rsync -a "$from" "$to"
    stop_session_server "$kind"
    finish "$kind" "$dst" 1
    rm -f "$dst" "$(dirname "$dst")"/.up-rsync.bin.* "$(dirname "$dst")"/.down-rsync.bin.*
}

SSH_OPTS=()
setup_ssh() { # once: host key, client key, sshd_config template
    local d="$WORK/conf/ssh"
    rm -rf "$d"
    mkdir -p "$d"
    chmod 700 "$d"
    ssh-keygen -q -t ed25519 -N '' -f "$d/host_ed25519" -C wan-bench-host
    ssh-keygen -q -t ed25519 -N '' -f "$d/id_ed25519" -C wan-bench-client
    cp "$d/id_ed25519.pub" "$d/authorized_keys"
    chmod 600 "$d/authorized_keys"
    mkdir -p /run/sshd # sshd's privilege separation directory
    chmod 755 /run/sshd
    SSH_OPTS=(-i "$d/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentitiesOnly=yes)
}
# start_sshd KIND: sshd -D in NS_B on a new PORT under /usr/bin/time; sets SRV_TPID and SRV_SPID
start_sshd() {
    local kind="$1" d="$WORK/conf/ssh"
    next_port
    cat >"$d/sshd_config" <<EOF
# written by bench/wan.sh
Port $PORT
ListenAddress $IP_B
HostKey $d/host_ed25519
PidFile none
AuthorizedKeysFile $d/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
    "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
        /usr/sbin/sshd -D -e -f "$d/sshd_config" 2>"$LOGS/$kind.server" &
    SRV_TPID=$!
    track "$SRV_TPID"
    SRV_SPID="$(child_of "$SRV_TPID")"
    track "$SRV_SPID"
    wait_listening "$PORT" "$NS_B"
}

run_scp() {
    local kind="scp-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" dst
    start_sshd "$kind"
    if [[ "$DIR" == upload ]]; then
        dst="$SRV/up-scp.bin"
        rm -f "$dst"
        client_run "$NS_A" "$kind" "$PEER_CAP" scp -q -P "$PORT" "${SSH_OPTS[@]}" "$SRC" "root@$IP_B:$dst"
    else
        dst="$DST/down-scp.bin"
        rm -f "$dst"
        client_run "$NS_A" "$kind" "$PEER_CAP" scp -q -P "$PORT" "${SSH_OPTS[@]}" "root@$IP_B:$SRV/src.bin" "$dst"
    fi
    stop_session_server "$kind"
    finish "$kind" "$dst" 1
    rm -f "$dst"
}

run_gridftp() { # run_gridftp STREAMS
    local n="$1" kind="gridftp-p$1-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" dst tpid spid
    next_port
    # -aa: clear-text anonymous (ftp://), served as nobody; -1: exit after the one session, so
    # /usr/bin/time sees its CPU including the forked session process.
    "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" env GLOBUS_USAGE_OPTOUT=1 /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
        globus-gridftp-server -aa -anonymous-user nobody -1 -p "$PORT" -control-interface "$IP_B" \
        -data-interface "$IP_B" -l "$LOGS/$kind.server.log" >"$LOGS/$kind.server" 2>&1 &
    tpid=$!
    track "$tpid"
    spid="$(child_of "$tpid")"
    track "$spid"
    wait_listening "$PORT" "$NS_B"
    if [[ "$DIR" == upload ]]; then
        dst="$SRV/up-gridftp-$n.bin"
        rm -f "$dst"
        client_run "$NS_A" "$kind" "$PEER_CAP" env GLOBUS_USAGE_OPTOUT=1 globus-url-copy -p "$n" \
            "file://$SRC" "ftp://$IP_B:$PORT$dst"
    else
        dst="$DST/down-gridftp-$n.bin"
        rm -f "$dst"
        client_run "$NS_A" "$kind" "$PEER_CAP" env GLOBUS_USAGE_OPTOUT=1 globus-url-copy -p "$n" \
            "ftp://$IP_B:$PORT$SRV/src.bin" "file://$dst"
    fi
    wait_gone "$tpid" 10 || stop_server "$tpid" "$spid"
    wait "$tpid" 2>/dev/null || true
    S_CPU="$(server_cpu "$(time_cpu "$LOGS/$kind.stime")")"
    S_RSS="$(time_field "$LOGS/$kind.stime" 2)"
    finish "$kind" "$dst" 1
    rm -f "$dst"
}

run_aria2() {
    local kind="aria2-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" d="$WORK/conf/nginx" dst="$DST/down-aria2.bin" tpid
    [[ "$DIR" == download ]] || fail "aria2c only downloads"
    next_port
    mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
# written by bench/wan.sh
daemon off;
master_process off;
worker_processes 1;
pid $d/nginx.pid;
error_log $LOGS/nginx-error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    server {
        listen $IP_B:$PORT;
        root $SRV;
    }
}
EOF
    "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
        nginx -p "$d" -c "$d/nginx.conf" 2>"$LOGS/$kind.server" &
    tpid=$!
    track "$tpid"
    local spid
    spid="$(child_of "$tpid")"
    track "$spid"
    wait_listening "$PORT" "$NS_B"
    rm -f "$dst" "$dst.aria2"
    client_run "$NS_A" "$kind" "$PEER_CAP" aria2c -x "$ARIA2_CONNS" -s "$ARIA2_CONNS" --file-allocation=none --allow-overwrite=true \
        --auto-file-renaming=false --summary-interval=0 --console-log-level=warn --download-result=hide \
        --no-conf -d "$DST" -o "$(basename "$dst")" "http://$IP_B:$PORT/src.bin"
    stop_server "$tpid" "$spid"
    S_CPU="$(server_cpu "$(time_cpu "$LOGS/$kind.stime")")"
    S_RSS="$(time_field "$LOGS/$kind.stime" 2)"
    finish "$kind" "$dst" 1
    rm -f "$dst" "$dst.aria2"
}

# --- the tree runs: TREE is the tree, its source $WORK/src/trees/TREE (and the same, hard-linked, in
# the server root as trees/TREE). Each run copies it into a new directory, copies/KIND under the
# server root (upload) or DST (download), kept until the end of the profile x cc.

# tree_copy_base KIND: the run's new directory on the receiving side
tree_copy_base() { if [[ "$DIR" == upload ]]; then tree_dest "$SRV" "$1"; else tree_dest "$DST" "$1"; fi; }

run_tree_xfer() { # run_tree_xfer CONNS (a number, or auto: no -c)
    local n="$1" kind="tree-$TREE-xfer-c$1-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" base args
    base="$(tree_copy_base "$kind")"
    start_ns_xferd "$kind"
    xfer_args "$n"
    if [[ "$DIR" == upload ]]; then
        args=(send -r "${XFER_COMMON[@]}" --as "copies/$kind/$TREE" "$WORK/src/trees/$TREE" "$XFERD_ADDR")
    else
        args=(recv -r "${XFER_COMMON[@]}" -o "$base/$TREE" "trees/$TREE" "$XFERD_ADDR")
    fi
    client_run "$NS_A" "$kind" "$CAP" "$XFER" "${args[@]}"
    stop_ns_xferd
    finish_tree "$kind" "$base/$TREE" 0
}

run_tree_rsync() {
    local kind="tree-$TREE-rsync-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" base
    base="$(tree_copy_base "$kind")"
    start_rsyncd "$kind"
    if [[ "$DIR" == upload ]]; then
        client_run "$NS_A" "$kind" "$CAP" rsync -a "$WORK/src/trees/$TREE" "rsync://$IP_B:$PORT/bench/copies/$kind/"
    else
        client_run "$NS_A" "$kind" "$CAP" rsync -a "rsync://$IP_B:$PORT/bench/trees/$TREE" "$base/"
    fi
    stop_session_server "$kind"
    finish_tree "$kind" "$base/$TREE" 1
}

run_tree_scp() {
    local kind="tree-$TREE-scp-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" base
    base="$(tree_copy_base "$kind")"
    start_sshd "$kind"
    if [[ "$DIR" == upload ]]; then
        client_run "$NS_A" "$kind" "$CAP" scp -r -q -P "$PORT" "${SSH_OPTS[@]}" "$WORK/src/trees/$TREE" "root@$IP_B:$base/"
    else
        client_run "$NS_A" "$kind" "$CAP" scp -r -q -P "$PORT" "${SSH_OPTS[@]}" "root@$IP_B:$SRV/trees/$TREE" "$base/"
    fi
    stop_session_server "$kind"
    finish_tree "$kind" "$base/$TREE" 1
}

# The tar pipe: `tar c | socat` on the sending side, `socat | tar x` on the receiving side, one
# TCP stream. The server's pipeline runs in a session of its own (setsid: the same PID as the
# bash that runs it, under /usr/bin/time), so it is ended as a process group (kill -- -PGID).
run_tree_tar() {
    local kind="tree-$TREE-tar-$DIR-$PROFILE-$CC${REP_SUFFIX:-}" base tpid spid
    base="$(tree_copy_base "$kind")"
    next_port
    if [[ "$DIR" == upload ]]; then
        # shellcheck disable=SC2016 # expanded by the inner bash
        "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
            setsid bash -c 'set -o pipefail; socat -u -b "$1" "TCP-LISTEN:$2,bind=$3,reuseaddr" STDOUT | tar -x -C "$4"' \
            _ "$SOCAT_BLOCK" "$PORT" "$IP_B" "$base" 2>"$LOGS/$kind.server" &
    else
        # shellcheck disable=SC2016
        "${CGS[@]+"${CGS[@]}"}" ip netns exec "$NS_B" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.stime" \
            setsid bash -c 'set -o pipefail; tar -c -C "$1" "$2" | socat -u -b "$3" STDIN "TCP-LISTEN:$4,bind=$5,reuseaddr"' \
            _ "$SRV/trees" "$TREE" "$SOCAT_BLOCK" "$PORT" "$IP_B" 2>"$LOGS/$kind.server" &
    fi
    tpid=$!
    track "$tpid"
    spid="$(child_of "$tpid")"
    track "-$spid" # the process group
    wait_listening "$PORT" "$NS_B"
    if [[ "$DIR" == upload ]]; then
        # the sender is done once its socket buffer holds the data: the receiver's exit ends the run
        RECEIVER_PID="$tpid"
        # shellcheck disable=SC2016
        client_run "$NS_A" "$kind" "$CAP" bash -c 'set -o pipefail; tar -c -C "$1" "$2" | socat -u -b "$3" STDIN "TCP:$4:$5"' \
            _ "$WORK/src/trees" "$TREE" "$SOCAT_BLOCK" "$IP_B" "$PORT"
        RECEIVER_PID=""
    else
        # shellcheck disable=SC2016
        client_run "$NS_A" "$kind" "$CAP" bash -c 'set -o pipefail; socat -u -b "$1" "TCP:$2:$3" STDOUT | tar -x -C "$4"' \
            _ "$SOCAT_BLOCK" "$IP_B" "$PORT" "$base"
    fi
    wait_gone "$tpid" 10 || stop_server "$tpid" "-$spid"
    wait "$tpid" 2>/dev/null || true
    S_CPU="$(server_cpu "$(time_cpu "$LOGS/$kind.stime")")"
    S_RSS="$(time_field "$LOGS/$kind.stime" 2)"
    finish_tree "$kind" "$base/$TREE" 1
}

# measure TOOL_LABEL NA_KEY FUNCTION ARGS...: one run in a subshell; anything it started is ended
# by PID when it returns; a failure becomes a row with the reason.
measure() {
    local label="$1" key="$2"
    shift 2
    TOOL="$label"
    if [[ -n "${NA[$key]:-}" ]]; then
        R_PAYLOAD="" R_LOSS="" R_QD="" R_BUSY="" R_NCONN=""
        record n/a "" "" "" "" "" "" "${NA[$key]}"
        return 0
    fi
    log "$PROFILE/$CC: $label $DIR"
    rm -f "$WORK/run.reason"
    cg_reset
    local rc=0
    (
        set -euo pipefail
        R_PAYLOAD="" R_LOSS="" R_QD="" R_BUSY="" R_NCONN="" R_NOTE=""
        S_CPU="" S_RSS=""
        "$@"
    ) || rc=$?
    kill_tracked
    if ((rc != 0)); then
        local why="script error (see stderr)"
        [[ -s "$WORK/run.reason" ]] && why="$(head -c 200 "$WORK/run.reason" | tr '\t\n' '  ')"
        R_PAYLOAD="" R_LOSS="" R_QD="" R_BUSY="" R_NCONN=""
        record failed "" "" "" "" "" "" "$why"
    fi
    # the subshell's port counter is lost: move ours on past anything it may have used
    PORT=$((PORT + 10))
}

# --- source file and trees, token, keys ---------------------------------------------------------
SRC="$WORK/src/src.bin"
if has_workload file; then
    if [[ ! -f "$SRC" || "$(stat -c %s "$SRC")" != "$SIZE" ]]; then
        log "creating $SRC ($SIZE bytes of random data)"
        rm -f "$SRC"
        head -c "$SIZE" /dev/urandom >"$SRC.tmp"
        mv "$SRC.tmp" "$SRC"
    fi
    chmod 644 "$SRC"
    ln "$SRC" "$SRV/src.bin"
    SRC_SHA="$(sha256sum "$SRC" | awk '{print $1}')"
fi
# Each tree: made once (again only when its parameters changed), digested, and hard-linked into
# the server root as trees/TREE for the downloads.
declare -A TREE_DIGEST=() # tree -> "files bytes sha256" (bench/tree.py digest)
if has_workload tree; then
    mkdir -p "$WORK/src/trees" "$SRV/trees"
    for t in $TREES; do
        if [[ ! -d "$WORK/src/trees/$t" || "$(cat "$WORK/src/trees/$t.params" 2>/dev/null)" != "${TREE_PARAMS[$t]}" ]]; then
            log "creating the $t tree (bench/tree.py make DIR ${TREE_PARAMS[$t]})"
            if [[ -e "$WORK/src/trees/$t" ]]; then
                rm -rf "$WORK/src/trees/$t"
                deleted_now
            fi
            rm -f "$WORK/src/trees/$t.params"
            # shellcheck disable=SC2086 # the parameters are a list of words
            python3 "$BENCH_HOME/tree.py" make "$WORK/src/trees/$t" ${TREE_PARAMS[$t]}
            echo "${TREE_PARAMS[$t]}" >"$WORK/src/trees/$t.params"
        fi
        TREE_DIGEST[$t]="$(python3 "$BENCH_HOME/tree.py" digest "$WORK/src/trees/$t")"
        read -r files bytes _ <<<"${TREE_DIGEST[$t]}"
        printf '%s\t%s\t%s\n' "$t" "$files" "$bytes" >>"$TREE_SETS"
        cp -al "$WORK/src/trees/$t" "$SRV/trees/$t"
    done
fi
head -c 32 /dev/urandom | base64 >"$WORK/conf/token"
chmod 600 "$WORK/conf/token"
if has_tool scp && [[ -z "${NA[scp]:-}" ]]; then setup_ssh; fi
sync

# --- the matrix ---------------------------------------------------------------------------------
for PROFILE in $PROFILES; do
    for CC in $CCS; do
        read -r -a wargs <<<"$(profile_args "$PROFILE")"
        wargs+=(--cc "$CC" --seed "$SEED")
        [[ -n "$SOCKBUF_MB" ]] && wargs+=(--sockbuf-mb "$SOCKBUF_MB")
        log "=== $PROFILE / $CC: wan.sh up ${wargs[*]}"
        "$WANSH" up "${wargs[@]}" >"$LOGS/wan-up-$PROFILE-$CC.log" 2>&1 ||
            die "wan.sh up failed: $(cat "$LOGS/wan-up-$PROFILE-$CC.log")"
        WAN_IS_UP=1
        fast_open_on "$NS_A" "$NS_B"
        grep -q "cc=$CC" "$LOGS/wan-up-$PROFILE-$CC.log" || die "cc is not $CC in the namespaces: $(cat "$LOGS/wan-up-$PROFILE-$CC.log")"
        load0="$(cut -d' ' -f1-3 /proc/loadavg)"
        wmem="$(ip netns exec "$NS_A" sysctl -n net.ipv4.tcp_wmem | awk '{print $3}')"
        rmem="$(ip netns exec "$NS_A" sysctl -n net.ipv4.tcp_rmem | awk '{print $3}')"
        desc="$(profile_desc "$PROFILE"), $CC, tcp_wmem max $((wmem >> 20)) MiB, tcp_rmem max $((rmem >> 20)) MiB, TCP Fast Open on (wan.sh up ${wargs[*]})"
        for rep in $(seq "$REPEAT"); do
            REP_SUFFIX=""
            if ((REPEAT > 1)); then
                log "round $rep of $REPEAT"
                REP_SUFFIX="-r$rep" # logs of every round are kept
            fi
            for DIR in $DIRS; do
                WORKLOAD="file"
                has_workload file || continue
                if has_tool iperf3; then
                    if [[ "$DIR" == upload ]]; then
                        for n in $IPERF_STREAMS; do measure "iperf3 -P $n" iperf3 run_iperf3 "$n"; done
                    else
                        measure "iperf3 -P 16" iperf3 run_iperf3 16
                    fi
                fi
                if has_tool xfer; then
                    for n in $CONNS; do
                        if [[ "$n" == auto ]]; then
                            measure "xfer auto" xfer run_xfer auto
                        else
                            measure "xfer -c $n" xfer run_xfer "$n"
                        fi
                    done
                fi
                if has_tool iperf3-same && [[ -s "$WORK/xfer-chose-$DIR" ]]; then
                    read -r same_cc same_n <"$WORK/xfer-chose-$DIR"
                    rm -f "$WORK/xfer-chose-$DIR"
                    measure "iperf3 -P $same_n -C $same_cc" iperf3 run_iperf3_same "$same_cc" "$same_n"
                fi
                has_tool socat && measure "socat (1 stream)" socat run_socat
                has_tool rsync && measure "rsync daemon" rsync run_rsync
                has_tool scp && measure "scp" scp run_scp
                if has_tool gridftp; then
                    for n in $GRIDFTP_STREAMS; do measure "globus-url-copy -p $n" gridftp run_gridftp "$n"; done
                fi
                if has_tool aria2; then
                    if [[ "$DIR" == download ]]; then
                        measure "aria2c -x $ARIA2_CONNS" aria2 run_aria2
                    else
                        TOOL="aria2c -x $ARIA2_CONNS"
                        R_PAYLOAD="" R_LOSS="" R_QD="" R_BUSY="" R_NCONN=""
                        record n/a "" "" "" "" "" "" "aria2c only downloads"
                    fi
                fi
            done
            # The trees, after the file runs of both directions (their copies stay until the end of
            # the profile x cc: see tree_dest).
            WORKLOAD="tree"
            for DIR in $DIRS; do
                has_workload tree || continue
                for TREE in $TREES; do
                    if has_tool xfer; then
                        for T_CONNS in $CONNS; do measure "xfer -r" xfer run_tree_xfer "$T_CONNS"; done
                    fi
                    T_CONNS=1
                    has_tool rsync && measure "rsync -a (daemon)" rsync run_tree_rsync
                    has_tool socat && measure "tar c + socat + tar x" socat run_tree_tar
                    has_tool scp && measure "scp -r" scp run_tree_scp
                done
            done
            WORKLOAD="file"
        done
        drop_tree_copies
        wanem_stats >"$LOGS/wanem-final-$PROFILE-$CC.stats"
        grep -E 'ring_drops=[1-9]' "$LOGS/wanem-final-$PROFILE-$CC.stats" >/dev/null &&
            log "WARNING: wanem ring_drops > 0 in $PROFILE/$CC (emulator overloaded)"
        wan_down
        printf '%s\t%s\t%s\t%s\t%s\n' "$PROFILE" "$CC" "$desc" "$load0" "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$COMBOS"
    done
done

python3 "$BENCH_HOME/wan_report.py" report "$RESULTS" "$COMBOS" "$SIZE" "$CAP" "$TREE_RESULTS" "$TREE_SETS" |
    tee -a "$WORK/report.md"
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg). Raw results: $RESULTS (file), $TREE_RESULTS (trees); logs: $LOGS; report: $WORK/report.md"
