#!/usr/bin/env python3
"""dio reading a file inside an ext4 image, against the kernel reading the same file
through a loop mount of that image (fio --direct=1 --bs=1M --iodepth=8, io_uring)
and against dio reading a raw host file of the same size.

Runs alternate (dio image, fio on the loop mount, dio raw) so that drift of the
machine hits all three alike; the page cache is dropped before every run. Prints
each round and the medians of the ratios image/fio-loop and image/raw.

Usage (root: mount, drop_caches):  bench/ext-vs-loop.py [--rounds N] [--size-mib M]
         [--loop-direct] [-- extra dio cat args]
Needs fio, mke2fs (e2fsprogs) and mount. Files go to target/ext-vs-loop/.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "ext-vs-loop")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed_cat(dio, source, extra, size):
    drop_caches()
    start = time.perf_counter()
    run([dio, "cat", *extra, source], stdout=subprocess.DEVNULL)
    return size / (time.perf_counter() - start)


def fio_read(path, size):
    drop_caches()
    out = run(
        ["fio", "--name=loop", f"--filename={path}", "--direct=1", "--bs=1M",
         "--iodepth=8", "--ioengine=io_uring", "--rw=read", f"--size={size}",
         "--output-format=json"],
        capture_output=True, text=True,
    ).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["bw_bytes"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--loop-direct", action="store_true",
                    help="loop device with --direct-io=on instead of the default (buffered)")
    ap.add_argument("extra", nargs="*", help="extra `dio cat` arguments (after --)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ext-vs-loop: needs root (loop mount, drop_caches)")
    dio = os.environ.get("DIO", os.path.join(ROOT, "target", "release", "dio"))
    if not os.access(dio, os.X_OK):
        run(["cargo", "build", "--release", "-p", "dio-cli"], cwd=ROOT)
    size = args.size_mib << 20
    os.makedirs(os.path.join(WORK, "src"), exist_ok=True)
    raw = os.path.join(WORK, "src", "big")
    image = os.path.join(WORK, "big.img")
    mnt = os.path.join(WORK, "mnt")
    if not os.path.exists(raw) or os.path.getsize(raw) != size:
        print(f"making a {args.size_mib} MiB file and an ext4 image holding it", file=sys.stderr)
        run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={args.size_mib}",
             "status=none"])
        if os.path.exists(image):
            os.remove(image)
    if not os.path.exists(image):
        img_mib = args.size_mib + args.size_mib // 8 + 64
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", os.path.join(WORK, "src"), image,
             f"{img_mib}M"])
    os.makedirs(mnt, exist_ok=True)
    loop = run(["losetup", "--find", "--show", "--read-only",
                f"--direct-io={'on' if args.loop_direct else 'off'}", image],
               capture_output=True, text=True).stdout.strip()
    try:
        run(["mount", "-o", "ro", loop, mnt])
        try:
            img_fio, img_raw = [], []
            for i in range(args.rounds):
                a = timed_cat(dio, f"{image}:/big", args.extra, size)
                f = fio_read(os.path.join(mnt, "big"), size)
                r = timed_cat(dio, raw, args.extra, size)
                img_fio.append(a / f)
                img_raw.append(a / r)
                mib = 1 << 20
                print(f"round {i + 1}: dio image {a / mib:.0f} MiB/s  fio loop {f / mib:.0f}"
                      f" MiB/s  dio raw {r / mib:.0f} MiB/s  image/fio {a / f:.2f}"
                      f"  image/raw {a / r:.2f}", flush=True)
            kind = "direct-io" if args.loop_direct else "buffered"
            print(f"median image/fio-loop ({kind} loop): {statistics.median(img_fio):.2f}x")
            print(f"median image/raw: {statistics.median(img_raw):.2f}x")
        finally:
            run(["umount", mnt])
    finally:
        run(["losetup", "-d", loop])


if __name__ == "__main__":
    main()
