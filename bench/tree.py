#!/usr/bin/env python3
"""Source trees for bench/bulk.sh and bench/wan.sh: make them, digest them, count partial copies.

usage:
  tree.py make DIR small FILES DIRS SIZE
  tree.py make DIR mixed FILES DIRS MIN MAX BIG BIG_SIZE
  tree.py digest DIR          -> "files bytes sha256"
  tree.py count SOURCE COPY   -> "files bytes"

make: DIR must not exist. small: FILES files of SIZE bytes spread over DIRS directories d00..;
mixed: FILES files of MIN..MAX bytes (sizes from a fixed seed) over DIRS directories, plus BIG
files of BIG_SIZE bytes in big/. Content is pseudo-random (incompressible) from a fixed seed, so
the same parameters always give the same tree, byte for byte.

digest: regular files only, sorted by relative path; the sha256 runs over each one's path, size
and content. Two trees with the same digest have the same files with the same content.

count: what of SOURCE arrived in COPY, for a copy stopped part way: files = regular files of COPY
whose path is in SOURCE and whose size is the source's (complete as far as size tells; every tool
here writes a file in order, and xfer and rsync write under a hidden temporary name until the
file is complete); bytes = the size of each such path in COPY, at most its source size, summed
(a file cut short counts with what it holds).
"""

import hashlib
import os
import random
import sys

SIZE_SEED = 20260101  # the mixed tree's sizes (as bulk.sh always drew them)
CONTENT_SEED = 20260102
BLOCK = 1 << 20


def make(top, kind, args):
    rng = random.Random(SIZE_SEED)
    content = random.Random(CONTENT_SEED)
    os.makedirs(top)

    def write(path, size):
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, BLOCK)
                f.write(content.randbytes(n))
                left -= n

    if kind == "small":
        files, dirs, size = args
        sizes = [size] * files
        big = big_size = 0
    elif kind == "mixed":
        files, dirs, lo, hi, big, big_size = args
        sizes = [rng.randint(lo, hi) for _ in range(files)]
    else:
        sys.exit(f"tree.py: unknown tree kind {kind}")
    for d in range(dirs):
        os.makedirs(os.path.join(top, f"d{d:02}"))
    for i, size in enumerate(sizes):
        write(os.path.join(top, f"d{i % dirs:02}", f"f{i:05}"), size)
    if big:
        os.makedirs(os.path.join(top, "big"))
        for i in range(big):
            write(os.path.join(top, "big", f"big{i}.bin"), big_size)


def regular_files(top):
    """relative path -> size, of every regular file under top"""
    out = {}
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if os.path.isfile(path) and not os.path.islink(path):
                out[os.path.relpath(path, top)] = st.st_size
    return out


def digest(top):
    files = regular_files(top)
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\0".encode())
        with open(os.path.join(top, rel), "rb") as f:
            while block := f.read(BLOCK):
                h.update(block)
    print(f"{len(files)} {sum(files.values())} {h.hexdigest()}")


def count(source, copy):
    src, dst = regular_files(source), regular_files(copy)
    whole = sum(1 for rel, size in dst.items() if src.get(rel) == size)
    held = sum(min(size, src[rel]) for rel, size in dst.items() if rel in src)
    print(f"{whole} {held}")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make" and len(args) >= 2:
        make(args[0], args[1], [int(a) for a in args[2:]])
    elif cmd == "digest" and len(args) == 1:
        digest(args[0])
    elif cmd == "count" and len(args) == 2:
        count(args[0], args[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
