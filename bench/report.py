#!/usr/bin/env python3
"""Turn bench.sh's results.tsv into a Markdown table and the PASS/FAIL targets.

usage: report.py RESULTS.tsv FILE_SIZE_BYTES CHUNK_BYTES

Each TSV row is one run: tool, direction, connections, wall s, client CPU s, client peak RSS KiB,
server CPU s, server peak RSS KiB and, optionally, the connections xfer reported using (for
connections `auto`: xfer without -c, whose pool sizes itself). Rows with the same (tool, direction,
connections) are repeats: the fastest one gives throughput and CPU; peak RSS is the largest seen
over all repeats, and so is the number of connections used.

A row whose wall field is `n/a` is a run that could not be made (a peer not installable, or its
run failed); its tenth field says why. It shows as n/a unless a repeat of it succeeded.
"""

import sys
from collections import OrderedDict

MIB = 1 << 20
GIB = 1 << 30
RAW = "raw pipe (socat) + fsync"
RSYNC = "rsync daemon + fsync"
GRIDFTP = "GridFTP + fsync"
SCP = "scp aes128-gcm + fsync"
XFER_TOOLS = ("xfer", "xfer (TLS)")
# Targets, from the project's issues: throughput against the raw pipe and rsync, and CPU per
# GiB of xfer's default (no -c) against the raw pipe's and below rsync's and GridFTP's.
VS_RAW = 0.9
VS_RSYNC = 1.5
CPU_VS_RAW = 1.5
MEM_BASE_MIB = 64
# xfer without -c against the best fixed -c in the same direction.
VS_BEST_FIXED = 0.85
# TLS against plain xfer at the same pool: throughput, and CPU per GiB of client and server.
TLS_VS_PLAIN = 0.8
TLS_CPU_VS_PLAIN = 1.5
AUTO = "auto"


def load(path):
    """The measured rows, and the n/a ones: (tool, direction, connections, reason)."""
    groups = OrderedDict()
    na = OrderedDict()
    order = {}  # (tool, direction, connections) -> place of its first row, for the table
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            tool, direction, conns, wall, ccpu, crss, scpu, srss = fields[:8]
            key = conns if conns == AUTO else int(conns)
            order.setdefault((tool, direction, key), len(order))
            if wall == "n/a":
                na.setdefault((tool, direction, key), fields[9] if len(fields) > 9 else "")
                continue
            used = fields[8] if len(fields) > 8 else ""
            run = dict(
                wall=float(wall),
                ccpu=float(ccpu),
                crss=int(crss),
                scpu=float(scpu),
                srss=int(srss),
                used=int(used) if used.isdigit() else None,
            )
            groups.setdefault((tool, direction, key), []).append(run)
    rows = []
    for (tool, direction, conns), runs in groups.items():
        best = min(runs, key=lambda r: r["wall"])
        used = [r["used"] for r in runs if r["used"] is not None]
        rows.append(
            dict(
                tool=tool,
                direction=direction,
                conns=conns,
                order=order[(tool, direction, conns)],
                wall=best["wall"],
                ccpu=best["ccpu"],
                scpu=best["scpu"],
                crss=max(r["crss"] for r in runs),
                srss=max(r["srss"] for r in runs),
                repeats=len(runs),
                used=max(used) if used else None,
            )
        )
    na_rows = [
        dict(tool=t, direction=d, conns=c, used=None, reason=reason, order=order[(t, d, c)])
        for (t, d, c), reason in na.items()
        if (t, d, c) not in groups
    ]
    return rows, na_rows


def conns_label(r):
    """`4`, or for xfer without -c `auto (8)`: the most connections its pool used."""
    if r["conns"] != AUTO:
        return str(r["conns"])
    return f"auto ({r['used']})" if r["used"] is not None else "auto"


def cpu_comparison(rows, na_rows, gib):
    """xfer's CPU s/GiB on each side as a multiple of rsync's and of each GridFTP -p in the same
    direction (below 1: xfer spends less). The issue's loopback target: lower than rsync's and
    GridFTP's. Printed, not counted among the targets."""
    xfer_rows = [r for r in rows if r["tool"] in XFER_TOOLS]
    if not xfer_rows:
        return
    peers = [("rsync", lambda r, d: r["tool"] == RSYNC and r["direction"] == d)]
    for c in sorted({r["conns"] for r in rows + na_rows if r["tool"] == GRIDFTP}):
        peers.append((f"GridFTP -p {c}", lambda r, d, c=c: r["tool"] == GRIDFTP and r["direction"] == d and r["conns"] == c))

    def peer(match, direction):
        return next((r for r in rows if match(r, direction)), None)

    print()
    print("## CPU per GiB: xfer against rsync and GridFTP")
    print()
    print(
        "xfer's CPU s/GiB as a multiple of the peer's in the same direction, client and server "
        "side apart (below 1.00: xfer spends less; target: below rsync's and GridFTP's)."
    )
    print()
    header = ["tool", "direction", "connections", "client s/GiB"]
    header += [f"client × {name}" for name, _ in peers]
    header += ["server s/GiB"] + [f"server × {name}" for name, _ in peers]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    lower = {}  # (direction, peer name) -> [row labels where xfer is below on both sides]
    for r in xfer_rows:
        cells = [r["tool"], r["direction"], conns_label(r)]
        for side in ("ccpu", "scpu"):
            cells.append(f"{r[side] / gib:.2f}")
            for name, match in peers:
                p = peer(match, r["direction"])
                if p is None or p[side] <= 0:
                    cells.append("n/a")
                    continue
                cells.append(f"{r[side] / p[side]:.2f}")
        for name, match in peers:
            p = peer(match, r["direction"])
            if p is not None and r["tool"] == "xfer":
                ok = r["ccpu"] < p["ccpu"] and r["scpu"] < p["scpu"]
                lower.setdefault((r["direction"], name), []).append((conns_label(r), ok))
        print("| " + " | ".join(cells) + " |")
    print()
    for direction in ("upload", "download"):
        for name, match in peers:
            got = lower.get((direction, name))
            if not got:
                if any(r["direction"] == direction for r in xfer_rows if r["tool"] == "xfer"):
                    print(f"- {direction}, xfer vs {name}: n/a (no {name} {direction} run)")
                continue
            below = [c for c, ok in got if ok]
            print(
                f"- {direction}, xfer vs {name}: CPU/GiB lower on both sides at "
                f"{len(below)} of {len(got)} -c"
                + (f" ({', '.join(below)})" if below else "")
                + (f"; not at {', '.join(c for c, ok in got if not ok)}" if len(below) < len(got) else "")
            )


def cpu_targets(rows, raw, target):
    """xfer without -c, each direction and side: CPU/GiB <= CPU_VS_RAW x the raw pipe's, and
    below rsync's and every GridFTP -p's in the same direction."""
    for auto in [r for r in rows if r["tool"] == "xfer" and r["conns"] == AUTO]:
        d = auto["direction"]
        peers = [("raw pipe", raw, CPU_VS_RAW)] if raw else []
        peers += [
            (f"{'rsync' if p['tool'] == RSYNC else 'GridFTP -p ' + str(p['conns'])}", p, 1.0)
            for p in rows
            if p["tool"] in (RSYNC, GRIDFTP) and p["direction"] == d
        ]
        for side, label in (("ccpu", "client"), ("scpu", "server")):
            for name, p, factor in peers:
                # The raw pipe's client always sends: on a download, xfer's client is the
                # receiver and is compared with the pipe's receiving end.
                peer_side = side
                if p is raw and d == "download":
                    peer_side = "scpu" if side == "ccpu" else "ccpu"
                if p[peer_side] <= 0:
                    continue
                ratio = auto[side] / p[peer_side]
                ok = ratio <= factor if factor != 1.0 else ratio < 1.0
                bound = f"<= {factor} x" if factor != 1.0 else "below"
                target(ok, f"xfer {d} without -c {label} CPU/GiB {bound} {name}'s: ratio {ratio:.2f}")


def main():
    path, size, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rows, na_rows = load(path)
    for r in rows:
        r["mibps"] = size / MIB / r["wall"] if r["wall"] > 0 else float("inf")

    def find(tool, direction):
        return next((r for r in rows if r["tool"] == tool and r["direction"] == direction), None)

    raw = find(RAW, "one-way")
    rsync = {d: find(RSYNC, d) for d in ("upload", "download")}

    def ratio(r, base):
        return f"{r['mibps'] / base['mibps']:.2f}" if base else "n/a"

    gib = size / GIB
    header = [
        "tool",
        "direction",
        "connections",
        "MiB/s",
        "ratio vs raw pipe (fsync)",
        "ratio vs rsync",
        "CPU s/GiB client",
        "CPU s/GiB server",
        "peak RSS MiB client",
        "peak RSS MiB server",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for r in sorted(rows + na_rows, key=lambda r: r["order"]):
        if "reason" in r:
            print(f"| {r['tool']} | {r['direction']} | {conns_label(r)} | " + " | ".join(["n/a"] * 7) + " |")
            continue
        vs_rsync = rsync.get(r["direction"]) or rsync["upload"]
        print(
            "| "
            + " | ".join(
                [
                    r["tool"],
                    r["direction"],
                    conns_label(r),
                    f"{r['mibps']:.0f}",
                    ratio(r, raw),
                    ratio(r, vs_rsync),
                    f"{r['ccpu'] / gib:.2f}",
                    f"{r['scpu'] / gib:.2f}",
                    f"{r['crss'] / 1024:.1f}",
                    f"{r['srss'] / 1024:.1f}",
                ]
            )
            + " |"
        )
    print()
    print(
        f"MiB/s = file size / wall seconds, 1 MiB = 2^20 bytes; file {size / MIB:.0f} MiB. "
        "'ratio vs rsync' compares with rsync in the same direction (the raw pipe with rsync "
        "upload). CPU = user + sys. Peak RSS of rsync, socat and GridFTP is their largest process. "
        "GridFTP: globus-url-copy -fast -p N (N parallel MODE E data connections) against "
        "globus-gridftp-server -aa -1, anonymous ftp://."
    )
    for r in na_rows:
        print(f"- n/a: {r['tool']} {r['direction']} {conns_label(r)}: {r['reason'] or 'no reason recorded'}")

    cpu_comparison(rows, na_rows, gib)

    print()
    print("## Targets")
    print()
    results = []

    def target(ok, text):
        results.append(ok)
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")

    xfer_rows = [r for r in rows if r["tool"] == "xfer"]
    if not xfer_rows:
        print("- n/a: no xfer runs")
        return
    for direction in ("upload", "download"):
        cand = [r for r in xfer_rows if r["direction"] == direction]
        if not cand:
            continue
        best = max(cand, key=lambda r: r["mibps"])
        name = f"best xfer {direction} ({best['mibps']:.0f} MiB/s, -c {conns_label(best)})"
        if raw:
            need = VS_RAW * raw["mibps"]
            target(
                best["mibps"] >= need,
                f"{name} >= {VS_RAW} x raw pipe with fsync ({raw['mibps']:.0f} MiB/s): "
                f"needs {need:.0f}, ratio {best['mibps'] / raw['mibps']:.2f}",
            )
        else:
            print(f"- n/a: {name} vs raw pipe: no raw pipe run")
        base = rsync.get(direction)
        if base:
            need = VS_RSYNC * base["mibps"]
            target(
                best["mibps"] >= need,
                f"{name} >= {VS_RSYNC} x rsync {direction} ({base['mibps']:.0f} MiB/s): "
                f"needs {need:.0f}, ratio {best['mibps'] / base['mibps']:.2f}",
            )
        else:
            print(f"- n/a: {name} vs rsync: no rsync {direction} run")
    for direction in ("upload", "download"):
        auto = next((r for r in xfer_rows if r["direction"] == direction and r["conns"] == AUTO), None)
        fixed = [r for r in xfer_rows if r["direction"] == direction and r["conns"] != AUTO]
        if auto and fixed:
            best = max(fixed, key=lambda r: r["mibps"])
            need = VS_BEST_FIXED * best["mibps"]
            target(
                auto["mibps"] >= need,
                f"xfer {direction} without -c ({auto['mibps']:.0f} MiB/s, {conns_label(auto)}) >= "
                f"{VS_BEST_FIXED} x the best fixed -c ({best['mibps']:.0f} MiB/s, -c {best['conns']}): "
                f"needs {need:.0f}, ratio {auto['mibps'] / best['mibps']:.2f}",
            )
    cpu_targets(rows, raw, target)
    for r in [r for r in rows if r["tool"] == "xfer (TLS)"]:
        plain = next((x for x in xfer_rows if x["direction"] == r["direction"] and x["conns"] == r["conns"]), None)
        label = f"xfer (TLS) {r['direction']} -c {conns_label(r)}"
        if not plain:
            print(f"- n/a: {label}: no plain xfer row at the same pool to compare with")
            continue
        ratio = r["mibps"] / plain["mibps"]
        target(
            ratio >= TLS_VS_PLAIN,
            f"{label} >= {TLS_VS_PLAIN} x plain: {r['mibps']:.0f} vs {plain['mibps']:.0f} MiB/s, ratio {ratio:.2f}",
        )
        cpu_tls, cpu_plain = r["ccpu"] + r["scpu"], plain["ccpu"] + plain["scpu"]
        cpu_ratio = cpu_tls / cpu_plain if cpu_plain > 0 else float("inf")
        target(
            cpu_ratio <= TLS_CPU_VS_PLAIN,
            f"{label} CPU/GiB (client + server) <= {TLS_CPU_VS_PLAIN} x plain: {cpu_tls / gib:.2f} vs "
            f"{cpu_plain / gib:.2f} s/GiB, ratio {cpu_ratio:.2f} (client {r['ccpu'] / gib:.2f} vs "
            f"{plain['ccpu'] / gib:.2f}, server {r['scpu'] / gib:.2f} vs {plain['scpu'] / gib:.2f})",
        )
    for r in [r for r in rows if r["tool"] == SCP]:
        tls = next((x for x in rows if x["tool"] == "xfer (TLS)" and x["direction"] == r["direction"]), None)
        if tls:
            print(
                f"- xfer (TLS) {r['direction']} -c {conns_label(tls)} vs scp (AES-128-GCM): "
                f"{tls['mibps']:.0f} vs {r['mibps']:.0f} MiB/s, ratio {tls['mibps'] / r['mibps']:.2f}; CPU/GiB "
                f"{(tls['ccpu'] + tls['scpu']) / gib:.2f} vs {(r['ccpu'] + r['scpu']) / gib:.2f} s/GiB"
            )
    for r in xfer_rows:
        conns = r["conns"] if r["conns"] != AUTO else (r["used"] or 16)
        limit = MEM_BASE_MIB + conns * 2 * chunk / MIB
        for side in ("client", "server"):
            mib = r[side[0] + "rss"] / 1024
            target(
                mib <= limit,
                f"xfer {r['direction']} -c {conns_label(r)} {side} peak RSS {mib:.1f} MiB <= "
                f"{MEM_BASE_MIB} + {conns} x 2 x {chunk / MIB:g} MiB = {limit:.0f} MiB",
            )
    print()
    print(f"{sum(results)} of {len(results)} targets met")


if __name__ == "__main__":
    main()
