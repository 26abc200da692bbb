#!/usr/bin/env python3
"""Writes the seed inputs of the nbd_server fuzz target (see src/nbd.rs for the
script format) into corpus/nbd_server: well-behaved servers in each mode, whose
mutations reach every reply path."""
import os, struct

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "corpus", "nbd_server")
os.makedirs(out, exist_ok=True)
u8 = lambda v: struct.pack(">B", v)
u16 = lambda v: struct.pack(">H", v)
u32 = lambda v: struct.pack(">I", v)
u64 = lambda v: struct.pack(">Q", v)

SIZE = 0x000F0000  # 960 KiB
FLAGS = 0x000D  # has flags, flush, fua


def go(block_sizes=None):
    s = u8(0) + u32(SIZE) + u16(FLAGS)
    if block_sizes is None:
        return s + u8(0)
    return s + u8(1) + b"".join(u8(b) for b in block_sizes)


# Requests the client sends, in order: read 4096@0, read 65536@8192, write
# 4096@4096, block status (when negotiated).
def data_chunk(i, off, n, done=1):
    return u8(1) + u8(i) + u8(done) + u32(off) + u32(n)


def hole_chunk(i, off, n, done=1):
    return u8(2) + u8(i) + u8(done) + u32(off) + u32(n)


def simple(i):
    return u8(0) + u8(i)


def status(i, descs, done=1):
    s = u8(3) + u8(i) + u8(done) + u8(0) + u8(len(descs))
    for n, f in descs:
        s += u32(n) + u8(f)
    return s


def error_chunk(i, errno, msg, ty_index=4, done=1, offset=None):
    s = u8(4) + u8(i) + u8(done) + u8(ty_index) + u32(errno) + u8(len(msg)) + msg
    return s if offset is None else s + u64(offset)


seeds = {
    # Structured replies and block status: data, holes, status, errors.
    "structured": u8(0x07)
    + u8(0)  # structured reply: ack
    + u8(0) + u32(1)  # meta context id 1
    + go()
    + data_chunk(0, 0, 4096)
    + data_chunk(1, 0, 32768, 0)
    + hole_chunk(1, 32768, 32768)
    + simple(2)
    + status(3, [(4096, 0), (8192, 3)]),
    "structured-errors": u8(0x07)
    + u8(0)
    + u8(0) + u32(7)
    + go([9, 12, 20])
    + error_chunk(0, 5, b"injected EIO")
    + error_chunk(1, 28, b"no space", ty_index=5, offset=8192)
    + simple(2)
    + status(3, [(65536, 1)]),
    # Simple replies only.
    "simple": u8(0x02) + go() + simple(0) + simple(1) + simple(2),
    # A server without NBD_OPT_GO: refused as unsupported, then EXPORT_NAME.
    "export-name": u8(0x00) + u8(4) + u8(0) + u8(0) + u8(0) + u32(SIZE) + u16(FLAGS)
    + simple(0) + simple(1) + simple(2),
    # Refusals in the handshake.
    "refused": u8(0x07) + u8(4) + u8(1) + u8(5) + b"nope!" + u8(4) + u8(4) + u8(0),
}
for name, data in seeds.items():
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)
