#!/usr/bin/env python3
"""Idle-but-handshaken connections for bench/load.sh: opens N connections to an xferd serving
without a token, sends each the Hello of crates/xfer-proto/testdata/hello.hex, reads its Welcome,
prints `ready N` and holds them all open until its stdin closes (or it is signalled).

    python3 bench/idle.py 127.0.0.1:PORT 4096 < some-fifo
"""

import socket
import sys
from pathlib import Path

TESTDATA = Path(__file__).resolve().parent.parent / "crates/xfer-proto/testdata"
WELCOME = 0x02


def hello_frame() -> bytes:
    """The Hello test vector's bytes (lines `OFFSET  HEX HEX ...`, comments skipped)."""
    out = bytearray()
    for line in (TESTDATA / "hello.hex").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        out += bytes.fromhex("".join(line.split()[1:]))
    return bytes(out)


def read_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("xferd closed the connection during the handshake")
            buf += part
        return buf

    length = int.from_bytes(exactly(4), "big")
    return exactly(length)


def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    count = int(sys.argv[2])
    hello = hello_frame()
    conns = []
    # Connect and send every Hello first, then read the Welcomes: the daemon handshakes them all
    # at once instead of one round trip at a time.
    for _ in range(count):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(hello)
        conns.append(sock)
    for sock in conns:
        frame = read_frame(sock)
        if frame[0] != WELCOME:
            sys.exit(f"idle.py: expected Welcome, got frame type {frame[0]:#x}: {frame[1:]!r}")
    print(f"ready {len(conns)}", flush=True)
    while sys.stdin.read(1) != "":
        pass
    for sock in conns:
        sock.close()


if __name__ == "__main__":
    main()
