#!/usr/bin/env bash
# Compression benchmark: xfer --compress auto vs --compress off vs rsync -z --compress-choice=zstd
# (to an rsync daemon; the tool rsync-plain is rsync -a without -z, for xfer's uncompressed lead)
# vs scp -C (to an sshd with throwaway keys), uploading three data sets
# through the WAN emulator's wan profile (shared/wanem: 50 ms RTT, 0.01 % loss, 500 Mbit/s;
# netns wa = client, wb = server, TCP Fast Open on in both as the xferd package sets it), then
# xfer auto vs off on loopback. Not a test: run it by hand,
# as root, under `flock /work/wt/bench.lock`.
#
#   bench/compress.sh
#   CSV_SIZE=128M RANDOM_SIZE=64M COMPRESS_CAP=60 bench/compress.sh   # a short run
#
# Data sets: docs, an installed HTML documentation tree nobody here wrote: the Rust toolchain's
# (rustup's share/doc/rust/html, 782 MB in 52k files for 1.95) when installed, else /usr/share/doc
# (and /usr/share/man when the two together stay under DOCS_MAX, default 512M), or DOCS_SRC;
# copied with xfer send -r, rsync -a and scp -r;
# csv, a generated CSV of CSV_SIZE (default 512M); random, RANDOM_SIZE of /dev/urandom (default
# 256M). Each run starts a fresh server, is capped at COMPRESS_CAP seconds (default 120; a capped
# run is marked), and reports wall seconds, MB/s (source bytes / wall), the ratio to xfer
# --compress off on the same data and link, xfer's wire bytes (its --json), the CPU seconds per GiB
# of client and server (user + sys, /usr/bin/time; xferd: /proc), and peak RSS of both.
# Environment: CSV_SIZE, RANDOM_SIZE, DOCS_SRC, DOCS_MAX, COMPRESS_CAP, REPEAT (runs per cell, fastest
# kept; default 1), DATA (default "csv random docs"), TOOLS (default "xfer-off xfer-auto rsync scp";
# rsync-plain adds rsync without -z; xfer-LEVEL (e.g. xfer-1, xfer-3) is xfer --compress LEVEL;
# rsync-durable and rsync-plain-durable are rsync -z and rsync followed by a flush of the receiving
# filesystem (`sync -f`) inside the measured time, as xfer's tree copy ends with its `Sync`;
# loopback runs xfer only; base-off and base-auto are xfer off and auto from the binaries in
# XFER_BASE_DIR, for an A/B of two builds in one run), XFER_ARGS (more xfer flags, e.g. -v: each run's log is kept in logs/), XFER_BIN_DIR (skip cargo build), COMPRESS_DIR (work dir, default
# bench/out/compress), LOOPBACK=0 (skip the loopback rows), WAN=0 (skip the WAN rows), PREPARE=1 (make the data and stop, so
# that it is made outside the benchmark lock), FRESH_FS=0 (receive into directories of the work
# disk instead of a new filesystem per run, see SRVS below), LOOP_DIRECT_IO=1 (that filesystem's
# loop device writes to its backing file with O_DIRECT, as a disk would, see fresh_fs).
# With REPEAT > 1 the tools of a data set run in the opposite order every other round: the second
# run of a pair is biased (page cache, writeback, the disk's state), and the fastest of both
# orders is kept.
set -euo pipefail
# Descriptors inherited from the caller (`flock`'s lock among them) are closed, so that the
# emulator, which outlives a failed run, never keeps the benchmark lock held for everyone.
for fd in 3 4 5 6 7 8 9; do eval "exec $fd>&-"; done

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_HOME/.." && pwd)"
cd "$REPO"
# shellcheck disable=SC2034 # read by lib.sh
BENCH_NAME=compress-bench
# shellcheck source=bench/lib.sh
source "$BENCH_HOME/lib.sh"

CSV_SIZE="$(parse_size "${CSV_SIZE:-512M}")"
RANDOM_SIZE="$(parse_size "${RANDOM_SIZE:-256M}")"
DOCS_MAX="$(parse_size "${DOCS_MAX:-512M}")"
CAP="${COMPRESS_CAP:-120}"
REPEAT="${REPEAT:-1}"
LOOPBACK="${LOOPBACK:-1}"
LOOP_DIRECT_IO="${LOOP_DIRECT_IO:-0}"
WAN="${WAN:-1}"
PREPARE="${PREPARE:-0}"
DATA="${DATA:-csv random docs}"
TOOLS="${TOOLS:-xfer-off xfer-auto rsync scp}"
read -r -a XFER_ARGS <<<"${XFER_ARGS:-}"
WORK="${COMPRESS_DIR:-$REPO/bench/out/compress}"
[[ $EUID == 0 ]] || die "run as root (network namespaces)"
WANEM_SRC=/work/shared/wanem
[[ -d "$WANEM_SRC" ]] || WANEM_SRC="$REPO/../shared/wanem"
IP_B=10.78.0.2
WAN_ARGS=(--delay-ms 25 --loss 0.0001 --rate-mbit 500 --seed 1) # the system's congestion control

mkdir -p "$WORK"/{src,logs,conf}
WORK="$(cd "$WORK" && pwd)"
real_disk "$WORK"
# Namespaces and a run directory of its own (as bench/mirror.sh), so that neither another
# benchmark's emulator nor one it left behind can be taken for this one's.
export WAN_NS_A=xc-a WAN_NS_B=xc-b WANEM_RUN="$WORK/wanem-run"
LOGS="$WORK/logs"
# Each run receives into a directory of its own under SRVS, all removed at the end: on ext4
# without a journal (this machine's disk) the kernel skips inodes freed in the last minute when
# it allocates one (fs/ext4/ialloc.c, recently_deleted), so a run that follows the removal of
# the previous run's 52k files spends most of its server CPU looking for inodes (the docs tree
# took 3x as long on loopback). DELETED_AT records the last removal; a run waits a minute past it.
# That minute is not enough when the inode table is still dirty (up to 6 min), nor when another
# benchmark deletes a tree on the same disk. So by default (FRESH_FS=1) every run receives into a
# new ext4 made for it on a loop device (no journal, as this disk; inode tables written at mkfs,
# so no lazy initialisation runs beside the measurement), unmounted and deleted after the run:
# every tool writes to the same untouched filesystem.
SRVS="$WORK/srv"
FRESH_FS="${FRESH_FS:-1}"
SRV=""
RUN_NO=0
DELETED_AT="$WORK/srv.deleted"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
WAN_IS_UP=0
RSYNCD_PID=""
SSHD_PID=""
cleanup() {
    [[ -n "$RSYNCD_PID" ]] && end_pids --tree "$RSYNCD_PID"
    [[ -n "$SSHD_PID" ]] && end_pids --tree "$SSHD_PID"
    ((${#PIDS[@]} == 0)) || end_pids "${PIDS[@]}"
    ((WAN_IS_UP == 0)) || "$WORK/wanem/wan.sh" down >"$LOGS/wan-down.log" 2>&1 || true
    remove_trees
}
# remove_trees: removes every run's receiving directory, flushed, and notes when.
remove_trees() {
    [[ -d "$SRVS" ]] || return 0
    local m
    for m in "$SRVS"/*; do
        ! mountpoint -q "$m" || umount "$m"
    done
    rm -rf "$SRVS"
    sync
    date +%s >"$DELETED_AT"
}
# Trees a failed run left behind go now; the runs start a minute after the last removal.
remove_trees
if [[ -f "$DELETED_AT" && "$PREPARE" != 1 && "$FRESH_FS" != 1 ]]; then
    wait_s=$(($(cat "$DELETED_AT") + 65 - $(date +%s)))
    ((wait_s <= 0)) || { log "waiting ${wait_s}s for the inodes freed by the last removal"; sleep "$wait_s"; }
fi
on_exit cleanup

need rsync rsync rsync
need scp /usr/sbin/sshd openssh-server
ensure_apt zstd zstd
[[ "$PREPARE" == 1 ]] || xfer_binaries "$LOGS/build.log"

# --- data ---------------------------------------------------------------------------------------
# The documentation tree: DOCS_SRC, else the Rust docs of an installed toolchain, else the
# system's. A marker names the source, so that a work directory made from another is remade.
if [[ -z "${DOCS_SRC:-}" ]]; then
    for d in "${RUSTUP_HOME:-$HOME/.rustup}"/toolchains/stable-*/share/doc/rust/html \
        "$(rustc --print sysroot 2>/dev/null)/share/doc/rust/html"; do
        [[ -d "$d" ]] && DOCS_SRC="$d" && break
    done
fi
DOCS_SRC="${DOCS_SRC:-/usr/share/doc}"
DOCS="$WORK/src/docs"
if [[ ! -d "$DOCS" || "$(cat "$WORK/src/docs.from" 2>/dev/null)" != "$DOCS_SRC" ]]; then
    log "copying the documentation tree $DOCS_SRC"
    rm -rf "$DOCS"
    mkdir -p "$DOCS"
    cp -a "$DOCS_SRC" "$DOCS/doc"
    if [[ "$DOCS_SRC" == /usr/share/doc ]] &&
        (($(du -sb /usr/share/doc /usr/share/man 2>/dev/null | awk '{s += $1} END {print s + 0}') < DOCS_MAX)); then
        cp -a /usr/share/man "$DOCS/man" 2>/dev/null || true
    fi
    # Links out of the tree mean nothing at the destination; keep the bytes.
    find "$DOCS" -type l -delete
    echo "$DOCS_SRC" >"$WORK/src/docs.from"
fi
CSV="$WORK/src/data.csv"
if [[ ! -f "$CSV" || $(stat -c %s "$CSV") != "$CSV_SIZE" ]]; then
    log "generating a $((CSV_SIZE >> 20)) MiB CSV"
    python3 - "$CSV" "$CSV_SIZE" <<'EOF'
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
cities = ["Lisbon", "Oslo", "Lyon", "Turin", "Graz", "Ghent", "Porto", "Bergen", "Aarhus", "Brno"]
with open(path, "w") as f:
    header = "id,timestamp,customer,city,amount,currency,status,note\n"
    f.write(header)
    written, row = len(header), 0
    while written < size:
        lines = []
        for _ in range(10000):
            row += 1
            lines.append(f"{row},2026-{rng.randint(1,12):02d}-{rng.randint(1,28):02d}T{rng.randint(0,23):02d}:{rng.randint(0,59):02d}:00Z,"
                         f"cust-{rng.randint(1, 200000)},{rng.choice(cities)},{rng.randint(1, 999999) / 100:.2f},EUR,"
                         f"{rng.choice(['paid', 'open', 'refunded', 'disputed'])},order {row} shipped to {rng.choice(cities)}\n")
        chunk = "".join(lines)
        f.write(chunk[: size - written])
        written += min(len(chunk), size - written)
EOF
fi
RAND="$WORK/src/random.bin"
[[ -f "$RAND" && $(stat -c %s "$RAND") == "$RANDOM_SIZE" ]] ||
    head -c "$RANDOM_SIZE" /dev/urandom >"$RAND"
DOCS_BYTES="$(find "$DOCS" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
DOCS_FILES="$(find "$DOCS" -type f | wc -l)"
CSV_ZSTD="$(zstd -1 -c "$CSV" | wc -c)"
if [[ "$PREPARE" == 1 ]]; then
    log "data ready in $WORK/src"
    exit 0
fi

# --- servers -------------------------------------------------------------------------------------
SSH_DIR="$WORK/conf/ssh"
rm -rf "$SSH_DIR"
mkdir -p "$SSH_DIR" /run/sshd
chmod 700 "$SSH_DIR"
ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/host" -C compress-bench-host
ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/id" -C compress-bench-client
cp "$SSH_DIR/id.pub" "$SSH_DIR/authorized_keys"
chmod 600 "$SSH_DIR/authorized_keys"
SSH_OPTS=(-i "$SSH_DIR/id" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
    -o LogLevel=ERROR -o IdentitiesOnly=yes)

# bin_of TOOL NAME: the xfer or xferd binary (NAME) a tool runs: XFER_BASE_DIR's for base-*.
bin_of() {
    case "$1" in
        base-*) echo "${XFER_BASE_DIR:?base-* tools need XFER_BASE_DIR}/$2" ;;
        *) if [[ "$2" == xferd ]]; then echo "$XFERD"; else echo "$XFER"; fi ;;
    esac
}

# serve NETNS ADDR TOOL: a fresh server for one run; sets SERVER_PID and PORT.
serve() {
    local ns=(ip netns exec "$1") addr="$2"
    [[ "$1" == - ]] && ns=()
    PORT="$(free_port)"
    RUN_NO=$((RUN_NO + 1))
    SRV="$SRVS/$RUN_NO"
    mkdir -p "$SRV"
    [[ "$FRESH_FS" != 1 ]] || fresh_fs "$SRV"
    case "$3" in
        xfer-* | base-*)
            # Off loopback xferd wants a token or an explicit --allow-anonymous.
            "${ns[@]}" "$(bin_of "$3" xferd)" --listen "$addr:$PORT" --root "$SRV" --allow-anonymous --log-level warn >"$LOGS/xferd.out" 2>>"$LOGS/xferd.err" &
            SERVER_PID=$! ;;
        rsync | rsync-plain | rsync-durable | rsync-plain-durable)
            rsyncd_conf "$WORK/conf/rsyncd.conf" bench "$SRV"
            "${ns[@]}" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/server.time" \
                rsync --daemon --no-detach --address "$addr" --port "$PORT" --config "$WORK/conf/rsyncd.conf" &
            SERVER_PID=$! ;;
        scp)
            cat >"$SSH_DIR/sshd_config" <<EOF
Port $PORT
ListenAddress $addr
HostKey $SSH_DIR/host
PidFile none
AuthorizedKeysFile $SSH_DIR/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
EOF
            "${ns[@]}" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/server.time" /usr/sbin/sshd -D -e -f "$SSH_DIR/sshd_config" 2>"$LOGS/sshd.err" &
            SERVER_PID=$! ;;
    esac
    PIDS+=("$SERVER_PID")
    if [[ "$1" == - ]]; then wait_listening "$PORT"; else wait_listening "$PORT" "$1"; fi
}

# fresh_fs DIR: mounts a new, empty ext4 on DIR, sized for the largest data set twice over.
fresh_fs() {
    local img="$1.img" size=$((2 * (DOCS_BYTES > CSV_SIZE ? DOCS_BYTES : CSV_SIZE) + (512 << 20)))
    ((size > 2 * RANDOM_SIZE)) || size=$((2 * RANDOM_SIZE + (512 << 20)))
    size=$(((size + 4095) / 4096 * 4096)) # whole sectors, as a loop device reads them
    truncate -s "$size" "$img"
    mkfs.ext4 -q -F -O ^has_journal -E lazy_itable_init=0,lazy_journal_init=0 "$img"
    if [[ "$LOOP_DIRECT_IO" == 1 ]]; then
        # The loop device writes to its backing file with O_DIRECT, as a disk takes DMA: without
        # it, every byte written back is copied once more, into the backing file's page cache,
        # by the loop device's kworker (1.6 s of CPU in the docs row, all of it inside the time
        # of a tool that flushes before it returns, none of it inside the time of one that
        # does not). Detached at once: the kernel frees it when the filesystem is unmounted.
        local dev
        dev="$(losetup --find --show --direct-io=on "$img")"
        mount "$dev" "$1"
        losetup -d "$dev"
    else
        mount -o loop "$img" "$1"
    fi
}

# drop_fs: the run's filesystem goes once the run is measured.
drop_fs() {
    [[ "$FRESH_FS" == 1 ]] || return 0
    umount "$SRV"
    rm -f "$SRV.img"
    rmdir "$SRV"
}

# unserve TOOL: stops the server; sets S_CPU and S_RSS (KiB).
unserve() {
    if [[ "$1" == xfer-* || "$1" == base-* ]]; then
        S_CPU="$(proc_cpu "$SERVER_PID")"
        S_RSS="$(proc_hwm_kib "$SERVER_PID")"
        end_pids "$SERVER_PID"
    else
        # The server (and what it forked) alone: its /usr/bin/time wrapper outlives it and
        # writes what it used.
        end_pids --tree "$(child_of "$SERVER_PID")"
        wait "$SERVER_PID" 2>/dev/null || true
        S_CPU="$(time_cpu "$LOGS/server.time" 2>/dev/null || echo 0)"
        S_RSS="$(time_field "$LOGS/server.time" 2 2>/dev/null || echo 0)"
    fi
    forget_pid "$SERVER_PID"
}

# run LINK DATA TOOL: one upload; appends a row to RESULTS.
run() {
    local link="$1" data="$2" tool="$3" ns=() srv_ns=- addr=127.0.0.1 src bytes cmd wire="" capped=""
    if [[ "$link" == wan ]]; then ns=(ip netns exec "$WAN_NS_A"); srv_ns="$WAN_NS_B"; addr="$IP_B"; fi
    case "$data" in
        docs) src="$DOCS"; bytes="$DOCS_BYTES" ;;
        csv) src="$CSV"; bytes="$CSV_SIZE" ;;
        random) src="$RAND"; bytes="$RANDOM_SIZE" ;;
    esac
    serve "$srv_ns" "$addr" "$tool"
    local r=()
    [[ "$data" == docs ]] && r=(-r)
    case "$tool" in
        xfer-* | base-*)
            cmd=("$(bin_of "$tool" xfer)" send "${r[@]}" --json "${XFER_ARGS[@]}" --compress "${tool#*-}" "$src" "$addr:$PORT" --as "$data") ;;
        rsync | rsync-durable)
            cmd=(rsync -a -z --compress-choice=zstd "$src" "rsync://$addr:$PORT/bench/") ;;
        rsync-plain | rsync-plain-durable)
            cmd=(rsync -a "$src" "rsync://$addr:$PORT/bench/") ;;
        scp)
            cmd=(scp -q -C "${r[@]}" -P "$PORT" "${SSH_OPTS[@]}" "$src" "root@$addr:$SRV/") ;;
    esac
    # The previous run's writeback (hundreds of MB, tens of thousands of files) ends before the
    # clock starts: otherwise the second run of every pair pays for the first (1.3-1.4x measured).
    sync
    local t0
    t0="$(now_ns)"
    "${ns[@]}" timeout "$CAP" /usr/bin/time -f "$TIME_FMT" -o "$LOGS/client.time" "${cmd[@]}" \
        >"$LOGS/client.out" 2>"$LOGS/client.err" || capped=" (capped or failed: $(tail -c 200 "$LOGS/client.err" | tr '\n' ' '))"
    # rsync returns with the files in the page cache, xfer once they are on disk: the durable
    # variant waits for the disk too, so that both are timed to the same point.
    [[ "$tool" != rsync*-durable ]] || sync -f "$SRV"
    local secs
    secs="$(secs_since "$t0")"
    cp "$LOGS/client.err" "$LOGS/$link-$data-$tool.err"
    unserve "$tool"
    drop_fs
    [[ "$tool" == xfer-* || "$tool" == base-* ]] && wire="$(python3 -c 'import json,sys
w = 0
for line in open(sys.argv[1]):
    try: d = json.loads(line)
    except ValueError: continue
    w += d.get("wire_bytes", d.get("bytes_transferred", 0))
print(w)' "$LOGS/client.out" 2>/dev/null || echo)"
    local c_cpu c_rss
    c_cpu="$(time_cpu "$LOGS/client.time" 2>/dev/null || echo 0)"
    c_rss="$(time_field "$LOGS/client.time" 2 2>/dev/null || echo 0)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$link" "$data" "$tool" "$secs" "$bytes" \
        "$wire" "$c_cpu" "$S_CPU" "$c_rss" "$S_RSS" "$capped" >>"$RESULTS"
    log "$link $data $tool: ${secs}s$capped"
}

# --- runs ----------------------------------------------------------------------------------------
# in_order ROUND TOOL...: the tools as given in odd rounds, reversed in even ones.
in_order() {
    local round="$1"
    shift
    if ((round % 2)); then echo "$@"; else printf '%s\n' "$@" | tac | tr '\n' ' '; fi
}

# A private copy of the emulator, as bench/mirror.sh makes it (shared/wanem is read-only; its
# wan.sh builds next to itself).
if [[ "$WAN" == 1 ]]; then
    mkdir -p "$WORK/wanem"
    for f in wan.sh wanem.c; do
        cmp -s "$WANEM_SRC/$f" "$WORK/wanem/$f" || install -m 0755 "$WANEM_SRC/$f" "$WORK/wanem/$f"
    done
    WAN_IS_UP=1 # a failed `up` may leave namespaces: `down` at exit either way
    "$WORK/wanem/wan.sh" up "${WAN_ARGS[@]}" >"$LOGS/wan-up.log" 2>&1 || die "wan.sh up failed: $(cat "$LOGS/wan-up.log")"
    fast_open_on "$WAN_NS_A" "$WAN_NS_B"
    for round in $(seq "$REPEAT"); do
        for data in $DATA; do
            for tool in $(in_order "$round" $TOOLS); do
                run wan "$data" "$tool"
            done
        done
    done
    "$WORK/wanem/wan.sh" down >"$LOGS/wan-down.log" 2>&1 || true
    WAN_IS_UP=0
fi
if [[ "$LOOPBACK" == 1 ]]; then
    for round in $(seq "$REPEAT"); do
        for data in $DATA; do
            for tool in $(in_order "$round" $TOOLS); do
                [[ "$tool" == xfer-* || "$tool" == base-* ]] || continue
                run loopback "$data" "$tool"
            done
        done
    done
fi

# --- report --------------------------------------------------------------------------------------
echo "# xfer compression benchmark (bench/compress.sh), $(date -u +%Y-%m-%d)"
echo
echo "- machine: $(hostname), $(nproc) CPUs, $(uname -srm); disk: $WORK ($FSTYPE); commit $(git -C "$REPO" rev-parse --short HEAD)"
echo "- wan: shared/wanem ${WAN_ARGS[*]}; loopback: 127.0.0.1; uploads; fastest of $REPEAT (order alternated); cap ${CAP}s; receiving filesystem: $([[ $FRESH_FS == 1 ]] && echo "a new ext4 per run" || echo "directories of the work disk")"
echo "- data: docs = $DOCS_SRC $((DOCS_BYTES >> 20)) MiB in $DOCS_FILES files; csv = $((CSV_SIZE >> 20)) MiB generated (zstd -1: $((CSV_ZSTD >> 20)) MiB); random = $((RANDOM_SIZE >> 20)) MiB"
echo
python3 - "$RESULTS" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    link, data, tool, secs, size, wire, ccpu, scpu, crss, srss, note = (line.rstrip("\n").split("\t") + [""] * 11)[:11]
    key = (link, data, tool)
    if key not in rows or float(secs) < float(rows[key][0]):
        rows[key] = (secs, size, wire, ccpu, scpu, crss, srss, note)
print("| link | data | tool | s | MB/s | vs off | wire/raw | client CPU s/GiB | server CPU s/GiB | client RSS MiB | server RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (link, data, tool), (secs, size, wire, ccpu, scpu, crss, srss, note) in rows.items():
    secs, size = float(secs), int(size)
    off = rows.get((link, data, "base-off" if tool.startswith("base-") else "xfer-off"))
    vs = f"{float(off[0]) / secs:.2f}x" if off else ""
    gib = size / 2**30
    ratio = f"{int(wire) / size:.2f}" if wire else ""
    f = lambda x: f"{float(x or 0) / gib:.1f}"
    m = lambda x: f"{int(float(x or 0)) / 1024:.0f}"
    print(f"| {link} | {data} | {tool}{note and ' *'} | {secs:.1f} | {size / secs / 1e6:.0f} | {vs} | {ratio} | {f(ccpu)} | {f(scpu)} | {m(crss)} | {m(srss)} |")
print()
print("`*`: capped at the time limit or failed (see the log); `vs off`: xfer --compress off time / this time.")
EOF
