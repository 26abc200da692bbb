//! Engine overhead and copy bandwidth on the RAM device.
//!
//! `cargo bench -p dio --bench engine`
//! - `null_4k` / `null_1m`: one aligned read through the engine to a null device
//!   (no storage, no copy, completes inline): the engine's own cost per request.
//! - `read_64m_copy` vs `memcpy_64m`: a 64 MiB sequential read through the RAM device
//!   (the device copies) against a plain memcpy of the same size.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dio::{AlignedBuf, DirectFile, FileState, Flags, IdentityMap, MemDevice, MemDeviceConfig};

const MIB: u64 = 1 << 20;

fn file(cfg: MemDeviceConfig, size: u64) -> DirectFile {
    let dev = Arc::new(MemDevice::new(cfg));
    DirectFile::new(
        dev,
        Arc::new(IdentityMap::new(4096, size)),
        Arc::new(FileState::new(size)),
    )
    .unwrap()
}

fn null_requests(c: &mut Criterion) {
    let size = 1 << 30;
    let f = file(MemDeviceConfig::new(size, 512).null(), size);
    let mut g = c.benchmark_group("engine");
    let mut b4 = AlignedBuf::new(4096, 4096);
    let mut off = 0u64;
    g.bench_function("null_4k", |b| {
        b.iter(|| {
            off = (off + 4096) % size;
            f.read_at(off, &mut b4, Flags::NONE).unwrap()
        })
    });
    let mut b1 = AlignedBuf::new(MIB as usize, 4096);
    let mut off = 0u64;
    g.bench_function("null_1m", |b| {
        b.iter(|| {
            off = (off + MIB) % size;
            f.read_at(off, &mut b1, Flags::NONE).unwrap()
        })
    });
    g.finish();
}

fn copy_bandwidth(c: &mut Criterion) {
    let size = 64 * MIB;
    let f = file(MemDeviceConfig::new(size, 512).fill(1), size);
    let mut dst = AlignedBuf::new(size as usize, 4096);
    let src = vec![1u8; size as usize];
    let mut g = c.benchmark_group("bandwidth");
    g.throughput(Throughput::Bytes(size));
    g.sample_size(20);
    g.bench_function("read_64m_copy", |b| {
        b.iter(|| f.read_at(0, &mut dst, Flags::NONE).unwrap())
    });
    g.bench_function("memcpy_64m", |b| b.iter(|| dst.copy_from_slice(&src)));
    g.finish();
}

criterion_group!(benches, null_requests, copy_bandwidth);
criterion_main!(benches);
