# shellcheck shell=bash
# What bench.sh, bulk.sh and wan.sh share; sourced by them, never run. Messages, sizes, installing
# peers, the binaries under test, the work dir, ports, timing, process accounting, ending what was
# started, and one xferd on 127.0.0.1.
#
# The sourcing script sets BENCH_NAME (its name in error lines) before sourcing. A script whose
# runs end through a function of its own rather than `die` names it in BENCH_FAIL (wan.sh: `fail`,
# which ends one run, not the benchmark); the helpers here that can fail mid-run call that.

# --- messages and arguments ---------------------------------------------------------------------
die() {
    echo "${BENCH_NAME:-bench}: $*" >&2
    exit 1
}
log() { echo "# $*" >&2; }
# fail_run MESSAGE: end the current run (BENCH_FAIL), or the script.
fail_run() { "${BENCH_FAIL:-die}" "$@"; }

# parse_size SIZE: bytes, or K/M/G (powers of 1024; a trailing iB or B is allowed), as the xfer
# CLI takes them.
parse_size() {
    local s="$1" n unit
    [[ "$s" =~ ^([0-9]+)([KkMmGg]?)i?[Bb]?$ ]] || die "bad size: $s"
    n="${BASH_REMATCH[1]}"
    unit="${BASH_REMATCH[2]^^}"
    case "$unit" in
        K) echo $((n << 10)) ;;
        M) echo $((n << 20)) ;;
        G) echo $((n << 30)) ;;
        *) echo "$n" ;;
    esac
}

# has_tool TOOL: TOOL is among the space-separated TOOLS the script was asked to run.
has_tool() { [[ " ${TOOLS:-} " == *" $1 "* ]]; }

# --- peers: install what is missing --------------------------------------------------------------
declare -A NA=() # tool -> why it cannot run (its rows become n/a)
apt_updated=0
apt_install() { # apt_install PACKAGE...: apt-get update once per script, then install
    if ((apt_updated == 0)); then
        timeout 600 apt-get update -qq >&2 || true
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "$@" >&2
}
ensure_apt() { # ensure_apt COMMAND PACKAGE: install PACKAGE unless COMMAND exists; fails if it cannot
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    apt_install "$2"
}
need() { # need TOOL COMMAND PACKAGE...: try each PACKAGE for COMMAND, else mark TOOL n/a in NA
    local tool="$1" cmd="$2" pkg
    shift 2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    for pkg in "$@"; do
        log "installing $pkg (for $cmd)"
        apt_install "$pkg" && command -v "$cmd" >/dev/null 2>&1 && return 0
    done
    NA[$tool]="${NA[$tool]:+${NA[$tool]}; }$cmd not installable (apt: $*)"
    log "$tool: n/a: ${NA[$tool]}"
}

# --- the binaries under test --------------------------------------------------------------------
# xfer_binaries BUILD_LOG: sets XFER and XFERD: from XFER_BIN_DIR if set, else from
# `cargo build --release` of the work tree.
xfer_binaries() {
    if [[ -n "${XFER_BIN_DIR:-}" ]]; then
        XFER="$XFER_BIN_DIR/xfer"
        XFERD="$XFER_BIN_DIR/xferd"
    else
        log "cargo build --release"
        if ! cargo build --release >"$1" 2>&1; then
            tail -n 30 "$1" >&2
            die "cargo build --release failed (full log: $1)"
        fi
        XFER="$REPO/target/release/xfer"
        XFERD="$REPO/target/release/xferd"
    fi
    [[ -x "$XFER" && -x "$XFERD" ]] || die "no xfer/xferd binaries at $XFER, $XFERD"
}

# --- work dir -----------------------------------------------------------------------------------
# real_disk DIR: checks DIR is not on tmpfs (flushing would cost nothing there); sets FSTYPE.
real_disk() {
    FSTYPE="$(df -PT "$1" | awk 'NR == 2 {print $2}')"
    [[ "$FSTYPE" == tmpfs || "$FSTYPE" == ramfs ]] &&
        die "$1 is on $FSTYPE; flushing would cost nothing there. Set the work dir to a real disk."
    return 0
}
require_free() { # require_free DIR BYTES
    local avail
    avail=$(($(df -P -k "$1" | awk 'NR == 2 {print $4}') * 1024))
    ((avail > $2)) || die "need about $(($2 >> 20)) MiB free in $1, have $((avail >> 20)) MiB"
}

# --- processes: every one started is recorded in PIDS and ended by PID --------------------------
PIDS=()
kill_tree() { # kill_tree SIGNAL PID: the process and its children (all started by this script)
    local child
    for child in $(ps -o pid= --ppid "$2" 2>/dev/null); do
        kill_tree "$1" "$child"
    done
    kill "-$1" "$2" 2>/dev/null || true
}
end_pids() { # end_pids [--tree] PID...: TERM each (with its children: --tree), KILL what is left after 5 s
    local signal=(kill_one) pid
    if [[ "${1:-}" == --tree ]]; then
        signal=(kill_tree)
        shift
    fi
    for pid in "$@"; do "${signal[@]}" TERM "$pid"; done
    for pid in "$@"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        "${signal[@]}" KILL "$pid"
    done
}
kill_one() { kill "-$1" "$2" 2>/dev/null || true; }
forget_pid() { # forget_pid PID: drop a PID that has exited from PIDS
    local keep=() p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do [[ "$p" != "$1" ]] && keep+=("$p"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
}
# child_of PID: the real server under a /usr/bin/time wrapper, the wrapper's only child.
child_of() {
    local parent="$1" child=""
    for _ in $(seq 100); do
        child="$(ps -o pid= --ppid "$parent" | tr -d ' ' | head -n1)"
        [[ -n "$child" ]] && break
        sleep 0.05
    done
    [[ -n "$child" ]] || fail_run "no child of PID $parent"
    echo "$child"
}

# --- ports --------------------------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_listening() { # wait_listening PORT [NETNS]: 10 s at most
    local in_ns=()
    [[ -z "${2:-}" ]] || in_ns=(ip netns exec "$2")
    for _ in $(seq 200); do
        [[ -n "$("${in_ns[@]+"${in_ns[@]}"}" ss -Hltn "sport = :$1")" ]] && return 0
        sleep 0.05
    done
    fail_run "nothing listens on ${2:+$2 }port $1"
}

# --- timing and accounting ----------------------------------------------------------------------
# shellcheck disable=SC2034 # for the sourcing scripts
TIME_FMT='%e %M %U %S' # /usr/bin/time -f: wall s, max RSS KiB, user s, sys s
# fast_open_on NETNS...: TCP Fast Open for clients and servers in each namespace, as the xferd
# package's sysctl.d file sets it on a host (net.ipv4.tcp_fastopen = 3): xfer's connections
# then send their first flight with the SYN. The other tools do not ask for it.
fast_open_on() {
    local ns
    for ns in "$@"; do ip netns exec "$ns" sysctl -qw net.ipv4.tcp_fastopen=3; done
}

now_ns() { date +%s%N; }
secs_between() { python3 -c "import sys; print(f'{(int(sys.argv[2]) - int(sys.argv[1])) / 1e9:.3f}')" "$1" "$2"; }
secs_since() { secs_between "$1" "$(now_ns)"; }
# proc_cpu PID: utime + stime in seconds, from /proc/PID/stat (fields 14 and 15; the comm field may
# hold spaces, so count from the closing parenthesis).
proc_cpu() {
    local stat rest
    stat="$(cat "/proc/$1/stat")"
    rest="${stat##*) }"
    # shellcheck disable=SC2086
    set -- $rest
    python3 -c "import os, sys; print((int(sys.argv[1]) + int(sys.argv[2])) / os.sysconf('SC_CLK_TCK'))" "${12}" "${13}"
}
proc_hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
# time_field FILE N: field N of a /usr/bin/time -o FILE output (last line; earlier lines may say
# "Command exited with non-zero status"); time_cpu FILE: its user + sys seconds.
time_field() { tail -n1 "$1" | awk -v n="$2" '{print $n}'; }
time_cpu() { tail -n1 "$1" | awk '{printf "%.2f", $3 + $4}'; }

# --- xferd --------------------------------------------------------------------------------------
# xferd_addr OUT ERR PID: the ADDR of the `xferd listening on ADDR` line xferd (PID) prints first
# on OUT, waited for 10 s at most; fails the run if it exits first (the tail of ERR says why).
xferd_addr() {
    local line
    for _ in $(seq 200); do
        line="$(head -n1 "$1")"
        if [[ "$line" == "xferd listening on "* ]]; then
            echo "${line#xferd listening on }"
            return 0
        fi
        kill -0 "$3" 2>/dev/null || fail_run "xferd exited at start: $(tail -n5 "$2")"
        sleep 0.05
    done
    fail_run "xferd printed no 'xferd listening on ADDR' line within 10 s"
}
# start_xferd ROOT FLAGS...: a fresh xferd on 127.0.0.1 serving ROOT; sets XFERD_PID, XFERD_ADDR.
start_xferd() {
    local out="$LOGS/xferd.out" root="$1"
    shift
    : >"$out"
    "$XFERD" --listen 127.0.0.1:0 --root "$root" "$@" >"$out" 2>>"$LOGS/xferd.err" &
    XFERD_PID=$!
    PIDS+=("$XFERD_PID")
    # shellcheck disable=SC2034 # for the sourcing script
    XFERD_ADDR="$(xferd_addr "$out" "$LOGS/xferd.err" "$XFERD_PID")" || exit 1
}
# stop_xferd: SIGTERM, and a warning unless it exits 0 (its contract).
stop_xferd() {
    local rc=0
    kill -TERM "$XFERD_PID"
    wait "$XFERD_PID" || rc=$?
    forget_pid "$XFERD_PID"
    ((rc == 0)) || log "warning: xferd exited with status $rc after SIGTERM (contract: 0)"
}

# --- servers of the peers ----------------------------------------------------------------------
# rsyncd_conf FILE MODULE DIR: an rsync daemon configuration serving DIR as the writable module
# MODULE, as this user, logging to $LOGS/rsyncd.log.
rsyncd_conf() {
    cat >"$1" <<EOF
# written by bench/$(basename "$0")
use chroot = no
log file = $LOGS/rsyncd.log
[$2]
    path = $3
    read only = no
    uid = $(id -u)
    gid = $(id -g)
EOF
}

# on_exit FUNCTION: FUNCTION runs at exit, also after INT and TERM (with their exit codes).
on_exit() {
    # shellcheck disable=SC2064 # the function's name, now
    trap "$1" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# --- one file through the emulator (timeline.sh, ceiling.sh) -----------------------------------
emulated_file_setup() { # emulated_file_setup OUT SIZE: wanem built under OUT, OUT/src.bin of SIZE random bytes (kept between runs), a copy for downloads in OUT/srv, a token in OUT/token
    local out="$1" size="$2"
    install -m 0755 /work/shared/wanem/wan.sh /work/shared/wanem/wanem.c "$out/wanem/"
    "$out/wanem/wan.sh" build >/dev/null
    [[ -f "$out/src.bin" && $(stat -c %s "$out/src.bin") == $(numfmt --from=iec "$size") ]] ||
        head -c "$size" /dev/urandom >"$out/src.bin"
    cp "$out/src.bin" "$out/srv/src.bin"
    head -c 32 /dev/urandom | base64 >"$out/token"
    chmod 600 "$out/token"
}
