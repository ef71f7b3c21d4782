#!/usr/bin/env bash
# The floor of a delta on this machine: what the work a delta must do costs at best, each step
# alone. Not a test: run by hand under `flock /work/wt/bench.lock`, with the workloads of
# bench/delta.sh (KEEP=1) under DELTA_DIR.
#   bench/delta-floor.sh [OLD_FILE NEW_FILE]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${DELTA_DIR:-$REPO/bench/out/delta}"
OLD="${1:-$WORK/data/old/inplace.bin}"
NEW="${2:-$WORK/data/new/inplace.bin}"
SCRATCH="$(dirname "$WORK")/floor"
mkdir -p "$SCRATCH"
trap 'rm -rf "$SCRATCH"' EXIT
t() { # t LABEL COMMAND...: wall, user and system seconds of COMMAND
    local label="$1"
    shift
    /usr/bin/time -f "| $label | %e | %U | %S |" "$@" 2>&1 >/dev/null | tail -n1
}
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); $(stat -c %s "$NEW") bytes"
echo
cargo build --release -q -p xfer-core --example delta_floor
echo '```'
"$REPO/target/release/examples/delta_floor" "$NEW"
echo '```'
echo
echo "| step | wall s | user s | sys s |"
echo "|---|---|---|---|"
cat "$OLD" "$NEW" >/dev/null
t "read the old file (dd bs=4M, page cache)" dd if="$OLD" of=/dev/null bs=4M
sync -f "$SCRATCH"
t "write 2 GiB into a new file (dd bs=4M, page cache)" dd if="$OLD" of="$SCRATCH/a" bs=4M
t "fdatasync of those fresh pages (dd conv=fdatasync, no write)" dd if=/dev/null of="$SCRATCH/a" conv=notrunc,fdatasync
rm -f "$SCRATCH/a"; sync -f "$SCRATCH"
t "write 2 GiB into a preallocated file (fallocate; dd)" sh -c "fallocate -l $(stat -c %s "$OLD") '$SCRATCH/a' && dd if='$OLD' of='$SCRATCH/a' bs=4M conv=notrunc"
t "fdatasync of those" dd if=/dev/null of="$SCRATCH/a" conv=notrunc,fdatasync
rm -f "$SCRATCH/a"; sync -f "$SCRATCH"
t "copy_file_range 2 GiB (python os.copy_file_range)" python3 -c "
import os,sys
i=os.open(sys.argv[1],os.O_RDONLY); o=os.open(sys.argv[2],os.O_WRONLY|os.O_CREAT,0o600)
n=os.fstat(i).st_size; p=0
while p<n: p+=os.copy_file_range(i,o,min(n-p,1<<30),p,p)
" "$OLD" "$SCRATCH/a"
t "fdatasync of those" dd if=/dev/null of="$SCRATCH/a" conv=notrunc,fdatasync
rm -f "$SCRATCH/a"; sync -f "$SCRATCH"
t "write + fdatasync (dd bs=4M conv=fdatasync)" dd if="$OLD" of="$SCRATCH/a" bs=4M conv=fdatasync
t "rename" mv "$SCRATCH/a" "$SCRATCH/b"
rm -f "$SCRATCH/b"
