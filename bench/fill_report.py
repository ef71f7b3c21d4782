#!/usr/bin/env python3
"""The table of issue 13 from the pieces bench/fill.sh ran: one row per profile x file size x
direction, xfer with its defaults beside iperf3 with the same connections and congestion control
moving the same bytes, and the peers.

usage: fill_report.py PIECES_DIR

PIECES_DIR holds one directory per piece, named PROFILE_SIZE_DIR, each with the results.tsv of
its bench/wan.sh run (columns: see `record` in bench/wan.sh).
"""

import os
import re
import sys

GIB = 1 << 30
# The emulated link's rate per direction, in MB/s of IP bytes (wanem counts IP bytes).
LINK_MBS = {"lan": 125.0, "wan": 62.5, "lossy": 62.5, "loss1": 62.5, "loss10": 62.5, "far": 125.0}
DESC = {
    "lan": "0.2 ms, no loss, 1 Gbit/s",
    "wan": "50 ms, 0.01 %, 500 Mbit/s",
    "lossy": "50 ms, 0.5 %, 500 Mbit/s",
    "loss1": "50 ms, 0.1 %, 500 Mbit/s",
    "loss10": "50 ms, 1 %, 500 Mbit/s",
    "far": "150 ms, 0.1 %, 1 Gbit/s",
}
ORDER = ["wan", "loss1", "loss10", "far", "lossy", "lan"]
FIELDS = (
    "profile cc tool dir status wall bytes ccpu crss scpu srss payload loss qd busy nconn sbusy "
    "rwnd sndbuf cwnd rtt retrans wcpu note"
).split()


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def rate(r):
    if r is None or r["status"] not in ("complete", "capped", "timed"):
        return None
    b, w = num(r["bytes"]), num(r["wall"])
    return b / w / 1e6 if b and w else None


def cell(r, mark_capped=True):
    mbs = rate(r)
    if r is None:
        return "–"
    if mbs is None:
        return r["status"]
    return f"{mbs:.1f}" + ("*" if mark_capped and r["status"] == "capped" else "")


def process_wall(piece, prefix):
    """Seconds from the client command's start to its exit (/usr/bin/time %e in the piece's logs)."""
    logs = os.path.join(piece, "logs")
    try:
        names = sorted(n for n in os.listdir(logs) if n.startswith(prefix) and n.endswith(".time"))
    except OSError:
        return None
    for n in names:
        with open(os.path.join(logs, n)) as f:
            lines = [l for l in f.read().splitlines() if l.strip()]
        if lines:
            return num(lines[-1].split()[0])
    return None


def load(pieces):
    rows = {}
    for name in sorted(os.listdir(pieces)):
        m = re.fullmatch(r"([a-z0-9]+)_([0-9]+[KMG]?)_(upload|download)", name)
        path = os.path.join(pieces, name, "results.tsv")
        if not m or not os.path.exists(path):
            continue
        profile, size, direction = m.groups()
        with open(path) as f:
            for line in f:
                vals = line.rstrip("\n").split("\t")
                r = dict(zip(FIELDS, vals + [""] * (len(FIELDS) - len(vals))))
                r["piece"] = os.path.join(pieces, name)
                rows.setdefault((profile, size, direction), []).append(r)
    return rows


def iperf_cell(iperf, by_wall):
    if iperf is None:
        return "–"
    name = iperf["tool"].replace("iperf3 ", "")
    if by_wall is None:
        return f"{name}: {cell(iperf)}"
    return f"{name}: {by_wall:.1f} ({cell(iperf)})"


def size_key(s):
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(s.rstrip("KMG")) * unit


def main(pieces):
    rows = load(pieces)
    print(
        "| profile | file | dir | xfer MB/s | × link | cc | conns | retrans | CPU s/GiB client / server "
        "| iperf3 -P N -C cc: wall (own interval) | xfer / iperf3 | GridFTP -p 16 | aria2c -x 16 | rsync | xfer / best peer |"
    )
    print("|---|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    keys = sorted(rows, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, size_key(k[1]), k[2] != "upload"))
    misses = []
    for key in keys:
        profile, size, direction = key
        rs = rows[key]

        def find(prefix):
            return next((r for r in rs if r["tool"].startswith(prefix)), None)

        xfer = find("xfer auto")
        iperf = next((r for r in rs if re.match(r"iperf3 -P \d+ -C", r["tool"])), None)
        peers = {"gridftp": find("globus-url-copy -p 16"), "aria2": find("aria2c -x 16"), "rsync": find("rsync")}
        x = rate(xfer)
        link = LINK_MBS.get(profile)
        note = dict(p.split("=", 1) for p in (xfer or {}).get("note", "").split() if "=" in p)
        gib = (num(xfer["bytes"]) or 0) / GIB if xfer else 0
        cpu = "–"
        if xfer and gib:
            cpu = f"{(num(xfer['ccpu']) or 0) / gib:.2f} / {(num(xfer['scpu']) or 0) / gib:.2f}"
        i = rate(iperf)
        # Both commands timed alike, start to exit: iperf3's own interval leaves out the set-up
        # and the end of its connections, which xfer's time includes.
        x_wall = process_wall(xfer["piece"], "xfer-cauto-") if xfer else None
        i_wall = process_wall(iperf["piece"], "iperf3same-") if iperf else None
        i_bytes = num(iperf["bytes"]) if iperf else None
        i_by_wall = i_bytes / i_wall / 1e6 if i_bytes and i_wall and iperf["status"] == "timed" else None
        x_by_wall = num(xfer["bytes"]) / x_wall / 1e6 if xfer and x_wall and xfer["status"] == "complete" else None
        best_peer = max((v for v in (rate(p) for p in peers.values()) if v), default=None)
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "–"
        print(
            f"| {profile} ({DESC.get(profile, '?')}) | {size} | {direction} | {cell(xfer)} | {ratio(x, link)} "
            f"| {note.get('cc', '–')} | {note.get('conns', '–')} | {(xfer or {}).get('retrans') or '–'} | {cpu} "
            f"| {iperf_cell(iperf, i_by_wall)} | {ratio(x_by_wall, i_by_wall) if i_by_wall else ratio(x, i)} "
            f"| {cell(peers['gridftp'])} | {cell(peers['aria2']) if direction == 'download' else '–'} "
            f"| {cell(peers['rsync'])} | {ratio(x, best_peer)} |"
        )
        if profile != "lan" and x and link:
            want = 0.85 if size_key(size) >= GIB else 0.7
            if x / link < want:
                misses.append(f"{profile} {size} {direction}: {x / link:.2f}× the link (target {want})")
            xi = (x_by_wall / i_by_wall) if x_by_wall and i_by_wall else (x / i if i else None)
            if size_key(size) < GIB and xi and xi < 0.9:
                misses.append(f"{profile} {size} {direction}: {xi:.2f}× iperf3 (target 0.9)")
        if x and best_peer and x < best_peer:
            misses.append(f"{profile} {size} {direction}: behind a peer ({x:.1f} vs {best_peer:.1f} MB/s)")
    print()
    print(
        "MB/s = 10^6 bytes per second of wall time (xfer: connection set-up to the committed file, "
        "fsync included); × link = over the emulated link's rate (IP bytes; TCP payload tops out at "
        "0.965 of it). * = stopped at the piece's cap: what crossed the link by then. cc, conns: what "
        "xfer without options chose (its --json); retrans: retransmitted segments of its data "
        "connections (ss). iperf3 moved the same bytes (-n) with xfer's connections and congestion "
        "control; its MB/s is over the command's wall time, start to exit, as xfer's (in brackets: "
        "over iperf3's own interval, which leaves out its connections' set-up and end), and xfer / "
        "iperf3 compares the two wall times. rsync: one stream to an rsync daemon."
    )
    print()
    if misses:
        print("Below a target of issue 13:")
        for m in misses:
            print(f"- {m}")
    else:
        print("Every row meets the targets of issue 13.")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
