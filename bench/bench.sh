#!/usr/bin/env bash
# Loopback benchmark: xfer (1, 4, 8 connections and without -c, upload and download; plain and over
# TLS) against a raw single TCP stream (socat), an rsync daemon, GridFTP (globus-url-copy -p 1 and
# -p 4) and scp (AES-128-GCM), on one machine. Not a
# test: run it by hand.
#
#   bench/bench.sh                      # 2 GiB file, every tool, best of 1
#   BENCH_SIZE=512M REPEAT=3 bench/bench.sh
#
# Environment:
#   BENCH_SIZE    file size, bytes or with a K/M/G suffix (powers of 1024); default 2G
#   BENCH_DIR     work dir; default bench/out. Must be on a real disk, not tmpfs.
#   REPEAT        runs per measurement, the fastest is reported; default 1
#   CONNS         xfer connection counts, `auto` for xfer without -c (its adaptive pool; the
#                 report compares it with the best fixed -c); default "1 4 8 auto"
#   BENCH_TOOLS   which tools to run, any of "raw rsync gridftp xfer tls scp"; default all six
#                 ("tls" is xfer over TLS, compared with plain xfer at the same pool; "scp" is
#                 scp -c aes128-gcm@openssh.com to a throwaway sshd on 127.0.0.1)
#   TLS_CONNS     xfer connection counts for the TLS rows; default "auto" (no -c, the default
#                 pool); each needs a plain xfer row of the same count in CONNS to compare with
#   BENCH_CHUNK   passed to xfer as --chunk-size if set; the memory target uses it (default 4M)
#   SOCAT_BLOCK   socat's -b (bytes per read/write); default 1048576. socat's own 8192 makes a
#                 weaker baseline (about half the loopback rate on the 2-core machine here)
#   GRIDFTP_STREAMS  globus-url-copy -p values (parallel MODE E data connections); default "1 4"
#   GRIDFTP_BLOCK    globus-url-copy -bs and the server's -blocksize (bytes); default 1048576, as
#                 SOCAT_BLOCK
#   RUN_TIMEOUT   seconds before one transfer is killed; default 900
#   XFER_BIN_DIR  use xfer/xferd from this directory and skip cargo build --release
#   KEEP=1        keep the big files at the end
#
# How it measures (every destination is written fresh; caches cannot be dropped here, so the
# source file is in the page cache for every tool alike):
#   wall      from the client's start to its exit; xfer fsyncs and renames before it reports
#             success, so the raw pipe, rsync and GridFTP rows add a `sync FILE` (fsync) of the
#             received file. The raw pipe row without that fsync is shown as well.
#   client    /usr/bin/time: peak RSS (largest single process) and user+sys CPU.
#   server    xferd: a fresh daemon per run; VmHWM from /proc/PID/status and utime+stime from
#             /proc/PID/stat (after the run minus before it).
#             rsync daemon and socat receiver: a fresh one per run under /usr/bin/time, which
#             counts the CPU of the forked children it reaped; RSS is the largest process.
#             GridFTP: globus-gridftp-server -aa -1 (anonymous ftp://, one session, then it exits),
#             likewise under /usr/bin/time. It forks the session process (a re-exec with -inetd)
#             and reaps it before it exits, so that process's CPU is in the count (checked against
#             a cpuacct cgroup around the server: 0.20 s and 0.21 s for a 64 MiB upload). Run as
#             root, it serves the session as `nobody`: the server root becomes mode 1777 and the
#             source must be readable by nobody, else the GridFTP rows are n/a.
# Peers that cannot be installed (GridFTP) or whose run fails become n/a rows with the reason.
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
BENCH_NAME=bench
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

SIZE_SPEC="${BENCH_SIZE:-2G}"
WORK="${BENCH_DIR:-$REPO/bench/out}"
REPEAT="${REPEAT:-1}"
CONNS="${CONNS:-1 4 8 auto}"
TOOLS="${BENCH_TOOLS:-raw rsync gridftp xfer tls scp}"
TLS_CONNS="${TLS_CONNS:-auto}"
SOCAT_BLOCK="${SOCAT_BLOCK:-1048576}"
GRIDFTP_STREAMS="${GRIDFTP_STREAMS:-1 4}"
GRIDFTP_BLOCK="${GRIDFTP_BLOCK:-1048576}"
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
KEEP="${KEEP:-0}"
for n in $CONNS $TLS_CONNS; do [[ "$n" =~ ^[0-9]+$ || "$n" == auto ]] || die "CONNS/TLS_CONNS: $n is neither a number nor auto"; done
for n in $GRIDFTP_STREAMS; do [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "GRIDFTP_STREAMS: $n is not a positive number"; done
[[ "$GRIDFTP_BLOCK" =~ ^[1-9][0-9]*$ ]] || die "GRIDFTP_BLOCK: $GRIDFTP_BLOCK is not a number of bytes"

SIZE="$(parse_size "$SIZE_SPEC")"
((SIZE > 0)) || die "BENCH_SIZE must be > 0"
CHUNK="$(parse_size "${BENCH_CHUNK:-4M}")"
XFER_CHUNK_ARGS=()
[[ -n "${BENCH_CHUNK:-}" ]] && XFER_CHUNK_ARGS=(--chunk-size "$BENCH_CHUNK")

# --- peers --------------------------------------------------------------------------------------
ensure_apt /usr/bin/time time
ensure_apt ss iproute2
has_tool raw && ensure_apt socat socat
has_tool rsync && ensure_apt rsync rsync
# scp: a throwaway sshd on 127.0.0.1; when it cannot be installed its rows are n/a.
if has_tool scp; then
    need scp /usr/sbin/sshd openssh-server
    need scp scp openssh-client
fi
# GridFTP is optional: when it cannot be installed its rows are n/a (NA[gridftp] says why).
if has_tool gridftp; then
    need gridftp globus-url-copy globus-gass-copy-progs
    need gridftp globus-gridftp-server globus-gridftp-server-progs
fi

# --- processes: every one we start is recorded and ended by PID at exit -------------------------
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    end_pids "${PIDS[@]+"${PIDS[@]}"}"
    if [[ "$KEEP" != 1 && -n "${WORK_READY:-}" ]]; then
        rm -rf "$WORK/src" "$WORK/srv" "$WORK/dst"
    fi
    exit "$rc"
}
on_exit cleanup

# --- work dir -----------------------------------------------------------------------------------
WORK="$(mkdir -p "$WORK" && cd "$WORK" && pwd)"
real_disk "$WORK"
require_free "$WORK" $((3 * SIZE))

rm -rf "$WORK/srv" "$WORK/dst" "$WORK/logs"
mkdir -p "$WORK/src" "$WORK/srv" "$WORK/dst" "$WORK/logs"
WORK_READY=1
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
LOGS="$WORK/logs"

# --- build --------------------------------------------------------------------------------------
if has_tool xfer || has_tool tls; then
    xfer_binaries "$LOGS/build.log"
fi

# --- header -------------------------------------------------------------------------------------
commit="$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
git -C "$REPO" diff --quiet HEAD 2>/dev/null || commit="$commit (+ uncommitted changes)"
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "# xfer loopback benchmark"
echo
echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
echo "- commit: $commit"
echo "- nproc: $(nproc); CPU: ${cpu_model:-unknown}"
echo "- kernel: $(uname -srm)"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (anything else running skews the numbers)"
echo "- file: $SIZE bytes ($SIZE_SPEC); work dir: $WORK ($FSTYPE); repeats: $REPEAT (fastest shown)"
if has_tool gridftp; then
    if [[ -n "${NA[gridftp]:-}" ]]; then
        echo "- GridFTP: n/a (${NA[gridftp]})"
    else
        echo "- GridFTP: $(globus-url-copy -version 2>&1 | head -n1), $(globus-gridftp-server -version 2>&1 | head -n1);" \
            "globus-url-copy -fast -p N -bs $GRIDFTP_BLOCK, server -aa -1 -blocksize $GRIDFTP_BLOCK"
    fi
fi
echo

# --- source file --------------------------------------------------------------------------------
SRC="$WORK/src/src.bin"
if [[ ! -f "$SRC" || "$(stat -c %s "$SRC")" != "$SIZE" ]]; then
    log "creating $SRC ($SIZE bytes of random data)"
    rm -f "$SRC"
    head -c "$SIZE" /dev/urandom >"$SRC.tmp"
    mv "$SRC.tmp" "$SRC"
fi
# The servers' root holds the source under the name src.bin (a hard link: no copy).
ln "$SRC" "$WORK/srv/src.bin"
SRC_SHA="$(sha256sum "$SRC" | awk '{print $1}')"
sync

declare -A VERIFIED=()
verify() { # verify KIND FILE: sha256 of FILE against the source, once per kind of run
    local kind="$1" file="$2" sum
    [[ -n "${VERIFIED[$kind]:-}" ]] && return 0
    [[ -f "$file" ]] || die "$kind: $file was not created"
    sum="$(sha256sum "$file" | awk '{print $1}')"
    if [[ "$sum" != "$SRC_SHA" ]]; then
        die "$kind: CHECKSUM MISMATCH: $file has sha256 $sum, source has $SRC_SHA"
    fi
    VERIFIED[$kind]=1
    log "$kind: sha256 ok"
}

# record TOOL DIRECTION CONNS WALL CLIENT_CPU CLIENT_RSS_KIB SERVER_CPU SERVER_RSS_KIB [USED]
# (USED: the connections xfer's --json reports, for CONNS=auto)
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "${9:-}" >>"$RESULTS"
    log "$(printf '%s %s c=%s: %s s' "$1" "$2" "$3" "$4")"
}

# record_na TOOL DIRECTION CONNS REASON: a row the report shows as n/a, with the reason (one line)
record_na() {
    local reason
    reason="$(tr '\t\n' '  ' <<<"$4" | sed 's/ *$//')"
    printf '%s\t%s\t%s\tn/a\t\t\t\t\t\t%s\n' "$1" "$2" "$3" "$reason" >>"$RESULTS"
    log "$1 $2 c=$3: n/a: $reason"
}

# Flush earlier runs' dirty pages outside the timed part, so no run pays for another's writeback.
settle() { sync; }

# --- raw pipe: one TCP stream, socat to socat ---------------------------------------------------
run_raw() {
    local dst="$WORK/dst/raw.bin" port tpid rpid t0 t_recv t_sync
    rm -f "$dst"
    settle
    port="$(free_port)"
    /usr/bin/time -f "$TIME_FMT" -o "$LOGS/raw-server.time" \
        socat -u -b "$SOCAT_BLOCK" "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr" \
        "OPEN:$dst,creat,trunc" 2>"$LOGS/raw-server.err" &
    tpid=$!
    PIDS+=("$tpid")
    rpid="$(child_of "$tpid")"
    PIDS+=("$rpid")
    wait_listening "$port"
    t0="$(now_ns)"
    /usr/bin/time -f "$TIME_FMT" -o "$LOGS/raw-client.time" \
        timeout -k 5 "$RUN_TIMEOUT" socat -u -b "$SOCAT_BLOCK" "FILE:$SRC" "TCP:127.0.0.1:$port" ||
        die "raw pipe: socat sender failed"
    wait "$tpid" || die "raw pipe: socat receiver failed: $(cat "$LOGS/raw-server.err")"
    t_recv="$(secs_since "$t0")"
    sync "$dst"
    t_sync="$(secs_since "$t0")"
    forget_pid "$tpid"
    forget_pid "$rpid"
    verify raw "$dst"
    local ccpu crss scpu srss
    ccpu="$(time_cpu "$LOGS/raw-client.time")"
    crss="$(time_field "$LOGS/raw-client.time" 2)"
    scpu="$(time_cpu "$LOGS/raw-server.time")"
    srss="$(time_field "$LOGS/raw-server.time" 2)"
    record "raw pipe (socat) + fsync" one-way 1 "$t_sync" "$ccpu" "$crss" "$scpu" "$srss"
    record "raw pipe (socat), no fsync" one-way 1 "$t_recv" "$ccpu" "$crss" "$scpu" "$srss"
    rm -f "$dst"
}

# --- rsync: a fresh daemon per run --------------------------------------------------------------
RSYNC_PORT=""
RSYNC_TPID=""
RSYNC_PID=""
start_rsyncd() {
    RSYNC_PORT="$(free_port)"
    rsyncd_conf "$WORK/rsyncd.conf" bench "$WORK/srv"
    /usr/bin/time -f "$TIME_FMT" -o "$LOGS/rsyncd.time" \
        rsync --daemon --no-detach --address=127.0.0.1 --port="$RSYNC_PORT" \
        --config="$WORK/rsyncd.conf" 2>>"$LOGS/rsyncd.err" &
    RSYNC_TPID=$!
    PIDS+=("$RSYNC_TPID")
    RSYNC_PID="$(child_of "$RSYNC_TPID")"
    PIDS+=("$RSYNC_PID")
    wait_listening "$RSYNC_PORT"
}
stop_rsyncd() {
    # A forked per-connection child may still be exiting; the daemon reaps it, and only then does
    # its CPU show up in the daemon's rusage.
    for _ in $(seq 100); do
        [[ -z "$(ps -o pid= --ppid "$RSYNC_PID")" ]] && break
        sleep 0.05
    done
    kill -TERM "$RSYNC_PID"
    wait "$RSYNC_TPID" || true # rsync exits non-zero on SIGTERM; /usr/bin/time still reports
    forget_pid "$RSYNC_TPID"
    forget_pid "$RSYNC_PID"
}

run_rsync() { # run_rsync push|pull
    local mode="$1" dst from to t0 wall dir
    if [[ "$mode" == push ]]; then
        dst="$WORK/srv/push.bin"
        dir=upload
    else
        dst="$WORK/dst/pull.bin"
        dir=download
    fi
    rm -f "$dst"
    settle
    start_rsyncd
    if [[ "$mode" == push ]]; then
        from="$SRC"
        to="rsync://127.0.0.1:$RSYNC_PORT/bench/push.bin"
    else
        from="rsync://127.0.0.1:$RSYNC_PORT/bench/src.bin"
        to="$dst"
    fi
    t0="$(now_ns)"
    /usr/bin/time -f "$TIME_FMT" -o "$LOGS/rsync-client.time" \
        timeout -k 5 "$RUN_TIMEOUT" rsync -a "$from" "$to" 2>"$LOGS/rsync-client.err" ||
        die "rsync $mode failed: $(cat "$LOGS/rsync-client.err")"
    sync "$dst"
    wall="$(secs_since "$t0")"
    stop_rsyncd
    verify "rsync-$mode" "$dst"
    record "rsync daemon + fsync" "$dir" 1 "$wall" \
        "$(time_cpu "$LOGS/rsync-client.time")" "$(time_field "$LOGS/rsync-client.time" 2)" \
        "$(time_cpu "$LOGS/rsyncd.time")" "$(time_field "$LOGS/rsyncd.time" 2)"
    rm -f "$dst"
}

# --- GridFTP: globus-url-copy against a fresh globus-gridftp-server per run ---------------------
GRIDFTP="GridFTP + fsync"
GRIDFTP_SERVER_ARGS=()
# Run as root, the server serves anonymous sessions as `nobody` (it refuses -aa without
# -anonymous-user): nobody must read the source and write into the server root.
if has_tool gridftp && [[ -z "${NA[gridftp]:-}" ]] && ((EUID == 0)); then
    GRIDFTP_SERVER_ARGS=(-anonymous-user nobody)
    chmod 1777 "$WORK/srv"
    if ! runuser -u nobody -- test -r "$WORK/srv/src.bin" 2>/dev/null ||
        ! runuser -u nobody -- test -w "$WORK/srv" -a -x "$WORK/srv" 2>/dev/null; then
        NA[gridftp]="the server serves as nobody, who cannot read $WORK/srv/src.bin or write $WORK/srv (set BENCH_DIR to a path nobody can reach)"
        log "gridftp: n/a: ${NA[gridftp]}"
    fi
fi

run_gridftp() { # run_gridftp push|pull STREAMS
    local mode="$1" n="$2" kind="gridftp-$1-p$2" dst from to dir port tpid spid t0 wall rc=0 reason=""
    if [[ "$mode" == push ]]; then
        dst="$WORK/srv/gridftp-push-$n.bin"
        dir=upload
    else
        dst="$WORK/dst/gridftp-pull-$n.bin"
        dir=download
    fi
    if [[ -n "${NA[gridftp]:-}" ]]; then
        record_na "$GRIDFTP" "$dir" "$n" "${NA[gridftp]}"
        return 0
    fi
    rm -f "$dst"
    settle
    port="$(free_port)"
    # -1: serve one session and exit, so /usr/bin/time sees the session process's CPU (it is
    # forked and reaped by the server). GLOBUS_USAGE_OPTOUT: no usage statistics over UDP.
    GLOBUS_USAGE_OPTOUT=1 /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind-server.time" \
        globus-gridftp-server -aa "${GRIDFTP_SERVER_ARGS[@]+"${GRIDFTP_SERVER_ARGS[@]}"}" -1 \
        -p "$port" -control-interface 127.0.0.1 -data-interface 127.0.0.1 \
        -blocksize "$GRIDFTP_BLOCK" -l "$LOGS/$kind-server.log" >"$LOGS/$kind-server.out" 2>&1 &
    tpid=$!
    PIDS+=("$tpid")
    spid="$(child_of "$tpid")"
    PIDS+=("$spid")
    for _ in $(seq 200); do
        [[ -n "$(ss -Hltn "sport = :$port")" ]] && break
        kill -0 "$tpid" 2>/dev/null || break
        sleep 0.05
    done
    if [[ -z "$(ss -Hltn "sport = :$port")" ]]; then
        reason="globus-gridftp-server did not listen on port $port: $(tail -n1 "$LOGS/$kind-server.out")"
    else
        if [[ "$mode" == push ]]; then
            from="file://$SRC"
            to="ftp://127.0.0.1:$port$dst"
        else
            from="ftp://127.0.0.1:$port$WORK/srv/src.bin"
            to="file://$dst"
        fi
        t0="$(now_ns)"
        GLOBUS_USAGE_OPTOUT=1 /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.time" \
            timeout -k 5 "$RUN_TIMEOUT" globus-url-copy -fast -p "$n" -bs "$GRIDFTP_BLOCK" "$from" "$to" \
            >"$LOGS/$kind.out" 2>"$LOGS/$kind.err" || rc=$?
        if ((rc == 0)); then
            sync "$dst"
            wall="$(secs_since "$t0")"
        elif ((rc == 124)); then
            reason="globus-url-copy timed out after $RUN_TIMEOUT s"
        else
            reason="globus-url-copy exited with status $rc: $(grep -v '^ *$' "$LOGS/$kind.err" | tail -n2)"
        fi
    fi
    # The server exits after its one session; end it if it has not within 10 s (1 s when the
    # copy failed: there may have been no session).
    for _ in $(seq "$([[ -z "$reason" ]] && echo 100 || echo 10)"); do
        kill -0 "$tpid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$tpid" 2>/dev/null; then
        [[ -n "$reason" ]] || log "warning: $kind: globus-gridftp-server -1 still running 10 s after the copy; ending it (its CPU may be undercounted)"
        kill -TERM "$spid" 2>/dev/null || true
    fi
    wait "$tpid" 2>/dev/null || true
    forget_pid "$tpid"
    forget_pid "$spid"
    if [[ -n "$reason" ]]; then
        record_na "$GRIDFTP" "$dir" "$n" "$reason (logs: $LOGS/$kind*)"
        rm -f "$dst"
        return 0
    fi
    verify "$kind" "$dst"
    record "$GRIDFTP" "$dir" "$n" "$wall" \
        "$(time_cpu "$LOGS/$kind.time")" "$(time_field "$LOGS/$kind.time" 2)" \
        "$(time_cpu "$LOGS/$kind-server.time")" "$(time_field "$LOGS/$kind-server.time" 2)"
    rm -f "$dst"
}

# --- scp: AES-128-GCM to a throwaway sshd on an ephemeral port, a fresh one per run ------------
SCP="scp aes128-gcm + fsync"
SSH_DIR=""
make_ssh_keys() { # a host key, a client key authorized for root, and the sshd configuration
    SSH_DIR="$WORK/ssh"
    rm -rf "$SSH_DIR"
    mkdir -p "$SSH_DIR" /run/sshd
    chmod 700 "$SSH_DIR"
    ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/client_key"
    cp "$SSH_DIR/client_key.pub" "$SSH_DIR/authorized_keys"
    cat >"$SSH_DIR/sshd_config" <<CONF
HostKey $SSH_DIR/host_key
AuthorizedKeysFile $SSH_DIR/authorized_keys
ListenAddress 127.0.0.1
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Ciphers aes128-gcm@openssh.com
Subsystem sftp internal-sftp
CONF
}

run_scp() { # run_scp push|pull
    local mode="$1" dst dir t0 wall port tpid rc=0 kind="scp-$1" from to
    if [[ -n "${NA[scp]:-}" ]]; then
        record_na "$SCP" "$([[ "$mode" == push ]] && echo upload || echo download)" 1 "${NA[scp]}"
        return 0
    fi
    [[ -n "$SSH_DIR" ]] || make_ssh_keys
    if [[ "$mode" == push ]]; then
        dst="$WORK/srv/scp.bin"
        dir=upload
        from="$SRC"
        to="root@127.0.0.1:$dst"
    else
        dst="$WORK/dst/scp.bin"
        dir=download
        from="root@127.0.0.1:$WORK/srv/src.bin"
        to="$dst"
    fi
    rm -f "$dst"
    settle
    port="$(free_port)"
    # -D: no detaching, so /usr/bin/time sees it and the session processes it reaps.
    /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind-server.time" \
        /usr/sbin/sshd -D -e -p "$port" -f "$SSH_DIR/sshd_config" 2>"$LOGS/$kind-server.err" &
    tpid=$!
    PIDS+=("$tpid")
    wait_listening "$port"
    t0="$(now_ns)"
    /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.time" \
        timeout -k 5 "$RUN_TIMEOUT" scp -q -c aes128-gcm@openssh.com -P "$port" -i "$SSH_DIR/client_key" \
        -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        "$from" "$to" >"$LOGS/$kind.out" 2>"$LOGS/$kind.err" || rc=$?
    if ((rc == 0)); then
        sync "$dst"
        wall="$(secs_since "$t0")"
    fi
    kill -TERM "$(child_of "$tpid")" 2>/dev/null || true
    wait "$tpid" 2>/dev/null || true
    forget_pid "$tpid"
    if ((rc != 0)); then
        record_na "$SCP" "$dir" 1 "scp exited with status $rc: $(tail -n2 "$LOGS/$kind.err") (logs: $LOGS/$kind*)"
        return 0
    fi
    verify "$kind" "$dst"
    record "$SCP" "$dir" 1 "$wall" \
        "$(time_cpu "$LOGS/$kind.time")" "$(time_field "$LOGS/$kind.time" 2)" \
        "$(time_cpu "$LOGS/$kind-server.time")" "$(time_field "$LOGS/$kind-server.time" 2)"
    rm -f "$dst"
}

# --- xfer: a fresh xferd per run, so its VmHWM and CPU belong to that run alone -----------------
XFERD_PID=""
XFERD_ADDR=""
TLS_DIR=""
make_tls_certs() { # a throwaway CA and a certificate for 127.0.0.1, for the TLS runs
    TLS_DIR="$WORK/tls"
    mkdir -p "$TLS_DIR"
    (
        cd "$TLS_DIR"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
            -subj "/CN=xfer bench CA" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout key.pem -out leaf.csr -subj "/CN=127.0.0.1" 2>/dev/null
        printf "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n" >ext.cnf
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem \
            -days 2 -extfile ext.cnf 2>/dev/null
    ) || die "making TLS certificates with openssl failed"
}

run_xfer() { # run_xfer send|recv CONNS [tls] (CONNS: a number, or auto: no -c)
    local mode="$1" n="$2" tls="${3:-}" dst t0 wall cpu0 cpu1 hwm dir args kind="xfer-$1-$2${3:+-tls}" conns=() used
    local tool="xfer" daemon_args=() client_args=()
    if [[ -n "$tls" ]]; then
        tool="xfer (TLS)"
        daemon_args=(--tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem")
        client_args=(--tls --ca "$TLS_DIR/ca.pem")
    fi
    if [[ "$mode" == send ]]; then
        dst="$WORK/srv/bench-$n.bin"
        dir=upload
    else
        dst="$WORK/dst/recv-$n.bin"
        dir=download
    fi
    rm -f "$dst" "$(dirname "$dst")/.$(basename "$dst").xfer-part" \
        "$(dirname "$dst")/.$(basename "$dst").xfer-state"
    settle
    start_xferd "$WORK/srv" "${daemon_args[@]+"${daemon_args[@]}"}"
    [[ "$n" == auto ]] || conns=(-c "$n")
    args=(-q --json "${conns[@]+"${conns[@]}"}" "${XFER_CHUNK_ARGS[@]+"${XFER_CHUNK_ARGS[@]}"}" "${client_args[@]+"${client_args[@]}"}")
    if [[ "$mode" == send ]]; then
        args=(send "${args[@]}" "$SRC" "$XFERD_ADDR" --as "bench-$n.bin")
    else
        args=(recv "${args[@]}" src.bin "$XFERD_ADDR" -o "$dst")
    fi
    cpu0="$(proc_cpu "$XFERD_PID")"
    t0="$(now_ns)"
    if ! /usr/bin/time -f "$TIME_FMT" -o "$LOGS/$kind.time" \
        timeout -k 5 "$RUN_TIMEOUT" "$XFER" "${args[@]}" \
        >"$LOGS/$kind.json" 2>"$LOGS/$kind.err"; then
        die "xfer ${args[*]} failed: $(cat "$LOGS/$kind.err")"
    fi
    wall="$(secs_since "$t0")"
    cpu1="$(proc_cpu "$XFERD_PID")"
    hwm="$(proc_hwm_kib "$XFERD_PID")"
    stop_xferd
    used="$(python3 -c 'import json, sys; print(json.loads(sys.stdin.read())["connections"])' <"$LOGS/$kind.json")" ||
        die "$kind: --json output is not one JSON object with connections: $(cat "$LOGS/$kind.json")"
    verify "$kind" "$dst"
    record "$tool" "$dir" "$n" "$wall" \
        "$(time_cpu "$LOGS/$kind.time")" "$(time_field "$LOGS/$kind.time" 2)" \
        "$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$cpu0" "$cpu1")" \
        "$hwm" "$used"
    rm -f "$dst"
}

# --- runs ---------------------------------------------------------------------------------------
for rep in $(seq "$REPEAT"); do
    log "round $rep of $REPEAT"
    has_tool raw && run_raw
    if has_tool rsync; then
        run_rsync push
        run_rsync pull
    fi
    if has_tool gridftp; then
        for n in $GRIDFTP_STREAMS; do run_gridftp push "$n"; done
        for n in $GRIDFTP_STREAMS; do run_gridftp pull "$n"; done
    fi
    if has_tool xfer; then
        for n in $CONNS; do run_xfer send "$n"; done
        for n in $CONNS; do run_xfer recv "$n"; done
    fi
    if has_tool tls; then
        [[ -n "$TLS_DIR" ]] || make_tls_certs
        for n in $TLS_CONNS; do run_xfer send "$n" tls; done
        for n in $TLS_CONNS; do run_xfer recv "$n" tls; done
    fi
    if has_tool scp; then
        run_scp push
        run_scp pull
    fi
done

python3 "$BENCH_HOME/report.py" "$RESULTS" "$SIZE" "$CHUNK"
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Raw results (every run): $RESULTS; logs: $LOGS"
