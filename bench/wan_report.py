#!/usr/bin/env python3
"""Helpers for bench/wan.sh: parse wanem stats, ss samples and iperf3 JSON; print the report.

usage:
  wan_report.py wanem BEFORE AFTER DIR     -> "payload loss_drops q_drops wanem_cpu_s"
  wan_report.py ss SAMPLES WALL_S          -> "nconn busy% rwnd% sndbuf% cwnd rtt_ms retrans"
  wan_report.py iperf JSON                 -> "bytes seconds"
  wan_report.py report RESULTS.tsv COMBOS.tsv FILE_SIZE_BYTES CAP_S [TREES.tsv TREE_SETS.tsv]

wanem: DIR is ab (wa -> wb, upload) or ba (wb -> wa, download). `payload` is what crossed the
emulated link in that direction after loss, as TCP payload: delivered IP bytes minus 52 bytes of
IPv4 + TCP (with timestamps) header per wire segment. It counts the few retransmissions that
arrive twice and a little protocol framing; it is the byte count of runs stopped at the time cap.

ss: SAMPLES holds `ss -tinH state established` output taken about once a second in the sending
namespace, each sample after a line `@@ <time>`. The last sample of each socket that has sent
more than 1 MiB (bytes_acked) is kept: the data connections. busy% is the mean over them of the
kernel's busy time (data queued or in flight) as a share of the run's wall time; rwnd% and
sndbuf% are the time spent limited by the receiver's window or the send buffer as a share of
busy time (the rest of busy time is congestion-window-limited); cwnd (packets) and rtt are
means over the samples of the mean over the data connections, retrans the total retransmitted
segments.

report: one table per profile x cc of the file runs (RESULTS.tsv), then one per tree of the tree
runs (TREES.tsv; TREE_SETS.tsv: tree, files, bytes of each source tree).
"""

import json
import math
import os
import re
import sys
from collections import OrderedDict

GIB = 1 << 30
HDR = 52  # IPv4 20 + TCP 20 + timestamps option 12


def parse_wanem(path):
    out = {}
    with open(path) as f:
        for line in f:
            kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
            if "dir" in kv:
                out[kv["dir"]] = kv
    return out


def cmd_wanem(before, after, direction):
    try:
        b, a = parse_wanem(before), parse_wanem(after)
        d0, d1 = b[direction], a[direction]
    except (OSError, KeyError):
        print("nan nan nan nan")
        return

    def delta(k, src0=d0, src1=d1):
        return float(src1[k]) - float(src0[k])

    payload = delta("tx_bytes") - HDR * delta("tx_pkts")
    cpu = sum(float(a[d]["cpu_s"]) - float(b[d]["cpu_s"]) for d in ("ab", "ba") if d in a and d in b)
    print(f"{payload:.0f} {delta('loss_drops'):.0f} {delta('q_drops'):.0f} {cpu:.2f}")


def ss_samples(path):
    """Every sample: list of dicts key (local, peer) -> info text."""
    samples = []
    key = None
    try:
        f = open(path)
    except OSError:
        return samples
    with f:
        for line in f:
            if line.startswith("@@"):
                samples.append({})
                key = None
                continue
            if not line.strip() or not samples:
                continue
            if not line[0].isspace():
                parts = line.split()
                # [Recv-Q Send-Q Local Peer] (state column omitted by the state filter)
                if len(parts) >= 4:
                    key = (parts[2], parts[3])
                    samples[-1][key] = ""
                continue
            if key is not None:
                samples[-1][key] += " " + line.strip()
    return samples


def num(pattern, text, default=None, cast=float):
    m = re.search(pattern, text)
    return cast(m.group(1)) if m else default


def is_data(info):
    return num(r"\bbytes_acked:(\d+)", info, 0, int) >= (1 << 20)


def cmd_ss(path, wall):
    wall_ms = max(float(wall), 1e-3) * 1000
    samples = ss_samples(path)
    last = {}
    for sample in samples:
        last.update(sample)
    socks = []
    for info in last.values():
        if not is_data(info):
            continue
        socks.append(
            dict(
                busy=num(r"\bbusy:(\d+)ms", info, 0.0),
                rwnd=num(r"\brwnd_limited:(\d+)ms", info, 0.0),
                sndbuf=num(r"\bsndbuf_limited:(\d+)ms", info, 0.0),
                retrans=num(r"\bretrans:\d+/(\d+)", info, 0, int),
            )
        )
    if not socks:
        print("0 nan nan nan nan nan 0")
        return
    # cwnd and rtt: per sample, the mean over the data connections in it; then the mean over the
    # samples (the last sample alone may fall on the final second of a run).
    cwnds, rtts = [], []
    for sample in samples:
        data = [info for info in sample.values() if is_data(info)]
        if data:
            cwnds.append(sum(num(r"\bcwnd:(\d+)", i, 0.0) for i in data) / len(data))
            rtts.append(sum(num(r"\brtt:([\d.]+)/", i, 0.0) for i in data) / len(data))
    n = len(socks)
    busy = sum(s["busy"] for s in socks)
    pct = lambda x: 100.0 * x / busy if busy > 0 else float("nan")  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    print(
        f"{n} {100.0 * busy / n / wall_ms:.0f} {pct(sum(s['rwnd'] for s in socks)):.0f} "
        f"{pct(sum(s['sndbuf'] for s in socks)):.0f} {mean(cwnds):.0f} "
        f"{mean(rtts):.1f} {sum(s['retrans'] for s in socks)}"
    )


def cmd_iperf(path):
    with open(path) as f:
        d = json.load(f)
    s = d["end"]["sum_received"]
    print(f"{int(s['bytes'])} {float(s['seconds']):.3f}")


# --- report ---------------------------------------------------------------------------------------
COLS = (
    "profile cc tool dir status wall bytes ccpu crss scpu srss payload loss_drops q_drops "
    "cpu_busy nconn sbusy rwnd sndbuf cwnd rtt retrans wcpu note"
).split()
CEIL = "iperf3 -P 16"
PEERS = [("rsync", "rsync daemon"), ("scp", "scp"), ("gridftp16", "globus-url-copy -p 16")]
TARGET_CEIL = 0.85
TARGET_VS_RSYNC_SCP = 5.0
# xfer without -c (the row "xfer auto") against the best fixed -c of the same profile, cc and
# direction.
AUTO = "xfer auto"
TARGET_AUTO = 0.85


def fnum(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def load(path):
    groups = OrderedDict()
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            vals = line.rstrip("\n").split("\t")
            vals += [""] * (len(COLS) - len(vals))
            r = dict(zip(COLS, vals))
            groups.setdefault((r["profile"], r["cc"], r["tool"], r["dir"]), []).append(r)
    rows = []
    for runs in groups.values():
        ok = [r for r in runs if r["status"] in ("complete", "capped", "timed")]
        for r in ok:
            r["mbps"] = fnum(r["bytes"]) / fnum(r["wall"]) / 1e6
        if ok:
            best = dict(max(ok, key=lambda r: r["mbps"]))
            # Peak RSS: the largest over the repeats.
            for k in ("crss", "srss"):
                vals = [fnum(r[k]) for r in ok if fnum(r[k]) is not None]
                best[k] = max(vals) if vals else None
            best["repeats"] = len(ok)
        else:
            best = dict(runs[-1])
            best["mbps"] = None
            best["repeats"] = 0
        rows.append(best)
    return rows


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def vs_best_fixed(r, fixed):
    """The auto row's throughput over the best fixed -c row's, with that row's -c."""
    if r["tool"] != AUTO or not fixed:
        return "–"
    return f"{r['mbps'] / fixed['mbps']:.2f} ({fixed['tool'].removeprefix('xfer ')})"


def machine_cpu(r):
    """CPU used during the run as a share of all cores: client + server + wanem ("ours"), and the
    whole machine (anything else running shows as the difference)."""
    busy = fnum(r["cpu_busy"])
    wall = fnum(r["wall"]) or 0.0
    if busy is None or wall <= 0:
        return "–"
    ours = sum(fnum(r[k]) or 0.0 for k in ("ccpu", "scpu", "wcpu"))
    ncpu = os.cpu_count() or 1
    return f"{100.0 * ours / (wall * ncpu):.0f} / {busy:.0f}"


# --- trees ----------------------------------------------------------------------------------------
TREE_COLS = (
    "profile cc tree tool conns dir status wall files bytes ccpu crss scpu srss payload loss_drops "
    "q_drops cpu_busy wcpu sync note"
).split()
TREE_RSYNC = "rsync -a (daemon)"
TREE_TAR = "tar c + socat + tar x"


def load_trees(path):
    """The tree runs, one row per profile, cc, tree, tool, -c and direction: the run with the most
    files/s (peak RSS: the largest over the repeats)."""
    groups = OrderedDict()
    if path:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                vals = line.rstrip("\n").split("\t")
                vals += [""] * (len(TREE_COLS) - len(vals))
                r = dict(zip(TREE_COLS, vals))
                key = tuple(r[k] for k in ("profile", "cc", "tree", "tool", "conns", "dir"))
                groups.setdefault(key, []).append(r)
    rows = []
    for runs in groups.values():
        ok = [r for r in runs if r["status"] in ("complete", "capped") and fnum(r["wall"])]
        for r in ok:
            r["fps"] = (fnum(r["files"]) or 0.0) / fnum(r["wall"])
            r["mbps"] = (fnum(r["bytes"]) or 0.0) / fnum(r["wall"]) / 1e6
        if ok:
            best = dict(max(ok, key=lambda r: r["fps"]))
            for k in ("crss", "srss"):
                vals = [fnum(r[k]) for r in ok if fnum(r[k]) is not None]
                best[k] = max(vals) if vals else None
            best["repeats"] = len(ok)
        else:
            best = dict(runs[-1], fps=None, mbps=None, repeats=0)
        rows.append(best)
    return rows


def load_tree_sets(path):
    sets = OrderedDict()
    if path:
        with open(path) as f:
            for line in f:
                if line.strip():
                    name, files, size = line.rstrip("\n").split("\t")[:3]
                    sets[name] = (int(files), int(size))
    return sets


def tree_table(name, files, size, rows):
    if not rows:
        return
    print(f"#### tree {name}: {files:,} files, {size / 1e6:.1f} MB")
    print()
    header = [
        "tool",
        "-c",
        "dir",
        "s",
        "files/s",
        "MB/s",
        "× rsync",
        "× tar pipe",
        "CPU s client",
        "CPU s server",
        "RSS MiB client",
        "RSS MiB server",
        "run",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i in (0, 1, 2, 12) else "---:" for i in range(len(header))) + "|")

    def find(tool, direction):
        r = next((r for r in rows if r["tool"] == tool and r["dir"] == direction), None)
        return r if r and r["fps"] else None

    for r in rows:
        if r["fps"] is None:
            why = r["note"] or r["status"]
            cells = [r["tool"], r["conns"], r["dir"], f"n/a ({why})"] + [""] * (len(header) - 4)
            print("| " + " | ".join(cells) + " |")
            continue

        def ratio(base):
            return f"{r['fps'] / base['fps']:.2f}" if base else "–"

        kib = lambda k: fnum(r[k]) / 1024 if fnum(r[k]) is not None else None  # noqa: E731
        if r["status"] == "complete":
            run = "complete"
            if fnum(r["sync"]) is not None:
                run += f" (sync -f {fnum(r['sync']):.2f} s)"
        else:
            run = f"capped: {int(fnum(r['files']) or 0):,} of {files:,} files"
        if r["repeats"] > 1:
            run += f", best of {r['repeats']}"
        cells = [
            r["tool"],
            r["conns"],
            r["dir"],
            f"{fnum(r['wall']):.2f}",
            f"{r['fps']:,.0f}",
            f"{r['mbps']:.1f}",
            ratio(find(TREE_RSYNC, r["dir"])),
            ratio(find(TREE_TAR, r["dir"])),
            fmt(fnum(r["ccpu"]), ".2f"),
            fmt(fnum(r["scpu"]), ".2f"),
            fmt(kib("crss"), ".1f"),
            fmt(kib("srss"), ".1f"),
            run,
        ]
        print("| " + " | ".join(cells) + " |")
    print()


def summary(rows, trees, combos):
    """One line per profile, cc and direction with the figures the targets are about (MB/s and
    ratios, as in the tables above), then the same for the trees (files/s)."""
    cols = [
        (CEIL, "iperf3 -P 16"),
        ("xfer -c 1", "xfer -c 1"),
        ("xfer -c 4", "-c 4"),
        ("xfer -c 8", "-c 8"),
        ("xfer -c 16", "-c 16"),
        (AUTO, "xfer (no -c)"),
        ("socat (1 stream)", "socat"),
        ("rsync daemon", "rsync"),
        ("scp", "scp"),
        ("globus-url-copy -p 16", "GridFTP -p 16"),
        ("aria2c -x 8", "aria2c -x 8"),
    ]
    header = ["profile", "cc", "dir"] + [label for _, label in cols]
    header += ["-c 16 / ceiling", "-c 16 / rsync", "-c 16 / scp", "-c 16 / GridFTP", "no -c / best -c"]
    header += ["xfer peak RSS MiB client / server"]
    lines = []
    for profile, cc in combos:
        for d in ("upload", "download"):
            mine = {r["tool"]: r for r in rows if (r["profile"], r["cc"], r["dir"]) == (profile, cc, d) and r["mbps"]}
            if not any(t.startswith("xfer") for t in mine):
                continue
            cells = [profile, cc, d]
            for tool, _ in cols:
                r = mine.get(tool)
                cells.append(f"{r['mbps']:.1f}" if r else "–")
            x = mine.get("xfer -c 16")
            for base in (CEIL, "rsync daemon", "scp", "globus-url-copy -p 16"):
                b = mine.get(base)
                cells.append(f"{x['mbps'] / b['mbps']:.2f}" if x and b else "–")
            fixed = [r for t, r in mine.items() if t.startswith("xfer -c ")]
            auto = mine.get(AUTO)
            best = max(fixed, key=lambda r: r["mbps"]) if fixed else None
            cells.append(f"{auto['mbps'] / best['mbps']:.2f}" if auto and best else "–")
            xs = [r for t, r in mine.items() if t.startswith("xfer")]
            crss = max((fnum(r["crss"]) or 0.0 for r in xs), default=0.0) / 1024
            srss = max((fnum(r["srss"]) or 0.0 for r in xs), default=0.0) / 1024
            cells.append(f"{crss:.0f} / {srss:.0f}")
            lines.append(cells)
    if lines:
        print("## Summary: one file, MB/s")
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
        print()
    tree_lines = []
    for profile, cc in combos:
        for name in OrderedDict((r["tree"], None) for r in trees):
            for d in ("upload", "download"):
                mine = [r for r in trees if (r["profile"], r["cc"], r["tree"], r["dir"]) == (profile, cc, name, d) and r["fps"]]
                if not mine:
                    continue

                def fps(tool, conns=None):
                    r = next((r for r in mine if r["tool"] == tool and (conns is None or r["conns"] == conns)), None)
                    return r["fps"] if r else None

                xfer = [r for r in mine if r["tool"].startswith("xfer")]
                best = max(xfer, key=lambda r: r["fps"]) if xfer else None
                auto = fps("xfer -r", "auto")
                rsync, tar, scp = fps(TREE_RSYNC), fps(TREE_TAR), fps("scp -r")
                cells = [profile, cc, name, d]
                cells += [fmt(auto, ",.0f"), f"{best['fps']:,.0f} (-c {best['conns']})" if best else "–"]
                cells += [fmt(rsync, ",.0f"), fmt(tar, ",.0f"), fmt(scp, ",.0f")]
                for base in (rsync, tar):
                    cells.append(f"{auto / base:.2f}" if auto and base else "–")
                    cells.append(f"{best['fps'] / base:.2f}" if best and base else "–")
                tree_lines.append(cells)
    if tree_lines:
        print("## Summary: trees, files/s")
        print()
        header = ["profile", "cc", "tree", "dir", "xfer (no -c)", "xfer best", "rsync", "tar pipe", "scp"]
        header += ["no -c / rsync", "best / rsync", "no -c / tar", "best / tar"]
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|")
        for cells in tree_lines:
            print("| " + " | ".join(cells) + " |")
        print()


def main_report(results, combos_path, size, cap, trees_path=None, tree_sets_path=None):
    rows = load(results)
    trees = load_trees(trees_path)
    tree_sets = load_tree_sets(tree_sets_path)
    combos = OrderedDict()
    with open(combos_path) as f:
        for line in f:
            if line.strip():
                profile, cc, desc, load0, load1 = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
                combos[(profile, cc)] = dict(desc=desc, load0=load0, load1=load1)
    verdicts = []
    for (profile, cc), meta in combos.items():
        mine = [r for r in rows if r["profile"] == profile and r["cc"] == cc]

        def find(tool, direction):
            r = next((r for r in mine if r["tool"] == tool and r["dir"] == direction), None)
            return r if r and r["mbps"] else None

        def best_fixed(direction):
            fixed = [
                r
                for r in mine
                if r["tool"].startswith("xfer -c ") and r["dir"] == direction and r["mbps"]
            ]
            return max(fixed, key=lambda r: r["mbps"]) if fixed else None

        print(f"### {profile} × {cc}")
        print()
        print(f"link: {meta['desc']}; load average {meta['load0']} at start, {meta['load1']} at end")
        print()
        header = [
            "tool",
            "dir",
            "MB/s",
            "× iperf3 -P16",
            "× rsync",
            "× scp",
            "× gridftp -p16",
            "vs best -c",
            "CPU s/GiB client",
            "CPU s/GiB server",
            "RSS MiB client",
            "RSS MiB server",
            "run",
            "CPU % of all cores: ours / machine",
            "link drops loss/queue",
            "sender conns: busy % / rwnd % / sndbuf %, cwnd, rtt ms, retrans",
        ]
        if mine:
            print("| " + " | ".join(header) + " |")
            print("|" + "|".join("---" if i in (0, 1, 12, 15) else "---:" for i in range(len(header))) + "|")
        for r in mine:
            d = r["dir"]
            if r["mbps"] is None:
                why = r["note"] or r["status"]
                cells = [r["tool"], d, f"n/a ({why})"] + [""] * (len(header) - 3)
                print("| " + " | ".join(cells) + " |")
                continue
            b = fnum(r["bytes"]) / GIB
            ceil = find(CEIL, d) or find(CEIL, "upload")

            def ratio(base):
                return f"{r['mbps'] / base['mbps']:.2f}" if base else "–"

            ccpu, scpu = fnum(r["ccpu"]), fnum(r["scpu"])
            run = {
                "complete": f"{b:.2f} GiB in {fnum(r['wall']):.1f} s",
                "capped": f"capped at {fnum(r['wall']):.0f} s, {b:.2f} GiB",
                "timed": f"-t {fnum(r['wall']):.0f} s",
            }[r["status"]]
            if r["repeats"] > 1:
                run += f" (best of {r['repeats']})"
            ld, qd = fnum(r["loss_drops"]), fnum(r["q_drops"])
            drops = f"{ld:.0f}/{qd:.0f}" if ld is not None and qd is not None else "–"
            nconn = int(fnum(r["nconn"]) or 0)
            if nconn:
                sender = (
                    f"{nconn}: {fmt(fnum(r['sbusy']), '.0f')} / {fmt(fnum(r['rwnd']), '.0f')} / "
                    f"{fmt(fnum(r['sndbuf']), '.0f')}, {fmt(fnum(r['cwnd']), '.0f')}, "
                    f"{fmt(fnum(r['rtt']), '.1f')}, {int(fnum(r['retrans']) or 0)}"
                )
            else:
                sender = "–"
            cells = [
                r["tool"],
                d,
                f"{r['mbps']:.1f}",
                ratio(ceil),
                ratio(find("rsync daemon", d)),
                ratio(find("scp", d)),
                ratio(find("globus-url-copy -p 16", d)),
                vs_best_fixed(r, best_fixed(d)),
                fmt(ccpu / b if ccpu is not None and b > 0 else None, ".2f"),
                fmt(scpu / b if scpu is not None and b > 0 else None, ".2f"),
                fmt(fnum(r["crss"]) / 1024 if fnum(r["crss"]) is not None else None, ".1f"),
                fmt(fnum(r["srss"]) / 1024 if fnum(r["srss"]) is not None else None, ".1f"),
                run,
                machine_cpu(r),
                drops,
                sender,
            ]
            print("| " + " | ".join(cells) + " |")
        if mine:
            print()
        for name, (files, size) in tree_sets.items():
            tree_table(name, files, size, [r for r in trees if (r["profile"], r["cc"], r["tree"]) == (profile, cc, name)])

        # Targets for this profile and cc.
        for d in ("upload", "download"):
            auto, fixed = find(AUTO, d), best_fixed(d)
            if auto and fixed:
                verdicts.append(
                    (
                        auto["mbps"] >= TARGET_AUTO * fixed["mbps"],
                        f"{profile}/{cc} {d}: xfer auto {auto['mbps']:.1f} MB/s >= {TARGET_AUTO} × "
                        f"best fixed ({fixed['tool']}, {fixed['mbps']:.1f}) = "
                        f"{TARGET_AUTO * fixed['mbps']:.1f}: ratio {auto['mbps'] / fixed['mbps']:.2f}",
                    )
                )
            elif auto:
                verdicts.append((None, f"{profile}/{cc} {d}: xfer auto but no fixed -c run"))
            x = find("xfer -c 16", d)
            if not x:
                continue
            ceil = find(CEIL, d)
            if profile in ("wan", "lossy"):
                if ceil:
                    need = TARGET_CEIL * ceil["mbps"]
                    verdicts.append(
                        (
                            x["mbps"] >= need,
                            f"{profile}/{cc} {d}: xfer -c 16 {x['mbps']:.1f} MB/s >= {TARGET_CEIL} × "
                            f"iperf3 -P 16 ({ceil['mbps']:.1f}) = {need:.1f}: ratio {x['mbps'] / ceil['mbps']:.2f}",
                        )
                    )
                else:
                    verdicts.append((None, f"{profile}/{cc} {d}: no iperf3 -P 16 ceiling"))
            if cc == "cubic" and profile in ("wan", "lossy"):
                for tool in ("rsync daemon", "scp"):
                    p = find(tool, d)
                    if p:
                        need = TARGET_VS_RSYNC_SCP * p["mbps"]
                        verdicts.append(
                            (
                                x["mbps"] >= need,
                                f"{profile}/{cc} {d}: xfer -c 16 {x['mbps']:.1f} MB/s >= {TARGET_VS_RSYNC_SCP:g} × "
                                f"{tool} ({p['mbps']:.1f}) = {need:.1f}: ratio {x['mbps'] / p['mbps']:.2f}",
                            )
                        )
                    else:
                        verdicts.append((None, f"{profile}/{cc} {d}: no {tool} run"))
            if profile in ("wan", "lossy"):
                g = find("globus-url-copy -p 16", d)
                if g:
                    verdicts.append(
                        (
                            x["mbps"] >= g["mbps"],
                            f"{profile}/{cc} {d}: xfer -c 16 {x['mbps']:.1f} MB/s >= globus-url-copy -p 16 "
                            f"({g['mbps']:.1f}): ratio {x['mbps'] / g['mbps']:.2f}",
                        )
                    )
                else:
                    verdicts.append((None, f"{profile}/{cc} {d}: no globus-url-copy -p 16 run"))

    if trees:
        print(
            f"Trees: every run copies the whole tree into a new directory and is stopped at {cap:g} s. "
            "s = wall seconds from the client's start to its exit (tar upload: until the receiving tar "
            "has exited), plus for every tool but xfer (which flushes the destination filesystem "
            "itself before it exits) a `sync -f` of the copy (a syncfs: anything else writing to that "
            "filesystem meanwhile adds to it). A complete run's copy has the source's file count and "
            "digest (one sha256 over the sorted paths, sizes and contents); a capped run counts the "
            "files that arrived whole and the bytes they hold. files/s and MB/s (10^6 bytes) = those "
            "files and bytes over s; × rsync and × tar pipe compare files/s with that peer's row of "
            "the same tree and direction (> 1: this row is faster). CPU s = user + sys of the whole "
            "run per side (cpuacct cgroups), RSS = the largest single process, as for the file runs."
        )
        print()
    if not rows:
        return
    print(
        f"MB/s = 10^6 bytes per second of wall time. File {size / GIB:.2f} GiB; every transfer is "
        f"stopped at {cap:g} s: 'capped' rows count what crossed the emulated link as TCP payload "
        "(wanem counters), complete rows the file size (plus an fsync of the received file for every "
        "tool but xfer, which fsyncs itself). iperf3 rows are `-t` runs (receiver's bytes). Ratios "
        "compare with the same direction (iperf3: upload if no download run). CPU = user + sys per "
        "GiB moved, from a cpuacct cgroup per side (every process the client or server started, reaped "
        "or not); peak RSS is the largest single process (/usr/bin/time %M; xferd: VmHWM). CPU % 'ours' = "
        "client + server + wanem over all cores; 'machine' = all cores busy, whoever it was (kernel "
        "packet work deferred to ksoftirqd counts only there). Sender columns: from `ss -ti` on the sending side, see bench/wan_report.py. "
        "'xfer auto' is xfer without -c (the pool sizes itself; its connections are the sender's "
        "data connections); 'vs best -c' is its throughput over the best fixed -c row of the same "
        "profile, cc and direction."
    )
    print()
    summary(rows, trees, combos)
    print("## Targets (auto vs best -c everywhere; ceiling and gridftp on wan and lossy; vs rsync/scp under cubic only)")
    print()
    if not verdicts:
        print("- n/a: no xfer -c 16 or xfer auto runs")
        return
    met = 0
    judged = 0
    for ok, text in verdicts:
        if ok is None:
            print(f"- n/a: {text}")
            continue
        judged += 1
        met += bool(ok)
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    print()
    print(f"{met} of {judged} targets met")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "wanem":
        cmd_wanem(*args)
    elif cmd == "ss":
        cmd_ss(*args)
    elif cmd == "iperf":
        cmd_iperf(*args)
    elif cmd == "report":
        main_report(args[0], args[1], int(args[2]), float(args[3]), *args[4:6])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
