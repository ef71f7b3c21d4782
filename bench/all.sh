#!/usr/bin/env bash
# Every benchmark in one command: loopback (bench.sh), trees (bulk.sh), then the emulated WAN
# (wan.sh: file and tree workloads, lan/wan/lossy x cubic/bbr). Each script installs its own
# peers. Run as root (wan.sh makes network namespaces); about 1 h 30 min on the 2-core machine.
#
#   sudo bench/all.sh
#
# Each script's environment variables pass through (see their headers); the whole output, tables
# included, also goes to bench/out/all-DATE.log.
set -euo pipefail

BENCH_HOME="$(cd "$(dirname "$0")" && pwd)"
[[ $EUID == 0 ]] || {
    echo "bench/all.sh: run as root (wan.sh makes network namespaces)" >&2
    exit 1
}
mkdir -p "$BENCH_HOME/out"
LOG="$BENCH_HOME/out/all-$(date -u +%Y%m%dT%H%M%SZ).log"
echo "# bench/all.sh: output also in $LOG" >&2
exec > >(tee -a "$LOG") 2>&1

failed=()
for script in bench.sh bulk.sh wan.sh; do
    echo "## bench/$script ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    bash "$BENCH_HOME/$script" || failed+=("$script")
done
if ((${#failed[@]})); then
    echo "bench/all.sh: failed: ${failed[*]}" >&2
    exit 1
fi
