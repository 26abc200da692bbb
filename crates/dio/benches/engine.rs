//! Engine overhead and copy bandwidth on the RAM device.
//!
//! `cargo bench -p dio --bench engine`
//!
//! (For a quick figure without criterion, side by side with fio's null engine, and
//! the 1-vs-N-thread rates: `examples/null_loop.rs`.)
//! - `null_4k` / `null_1m`: one aligned read through the engine to a null device
//!   (no storage, no copy, no counters, completes inline): the engine's own cost per
//!   request.
//! - `threads/null_4k_xN`: N threads each doing sync 4 KiB reads of one file on the
//!   null device; the time is per read of each thread (so with no shared hot spot
//!   and N free cores, N threads take as long per read as one). Throughput is
//!   reads per second over all threads. With `DIO_BENCH_THREAD_CPU=1` the time is
//!   each thread's CPU time instead (getrusage RUSAGE_THREAD): on a loaded machine
//!   that still shows a shared hot spot (the cost per read grows with threads)
//!   without counting the time other processes took the cores.
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
    // A null device that keeps no counters, as fio's null engine: what is left is
    // the engine's own cost.
    let f = file(MemDeviceConfig::new(size, 512).null().without_stats(), size);
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

/// Sync 4 KiB reads from N threads at once on one file over the null device.
fn threaded(c: &mut Criterion) {
    let size = 1 << 30;
    let f = file(MemDeviceConfig::new(size, 512).null().without_stats(), size);
    let mut g = c.benchmark_group("threads");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_time = std::env::var_os("DIO_BENCH_THREAD_CPU").is_some_and(|v| v == "1");
    for n in [1usize, 2, 4] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("null_4k_x{n}"), |b| {
            b.iter_custom(|iters| {
                let start = std::sync::Barrier::new(n);
                let times: Vec<_> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..n)
                        .map(|t| {
                            let (f, start) = (&f, &start);
                            s.spawn(move || {
                                let mut buf = AlignedBuf::new(4096, 4096);
                                let mut off = t as u64 * (size / n as u64);
                                start.wait();
                                let (t0, c0) = (std::time::Instant::now(), thread_cpu());
                                for _ in 0..iters {
                                    off = (off + 4096) % size;
                                    f.read_at(off, &mut buf, Flags::NONE).unwrap();
                                }
                                if cpu_time {
                                    thread_cpu() - c0
                                } else {
                                    t0.elapsed()
                                }
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                times.into_iter().max().unwrap()
            })
        });
        if n >= cores {
            break;
        }
    }
    g.finish();
}

/// The calling thread's CPU time (user + system).
fn thread_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

criterion_group!(benches, null_requests, threaded, copy_bandwidth, unaligned);
criterion_main!(benches);

/// Byte-granular cost: a 1 MiB read at offset 100 (head and tail bounced, the
/// middle straight into the caller's buffer, placed at the same phase) against
/// the aligned 1 MiB read, on the RAM device and on a host file (io_uring).
fn unaligned(c: &mut Criterion) {
    let size = 64 * MIB;
    let ram = file(MemDeviceConfig::new(size, 512).fill(1), size);
    let mut g = c.benchmark_group("unaligned");
    g.throughput(Throughput::Bytes(MIB));
    let mut mem = AlignedBuf::new(2 * MIB as usize, 4096);
    let mut off = 0u64;
    let mut step = || {
        off = (off + MIB) % (size - 2 * MIB);
        off
    };
    g.bench_function("ram_read_1m_aligned", |b| {
        b.iter(|| {
            ram.read_at(step(), &mut mem[..MIB as usize], Flags::NONE)
                .unwrap()
        })
    });
    g.bench_function("ram_read_1m_unaligned", |b| {
        b.iter(|| {
            ram.read_at(
                step() + 100,
                &mut mem[100..100 + MIB as usize],
                Flags::UNALIGNED,
            )
            .unwrap()
        })
    });
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("unaligned.bin");
    std::fs::write(&path, vec![7u8; size as usize]).unwrap();
    let opts = dio::RawOptions::default();
    if let Ok(raw) = dio::RawFile::open(&path, &opts) {
        let f = raw.direct().clone();
        g.bench_function("file_read_1m_aligned", |b| {
            b.iter(|| {
                f.read_at(step(), &mut mem[..MIB as usize], Flags::NONE)
                    .unwrap()
            })
        });
        g.bench_function("file_read_1m_unaligned", |b| {
            b.iter(|| {
                f.read_at(
                    step() + 100,
                    &mut mem[100..100 + MIB as usize],
                    Flags::UNALIGNED,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}
